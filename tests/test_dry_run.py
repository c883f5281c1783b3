"""``re-po train --dry-run``: the configuration and every data row (training and held-out)
checked, the data summary reported, and no model (nor tokenizer) loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from _helpers import write_jsonl

from repo.cli import main
from repo.data.rule_pairs import rule_pairs


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model weights or tokenizer fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "train.toml"
    path.write_text(
        '[model]\nrecipe = "tiny-llama"\n'
        '[data]\ntrain = "data.jsonl"\nannotator_column = "annotator"\neval = "held.jsonl"\n'
        'on_invalid = "skip"\n' + extra + '[run]\noutput_dir = "run"\neval_steps = 2\n'
    )
    return path


def _rows(n: int, seed: int) -> list[dict]:
    return [dict(r) for r in rule_pairs(n, [0.9, 0.8, 0.7], seed=seed).rows]


def test_dry_run_reports_the_data_and_loads_no_model(tmp_path, no_model, capsys):
    rows = _rows(20, seed=0)
    rows[3]["annotator"] = None  # malformed: skipped under on_invalid = "skip"
    rows[4]["rejected"] = rows[4]["chosen"]  # identical responses: skipped
    rows[5]["rejected"] = rows[5]["chosen"]
    write_jsonl(tmp_path / "data.jsonl", rows)
    write_jsonl(tmp_path / "held.jsonl", _rows(6, seed=1))
    assert main(["train", str(_config(tmp_path)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["train"]["pairs"] == 17 and summary["train"]["annotators"] == 3
    assert sum(summary["train"]["skipped"].values()) == 3
    assert summary["train"]["skipped"]["identical"] == 2
    assert summary["eval"] == {
        "pairs": 6,
        "items": 6,
        "annotators": len({r["annotator"] for r in _rows(6, seed=1)}),
        "skipped": {},
        "notes": {},
    }
    assert summary["likelihood"]["family"] == "dpo" and summary["noise"] == "symmetric"
    assert "[re-po] train: 17 pairs" in err and "skipped 3 row(s)" in err
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("broken", ["data.jsonl", "held.jsonl"])
def test_dry_run_names_a_bad_row(tmp_path, no_model, capsys, broken):
    write_jsonl(tmp_path / "data.jsonl", _rows(20, seed=0))
    write_jsonl(tmp_path / "held.jsonl", _rows(6, seed=1))
    rows = json.loads("[" + ",".join((tmp_path / broken).read_text().splitlines()) + "]")
    rows[2]["prompt"] = 7
    write_jsonl(tmp_path / broken, rows)
    config = _config(tmp_path).read_text().replace('on_invalid = "skip"\n', "")
    (tmp_path / "train.toml").write_text(config)
    assert main(["train", str(tmp_path / "train.toml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "prompt" in err


def test_dry_run_reports_a_bad_setting_first(tmp_path, no_model, capsys):
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": None}])  # broken too: reported second
    write_jsonl(tmp_path / "held.jsonl", _rows(6, seed=1))
    path = _config(tmp_path, extra='[noise]\nprior = "beta:1"\n')
    assert main(["train", str(path), "--dry-run"]) == 2
    assert "[noise] prior" in capsys.readouterr().err
