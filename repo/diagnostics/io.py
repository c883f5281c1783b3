"""Reading and writing what the diagnostics consume.

A fit leaves (``re-po fit-noise``):

* ``RESULT.json`` (version :data:`~repo.fit.RESULT_VERSION`): summaries; its
  ``files`` entry names the side files below, relative to its folder;
* an InferenceData netCDF (``--idata``): draws, sample stats, pointwise
  log-likelihood, observed and constant data (:mod:`repo.diagnostics.inference_data`);
* a trajectory JSONL (``--trajectory``): one line per EM iteration,
  ``{"step": int, "objective": float, "eta": [eta_1, ..., eta_K]}`` in the order
  of RESULT.json's annotators.

A training run (``re-po train``, :mod:`repo.train`) leaves a run directory
(:class:`repo.train.run_dir.RunDir` reads it): the resolved configuration, the
online EM's trajectory and, with ``[run] posteriors``, the final noise model as a
:class:`~repo.fit.NoiseFit` (``format`` ``"scored"``: the labels with the final
policy's logits as fixed scores) and the per-label posteriors.
:func:`read_training_run` turns it into the same :class:`Run` a RESULT.json gives:
the trained estimates as they are (no EM refit), EM's Laplace approximation at them
and its InferenceData, so intervals, PSIS-LOO, predictive checks and the scorer's
calibration apply; a ``"training"`` entry says what was trained.

:func:`load_run` accepts a RESULT.json or a directory. Directory layouts are read
by the functions in :data:`RUN_READERS`, tried in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repo.diagnostics.compat import attrs, from_netcdf, to_netcdf
from repo.noise import NOISE_MODELS

RESULT_VERSION = 1
"""The RESULT.json version these readers understand (that of :mod:`repo.fit`)."""


@dataclass
class Run:
    """Everything the report reads about one fit.

    :param result: the RESULT.json document.
    :param source: where it was read from.
    :param idata: the InferenceData, when the fit wrote one.
    :param trajectory: EM iterations, one row per (step, annotator): ``step``,
        ``annotator``, ``eta``, ``objective``; None when not written.
    """

    result: dict[str, Any]
    source: Path
    idata: Any = None
    trajectory: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.result['model']} ({self.result.get('method', 'em')})"


def validate_result(document: dict, source: str | Path) -> dict:
    """Check a RESULT.json document's version and model; raise ValueError if foreign."""
    if not isinstance(document, dict) or "version" not in document:
        raise ValueError(f"{source}: not a re-po RESULT.json (no 'version' field)")
    if document["version"] != RESULT_VERSION:
        raise ValueError(
            f"{source}: RESULT.json version {document['version']!r} is not supported "
            f"(this re-po reads version {RESULT_VERSION})"
        )
    model = document.get("model")
    if model not in NOISE_MODELS:
        raise ValueError(
            f"{source}: unknown noise model {model!r}; this re-po knows {', '.join(NOISE_MODELS)}"
        )
    for key in ("annotators", "labels", "format"):
        if key not in document:
            raise ValueError(f"{source}: RESULT.json has no {key!r} field")
    return document


def read_trajectory(path: str | Path, annotator_ids: list[str]) -> pd.DataFrame:
    """A trajectory JSONL as a long frame (step, annotator, eta, objective)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        eta = record.get("eta")
        if isinstance(eta, dict):  # {annotator id: eta}
            items = list(eta.items())
        elif isinstance(eta, list) and len(eta) == len(annotator_ids):
            items = list(zip(annotator_ids, eta, strict=True))
        else:
            raise ValueError(f"{path}:{number}: 'eta' must list one value per annotator")
        for annotator, value in items:
            rows.append(
                {
                    "step": int(record["step"]),
                    "annotator": str(annotator),
                    "eta": float(value),
                    "objective": record.get("objective"),
                }
            )
    return pd.DataFrame(rows, columns=["step", "annotator", "eta", "objective"])


def write_trajectory(trajectory: list[dict], path: str | Path) -> None:
    """Write EM's trajectory (``NoiseFit.trajectory``) as JSONL."""
    with open(path, "w") as handle:
        for record in trajectory:
            handle.write(json.dumps(record) + "\n")


def write_inference_data(idata, path: str | Path) -> None:
    """Write an InferenceData (or DataTree) to netCDF."""
    to_netcdf(idata, path)


