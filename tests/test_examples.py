"""The runnable examples run, and say what the docs say they say."""

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_noise_model_recovers_its_parameters(capsys):
    example = _load("custom_noise_model")
    out = example.main(num_labels=100_000)
    assert "converged=True" in capsys.readouterr().out
    assert np.abs(out["fitted_alpha"] - out["alpha"]).max() < 0.3
    assert np.abs(out["fitted_beta"] - out["beta"]).max() < 0.2


def test_pandalm_noise_models_prints_the_reliability_table(capsys, tmp_path):
    import json

    from repo.data.pandalm import PANDALM_ANNOTATORS

    _load("pandalm_noise_models").main(["--top", "3", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert "Reliability eta_k" in captured.out
    table = captured.out.split("Reliability eta_k", 1)[1]
    for annotator in PANDALM_ANNOTATORS:
        assert annotator in table
    for model in ("symmetric", "two-coin", "spammer", "hierarchical"):
        assert model in table
        doc = json.loads((tmp_path / f"pandalm-{model}.json").read_text())
        assert doc["version"] == 1 and doc["format"] == "binary"
        assert [a["id"] for a in doc["annotators"]] == list(PANDALM_ANNOTATORS)
    assert "fitting symmetric" in captured.err
