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