def read_result(path: str | Path) -> Run:
    """A RESULT.json and the side files it names."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if isinstance(document, dict) and "tables" in document:  # a NoiseFit directory's fit.json
        from repo.fit import NoiseFit

        document = NoiseFit.load(path.parent).to_dict()
    validate_result(document, path)
    run = Run(result=document, source=path)
    files = document.get("files") or {}
    if "inference_data" in files:
        idata_path = path.parent / files["inference_data"]
        if not idata_path.exists():
            raise ValueError(f"{path}: names inference data {idata_path}, which does not exist")
        run.idata = from_netcdf(idata_path)
        stored = attrs(run.idata)
        if stored.get("model") != document["model"] or stored.get("method") != document.get(
            "method"
        ):
            raise ValueError(
                f"{idata_path}: inference data of model {stored.get('model')!r} "
                f"({stored.get('method')!r}) does not belong to RESULT.json's "
                f"{document['model']!r} ({document.get('method')!r})"
            )
    if "trajectory" in files:
        ids = [str(a["id"]) for a in document["annotators"]]
        run.trajectory = read_trajectory(path.parent / files["trajectory"], ids)
    return run


def _read_result_directory(path: Path) -> Run | None:
    """A directory holding one ``RESULT.json`` (or ``result.json``), or a saved
    :class:`~repo.fit.NoiseFit` (``fit.json``)."""
    for name in ("RESULT.json", "result.json", "fit.json"):
        if (path / name).is_file():
            return read_result(path / name)
    return None


def read_training_run(path: str | Path) -> Run | None:
    """A ``re-po train`` run directory as a :class:`Run`; None when ``path`` is not one.

    The run's final noise model (``noise/``, a :class:`~repo.fit.NoiseFit` at the
    final policy's logits) is the result, as trained: no EM is run. EM's Laplace
    approximation at the trained parameters
    (:func:`repo.train.build.build_trained_noise_fit`) gives the intervals and the
    InferenceData, so PSIS-LOO, predictive checks and the scorer's calibration apply;
    ``annotators.jsonl`` gives the online EM's trajectory.

    :raises ValueError: a training run that is unfinished (no ``reliability.json``),
        written without a final noise model (plain DPO, ``[run] posteriors = false``),
        or whose files disagree (the message says which).
    """
    from repo.train.build import build_trained_noise_fit
    from repo.train.run_dir import RunDir

    run_dir = RunDir(path)
    if not (run_dir.holds_run() and run_dir.annotators_file.is_file()):
        return None
    if not run_dir.finished():
        raise ValueError(
            f"{run_dir.path}: a training run without reliability.json (unfinished? resume it "
            "with `re-po train --resume`)"
        )
    if not (run_dir.has_posteriors() and run_dir.noise_fit.is_dir()):
        raise ValueError(
            f"{run_dir.path}: a training run without posteriors.jsonl and noise/ ([run] "
            "posteriors = false, or [em] enabled = false): nothing to diagnose"
        )
    saved = run_dir.read_noise_fit()
    fit = build_trained_noise_fit(run_dir, posterior=True)
    for column in saved.annotators.columns:
        mine, theirs = saved.annotators[column], fit.annotators[column]
        numeric = pd.api.types.is_numeric_dtype(mine)
        same = np.allclose(mine, theirs, rtol=1e-9) if numeric else mine.equals(theirs)
        if not same:
            raise ValueError(
                f"{run_dir.noise_fit}: its {column!r} does not match the run's final noise "
                "state and posteriors (were files edited or copied from another run?)"
            )
    resolved = run_dir.read_resolved()
    config = resolved.get("config", {})
    result = fit.to_dict()
    # what the run's own checks found (one annotator's eta, ...) before the fit's
    result["warnings"] = run_dir.read_reliability().get("warnings", []) + result["warnings"]
    result["training"] = {
        "loss": resolved.get("likelihood", {}),
        "total_steps": resolved.get("total_steps"),
        "em_enabled": config.get("em", {}).get("enabled", True),
    }
    run = Run(
        result=result,
        source=run_dir.path,
        idata=fit.to_inference_data(),
        notes=[
            "annotator parameters as trained by the online EM, at the final policy's logits; "
            "intervals: EM's Laplace approximation at those parameters"
        ],
    )
    trajectory = run_dir.trajectory_log().read()
    if trajectory and "eta" in trajectory[0]:
        run.trajectory = read_trajectory(run_dir.trajectory_file, run_dir.read_annotators())
    return run


RUN_READERS: list[Callable[[Path], Run | None]] = [_read_result_directory, read_training_run]
"""Directory readers, tried in order; each returns None when the layout is not its own."""


def load_run(path: str | Path) -> Run:
    """Read a RESULT.json or a run directory; ValueError when neither."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        return read_result(path)
    for reader in RUN_READERS:
        run = reader(path)
        if run is not None:
            return run
    raise ValueError(
        f"{path}: neither a RESULT.json nor a training run directory (config.json, "
        "annotators.json, reliability.json) is in this directory"
    )
