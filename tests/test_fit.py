"""NoiseFit as plain data: the summary, the whole document, and the saved directory
(fit.json + Parquet tables) that ``re-po fit-noise`` writes and ``NoiseFit.load``
reads; and what a ``re-po fit-noise`` process imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest

import repo
from repo.cli import main
from repo.data.simulate import simulate_labels
from repo.fit import NoiseFit, fit_noise

ROOT = Path(repo.__file__).resolve().parents[1]


def _binary(seed: int = 0) -> pd.DataFrame:
    sim = simulate_labels(num_items=60, num_annotators=5, labels_per_item=3, seed=seed)
    return pd.DataFrame(
        {
            "annotator": [f"rater {k}" for k in sim.annotator],
            "item": [f"q{i:03d}" for i in sim.item],
            "label": sim.label + 1,
        }
    )


def _pairwise(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pairs = np.array([rng.choice(8, size=2, replace=False) for _ in range(150)])
    return pd.DataFrame(
        {
            "annotator": [f"u{k}" for k in rng.integers(0, 4, 150)],
            "winner": [f"obj {i}" for i in pairs[:, 0]],
            "loser": [f"obj {i}" for i in pairs[:, 1]],
        }
    )


def _scored(seed: int = 2) -> pd.DataFrame:
    sim = simulate_labels(num_items=150, num_annotators=4, shared_truth=False, seed=seed)
    return pd.DataFrame(
        {"annotator": [f"a{k}" for k in sim.annotator], "label": sim.label, "score": sim.scores}
    )


def _assert_same(loaded: NoiseFit, fit: NoiseFit) -> None:
    for name in ("annotators", "items", "labels"):
        pdt.assert_frame_equal(
            getattr(loaded, name).reset_index(drop=True),
            getattr(fit, name).reset_index(drop=True),
            check_dtype=False,
        )
    for name in (
        "model",
        "format",
        "method",
        "converged",
        "iterations",
        "log_likelihood",
        "population",
        "skipped",
        "prior",
        "divergences",
        "settings",
        "files",
        "truth_values",
    ):
        assert getattr(loaded, name) == getattr(fit, name), name
    assert json.loads(json.dumps(loaded.inference)) == json.loads(json.dumps(fit.inference))
    assert loaded.noise_model is None and loaded.posterior is None  # live objects stay behind


@pytest.mark.parametrize(
    ("make", "fmt", "method"),
    [(_binary, "binary", "em"), (_pairwise, "pairwise", None), (_scored, "scored", "em")],
    ids=["binary-laplace", "pairwise", "scored"],
)
def test_save_load_round_trip(tmp_path, make, fmt, method):
    fit = fit_noise(make(), format=fmt, method=method)
    directory = fit.save(tmp_path / "fit")
    assert sorted(p.name for p in directory.iterdir()) == [
        "fit.json",
        "items.parquet",
        "labels.parquet",
    ]
    summary = json.loads((directory / "fit.json").read_text())
    assert "labels" not in summary and "items" not in summary  # the tables are columnar
    assert summary["counts"]["labels"] == len(fit.labels)
    assert [a["id"] for a in summary["annotators"]] == fit.annotators["id"].tolist()
    loaded = NoiseFit.load(directory)
    _assert_same(loaded, fit)
    _assert_same(NoiseFit.load(directory / "fit.json"), fit)
    np.testing.assert_array_equal(loaded.pointwise_log_likelihood, fit.pointwise_log_likelihood)
    # the whole document round-trips too
    _assert_same(NoiseFit.from_dict(json.loads(fit.to_json())), fit)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no fit.json"):
        NoiseFit.load(tmp_path)
    fit_noise(_binary(), format="binary").save(tmp_path / "fit")
    (tmp_path / "fit" / "items.parquet").unlink()
    with pytest.raises(ValueError, match="items.parquet is missing"):
        NoiseFit.load(tmp_path / "fit")


def test_cli_writes_the_directory_and_diagnose_reads_it(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    _binary(3).to_csv(path, index=False)
    out = tmp_path / "fit"
    code = main(["fit-noise", str(path), "--format", "binary", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    fit = NoiseFit.load(out)
    assert fit.method == "em" and "eta_lo90" in fit.annotators  # the Laplace posterior
    assert fit.settings["duplicates"] == "error" and fit.settings["on_invalid"] == "error"
    assert sorted(fit.labels["row"]) == list(range(180))
    from repo.diagnostics.io import load_run

    for target in (out, out / "fit.json"):
        run = load_run(target)
        assert run.result["model"] == "symmetric"
        assert len(run.result["labels"]) == 180


def _modules_after(argv: list[str], cwd: Path) -> set[str]:
    """The modules a ``re-po`` process has imported when it ends."""
    script = (
        "import sys, json\n"
        "from repo.cli import main\n"
        f"code = main({argv!r})\n"
        "assert code == 0, code\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_fit_noise_imports_no_heavy_library_it_does_not_use(tmp_path):
    path = tmp_path / "labels.csv"
    _binary(4).to_csv(path, index=False)
    argv = ["fit-noise", str(path), "--format", "binary", "--out", str(tmp_path / "fit")]
    modules = _modules_after(argv, tmp_path)
    for heavy in ("arviz", "matplotlib", "transformers", "xarray", "datasets"):
        assert heavy not in modules, heavy
    with_idata = _modules_after([*argv, "--idata", str(tmp_path / "fit.nc")], tmp_path)
    assert "arviz" in with_idata  # the test can fail: --idata does use it


def test_idata_keeps_a_bounded_pointwise_log_likelihood(tmp_path, monkeypatch):
    import repo.fit
    from repo.diagnostics.compat import group

    table = _binary(5)  # 60 items under shared truth
    monkeypatch.setattr(repo.fit, "LOG_LIKELIHOOD_VALUES", 60 * 25)  # room for 25 draws
    fit = fit_noise(table, format="binary", method="em")
    idata = fit.to_inference_data()
    values = group(idata, "log_likelihood")["o_item"]
    assert np.isfinite(values).all()
    assert values.shape == (1, 25, 60)  # one Laplace "chain", 25 of its 2000 draws, per item
    assert group(idata, "posterior")["eta"].shape[:2] == (1, 25)  # thinned alike
    path = tmp_path / "fit.nc"
    assert main(
        ["fit-noise", str(_csv(table, tmp_path)), "--format", "binary", "--loo-draws", "40",
         "--idata", str(path), "--out", str(tmp_path / "fit")]
    ) == 0  # fmt: skip
    from repo.diagnostics.compat import from_netcdf

    assert group(from_netcdf(path), "log_likelihood")["o_item"].shape == (1, 40, 60)
    assert NoiseFit.load(tmp_path / "fit").files["inference_data"] == "../fit.nc"


def _csv(table: pd.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "labels.csv"
    table.to_csv(path, index=False)
    return path
