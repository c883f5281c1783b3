"""The one-annotator experiment (examples/one_annotator.py) in its quick mode."""

import json
import runpy
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_one_annotator_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["one_annotator.py", "--quick", "--out", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "one_annotator.py"), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frame = pd.read_csv(tmp_path / "one-annotator.csv")
    # three methods, a row after the first pass and after the last epoch
    assert sorted(set(frame.method)) == ["DPO", "RE-DPO, online", "RE-DPO, out of sample"]
    assert sorted(set(frame.epoch)) == [1, 2] and len(frame) == 6 == result["runs"]
    robust = frame[frame.method != "DPO"]
    assert (robust.profile_low <= robust.profile_eta).all()
    assert (robust.profile_eta <= robust.profile_high).all()
    assert frame[frame.method == "DPO"].profile_eta.isna().all()
    # first visits do not change after the first pass: one profile per run
    for _, run in robust.groupby("method"):
        assert run.profile_low.nunique() == 1 and run.profile_high.nunique() == 1
    table = (tmp_path / "one-annotator-table.md").read_text()
    assert "profile 95% interval, low" in table and "48 pairs, rho=0.4, epoch 2" in table
