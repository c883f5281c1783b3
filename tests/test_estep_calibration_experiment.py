"""The E-step calibration experiment (examples/estep_calibration.py) in its quick mode."""

import json
import math
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_estep_calibration_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["estep_calibration.py", "--quick", "--out", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "estep_calibration.py"), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frame = pd.read_csv(tmp_path / "estep-calibration.csv")
    # a snapshot at the start and one per epoch (quick: 2 epochs, 1 snapshot each)
    assert frame.epoch.tolist() == [0.0, 1.0, 2.0]
    start = frame.iloc[0]
    # before any step the policy is the reference: s = 0, w = eta_0 for every label
    for column in ("w_clean", "w_flipped", "eta_online"):
        assert start[column] == pytest.approx(0.9, abs=1e-12)
    assert start.held_log_loss == pytest.approx(math.log(2), abs=1e-9)
    assert set(result["final_mean_abs_error"]) == {
        "eta_online",
        "eta_in",
        "eta_in_cal",
        "eta_out_cal",
    }
    table = (tmp_path / "estep-calibration-table.md").read_text()
    assert "ML eta, out-of-sample, scale learned" in table
    assert (tmp_path / "estep-calibration.png").stat().st_size > 10_000
