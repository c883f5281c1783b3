"""Figures for the diagnostics report (matplotlib, Agg backend: no display needed).

Each function draws one figure and returns it; :func:`save` writes a PNG.

* :func:`plot_forest`: each annotator's 90% posterior interval of ``eta_k`` with the
  posterior mean, and EM's estimate over it when given.
* :func:`plot_w`: the distribution of the per-label posterior ``w`` that a label
  is correct.
* :func:`plot_trace`: ArviZ trace plots of a few annotators' ``eta`` (divergences
  marked by ArviZ).
* :func:`plot_calibration`: the scorer's calibration curve: ``sigmoid(s)`` binned
  against the mean posterior probability that A is truly better.
* :func:`plot_trajectories`: EM's ``eta_k`` per iteration.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from repo.diagnostics import compat  # noqa: E402

MAX_ROWS = 60
"""Forest plots show at most this many annotators (those with the most labels)."""


def save(figure: plt.Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG and close it."""
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def plot_forest(
    annotators: pd.DataFrame, em: pd.DataFrame | None = None, title: str = ""
) -> plt.Figure:
    """90% intervals of ``eta_k`` (``eta_lo90``..``eta_hi90``, mean ``eta_mean``),
    with EM's ``eta`` as a cross when ``em`` is given (matched on ``id``)."""
    frame = annotators.sort_values("n_labels", ascending=False).head(MAX_ROWS)
    frame = frame.iloc[::-1].reset_index(drop=True)
    height = max(2.5, 0.22 * len(frame) + 1)
    figure, ax = plt.subplots(figsize=(6.5, height))
    y = np.arange(len(frame))
    ax.hlines(y, frame["eta_lo90"], frame["eta_hi90"], color="tab:blue", lw=2, label="90% interval")
    ax.plot(frame["eta_mean"], y, "o", color="tab:blue", ms=4, label="posterior mean")
    if em is not None:
        point = em.set_index("id")["eta"].reindex(frame["id"]).to_numpy()
        ax.plot(point, y, "x", color="tab:red", ms=6, label="EM estimate")
    labels = [f"{i} (n={n})" for i, n in zip(frame["id"], frame["n_labels"], strict=True)]
    ax.set_yticks(y, labels, fontsize=7 if len(frame) > 20 else 9)
    ax.set_xlabel("eta (probability that a label is correct)")
    ax.set_xlim(max(0.0, float(frame["eta_lo90"].min()) - 0.05), 1.0)
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.12 - 2.0 / height / 10), ncol=3, fontsize=8
    )
    ax.set_title(title or "Annotator reliability")
    return figure


def plot_w(labels: pd.DataFrame, title: str = "") -> plt.Figure:
    """Histogram of the per-label posterior ``w`` (log count scale)."""
    figure, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(labels["w"], bins=np.linspace(0, 1, 41), color="tab:purple")
    ax.set_yscale("log")
    ax.set_xlabel("w = p(label correct | data)")
    ax.set_ylabel("labels")
    flagged = float((labels["w"] < 0.5).mean())
    ax.set_title(title or f"Posterior of w ({flagged:.1%} of labels more likely wrong than right)")
    return figure


def plot_trace(idata, annotators: list[str]) -> plt.Figure:
    """Trace and density of ``eta`` for ``annotators`` (ArviZ)."""
    figure = compat.plot_trace(idata, "eta", {"annotator": annotators})
    figure.set_size_inches(9, 1.8 * len(annotators) + 0.5)
    figure.tight_layout()
    return figure


def calibration_curve(score: np.ndarray, truth: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Quantile bins of ``p = sigmoid(score)``: mean ``p`` against mean ``truth``
    (the posterior probability that A is better), with the count per bin."""
    p = 1 / (1 + np.exp(-score))
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    frame = pd.DataFrame({"bin": which, "predicted": p, "observed": truth})
    out = frame.groupby("bin").agg(
        predicted=("predicted", "mean"), observed=("observed", "mean"), count=("observed", "size")
    )
    return out.reset_index(drop=True)


def plot_calibration(curve: pd.DataFrame, title: str = "") -> plt.Figure:
    """Reliability diagram of the scorer from :func:`calibration_curve`."""
    figure, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    ax.plot(curve["predicted"], curve["observed"], "o-", color="tab:green", label="scorer")
    ax.set_xlabel("predicted p(A better) = sigmoid(s)")
    ax.set_ylabel("posterior p(A better | labels)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "Scorer calibration")
    return figure


def plot_trajectories(trajectory: pd.DataFrame, max_annotators: int = 20) -> plt.Figure:
    """``eta_k`` against EM iteration, for up to ``max_annotators`` annotators."""
    figure, ax = plt.subplots(figsize=(6.5, 3.5))
    names = list(dict.fromkeys(trajectory["annotator"]))[:max_annotators]
    for name in names:
        part = trajectory[trajectory["annotator"] == name]
        ax.plot(part["step"], part["eta"], lw=1, label=name)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("eta")
    if len(names) <= 8:
        ax.legend(fontsize=7)
    ax.set_title("EM trajectories of eta_k")
    return figure
