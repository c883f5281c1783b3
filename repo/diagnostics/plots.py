"""Figures for the diagnostics report (matplotlib, Agg backend: no display needed).

Each function draws one figure and returns it; :func:`save` writes a PNG. Figures
over annotators take the annotators to draw; the report pages through all of them
(:func:`pages`), worst first.

* :func:`plot_forest`: each annotator's 90% interval of ``eta_k`` with the point
  summary, EM's estimate over it when given, chance (0.5) and 1 marked.
* :func:`plot_forest_fits`: the same for several fits, side by side per annotator.
* :func:`plot_w`: the distribution of the per-label posterior ``w`` that a label
  is correct.
* :func:`plot_trace`: ArviZ trace plots of ``eta`` (divergences marked by ArviZ).
* :func:`plot_rank`: rank histograms of ``eta`` per chain, one panel per annotator
  (Vehtari et al., 2021): flat when the chains mix.
* :func:`plot_pareto_k`: PSIS-LOO's Pareto shape ``k`` of every unit, against the
  thresholds where the estimate becomes unreliable.
* :func:`plot_predictive`: posterior predictive checks: each annotator's observed
  agreement rate and label balance against the replicated 90% interval.
* :func:`plot_calibration`: the scorer's calibration curve: ``sigmoid(s)`` binned
  against the mean posterior probability that A is truly better.
* :func:`plot_trajectories`: EM's ``eta_k`` per iteration.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from collections.abc import Collection, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from repo.diagnostics import compat  # noqa: E402

FOREST_PAGE = 40
"""Annotators per forest-plot page."""

TRACE_PAGE = 6
"""Annotators per trace-plot page (one row each)."""

RANK_PAGE = 24
"""Annotators per rank-plot page (a grid of panels)."""

PREDICTIVE_ROWS = 40
"""Annotators in the predictive-check figure: the most extreme p-values."""

LABEL_LENGTH = 14
"""Annotator ids longer than this are shortened in tick labels (middle elided)."""

CHANCE = 0.5
"""``eta = 0.5``: an annotator no better than a coin."""

ZOOM_ABOVE = 0.75
"""Forest plots whose intervals all lie above this zoom in on them (0.5 would squash
them to slivers) and say that 0.5 is off the axis."""

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def save(figure: plt.Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG and close it."""
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def pages(items: Sequence, size: int) -> list[list]:
    """``items`` in consecutive pages of at most ``size``."""
    items = list(items)
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def short(name: object, length: int = LABEL_LENGTH) -> str:
    """``name`` as text, its middle elided when longer than ``length``."""
    text = str(name)
    if len(text) <= length:
        return text
    keep = length - 1
    return text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2 :]


def _eta_axis(ax, lowest: float) -> None:
    """x from below the lowest interval to just past 1 (a point at 1 drawn whole), with
    1 marked and chance (0.5) dashed; when every interval lies above
    :data:`ZOOM_ABOVE` the axis starts near them instead, and says where 0.5 is."""
    ax.axvline(1.0, color="grey", lw=0.8, ls=":", zorder=0)
    if lowest > ZOOM_ABOVE:
        ax.set_xlim(lowest - 0.15 * (1 - lowest) - 0.005, 1 + 0.05 * (1 - lowest) + 0.002)
        ax.set_xlabel("eta (probability that a label is correct; 0.5, a coin, is off to the left)")
        return
    ax.axvline(CHANCE, color="grey", lw=1, ls="--", zorder=0)
    ax.set_xlim(max(-0.02, min(CHANCE, lowest) - 0.04), 1.02)
    ax.set_xlabel("eta (probability that a label is correct; dashed: 0.5, a coin)")


def _tick_labels(frame: pd.DataFrame) -> list[str]:
    return [f"{short(i)} ({n})" for i, n in zip(frame["id"], frame["n_labels"], strict=True)]


def plot_forest(
    annotators: pd.DataFrame,
    em: pd.DataFrame | None = None,
    title: str = "",
    flagged: Collection[str] = (),
) -> plt.Figure:
    """90% intervals of ``eta_k`` (``eta_lo90``..``eta_hi90``) with the point summary
    ``eta`` (the posterior mean for NUTS and SVI, the estimate for EM and MAP), and
    EM's ``eta`` as a cross when ``em`` is given (matched on ``id``). Rows in the
    order given, the first at the top; tick labels ``id (labels)``. Annotators in
    ``flagged`` (named by a warning) are drawn in orange, their label marked ``!``."""
    frame = annotators.iloc[::-1].reset_index(drop=True)
    height = max(2.6, 0.24 * len(frame) + 1.3)
    figure, ax = plt.subplots(figsize=(6.5, height))
    y = np.arange(len(frame))
    bad = frame["id"].astype(str).isin(set(map(str, flagged))).to_numpy()
    for rows, colour, label in ((~bad, "tab:blue", "90% interval"), (bad, "tab:orange", None)):
        if rows.any():
            ax.hlines(
                y[rows], frame["eta_lo90"][rows], frame["eta_hi90"][rows], color=colour, lw=2,
                label=label,
            )  # fmt: skip
            ax.plot(frame["eta"][rows], y[rows], "o", color=colour, ms=4, clip_on=False)
    ax.plot([], [], "o", color="tab:blue", ms=4, label="point summary")
    if bad.any():
        ax.plot([], [], "o-", color="tab:orange", ms=4, label="! named in a warning")
    if em is not None:
        point = em.set_index("id")["eta"].reindex(frame["id"]).to_numpy()
        ax.plot(point, y, "x", color="tab:red", ms=6, label="EM estimate", clip_on=False)
    labels = [f"! {t}" if b else t for t, b in zip(_tick_labels(frame), bad, strict=True)]
    ax.set_yticks(y, labels, fontsize=7 if len(frame) > 20 else 9)
    for tick, b in zip(ax.get_yticklabels(), bad, strict=True):
        if b:
            tick.set_color("tab:orange")
    ax.set_ylim(-0.7, len(frame) - 0.3)
    ax.set_ylabel("annotator (labels)")
    _eta_axis(ax, float(np.nanmin(frame["eta_lo90"])) if len(frame) else CHANCE)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    ax.set_title(title or "Annotator reliability", pad=22)
    return figure


def plot_forest_fits(
    fits: Mapping[str, pd.DataFrame], ids: Sequence[str], title: str = ""
) -> plt.Figure:
    """90% intervals of ``eta_k`` of several fits (name -> annotators table), one
    colour per fit, side by side for each annotator in ``ids`` (top first)."""
    names = list(fits)
    order = list(ids)[::-1]
    height = max(2.8, 0.22 * len(order) * max(1, len(names)) * 0.6 + 1.5)
    figure, ax = plt.subplots(figsize=(7, height))
    offsets = np.linspace(0.3, -0.3, len(names)) if len(names) > 1 else np.zeros(1)
    lowest = CHANCE
    for j, name in enumerate(names):
        frame = fits[name].assign(id=fits[name]["id"].astype(str)).set_index("id").reindex(order)
        y = np.arange(len(order)) + offsets[j]
        colour = COLOURS[j % len(COLOURS)]
        ax.hlines(y, frame["eta_lo90"], frame["eta_hi90"], color=colour, lw=1.8, label=name)
        ax.plot(frame["eta"], y, "o", color=colour, ms=3, clip_on=False)
        lowest = min(lowest, float(np.nanmin(frame["eta_lo90"])))
    first = fits[names[0]].assign(id=fits[names[0]]["id"].astype(str)).set_index("id")
    counts = first["n_labels"].reindex(order).tolist()
    ax.set_yticks(
        np.arange(len(order)),
        [f"{short(i)} ({n})" for i, n in zip(order, counts, strict=True)],
        fontsize=7 if len(order) > 20 else 9,
    )
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.set_ylabel("annotator (labels)")
    _eta_axis(ax, lowest)
    ax.legend(
        loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(3, len(names)), fontsize=8,
        frameon=False,
    )  # fmt: skip
    rows = -(-len(names) // 3)
    ax.set_title(title or "eta_k: 90% intervals of each fit", pad=12 + 12 * rows)
    return figure


def plot_w(labels: pd.DataFrame, title: str = "") -> plt.Figure:
    """Histogram of the per-label posterior ``w`` (log count scale)."""
    figure, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(labels["w"], bins=np.linspace(0, 1, 41), color="tab:purple")
    ax.set_yscale("log")
    ax.axvline(0.5, color="grey", lw=1, ls="--")
    ax.set_xlabel("w = p(label correct | data)")
    ax.set_ylabel("labels (log scale)")
    flagged = float((labels["w"] < 0.5).mean())
    ax.set_title(title or f"Posterior of w ({flagged:.1%} of labels more likely wrong than right)")
    return figure


def plot_trace(idata, annotators: list[str], title: str = "") -> plt.Figure:
    """Density (left) and trace (right) of ``eta`` per chain for ``annotators`` (ArviZ)."""
    figure = compat.plot_trace(idata, "eta", {"annotator": annotators})
    figure.set_size_inches(9, 1.8 * len(annotators) + 0.6)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_rank(
    draws: np.ndarray,
    annotators: Sequence[str],
    statistics: Mapping[str, Sequence[float]] | None = None,
    bins: int | None = None,
    title: str = "",
) -> plt.Figure:
    """Rank plots: for each annotator the ranks of its ``(chain, draw)`` draws among
    all chains' draws, histogram per chain (Vehtari et al., 2021). Well-mixed chains
    give flat histograms at the dashed uniform height; a chain above or below it
    over a range of ranks samples another region.

    :param draws: ``(chains, draws, A)`` draws of the ``A`` annotators drawn.
    :param statistics: per panel title suffixes, e.g. ``{"r_hat": [...]}``.
    :param bins: rank bins (default: about 25 draws of a chain per bin, 5 to 20 bins).
    """
    from scipy.stats import rankdata

    chains, num_draws, count = draws.shape
    columns = min(4, max(1, count))
    rows = -(-count // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, 1.9 * rows + 0.6), squeeze=False, sharey=True
    )
    bins = bins or int(np.clip(num_draws // 25, 5, 20))
    edges = np.linspace(0, chains * num_draws, bins + 1)
    expected = num_draws / bins
    for a, ax in enumerate(axes.ravel()):
        if a >= count:
            ax.axis("off")
            continue
        ranks = rankdata(draws[:, :, a].ravel()).reshape(chains, num_draws)
        for c in range(chains):
            height, _ = np.histogram(ranks[c], bins=edges)
            colour = COLOURS[c % len(COLOURS)]
            ax.stairs(height, edges, baseline=None, color=colour, lw=1.2, label=f"chain {c}")
        ax.axhline(expected, color="grey", ls="--", lw=1)
        label = short(annotators[a], 18)
        for key, values in (statistics or {}).items():
            label += f"  {key} {values[a]:.3f}"
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
        if a >= count - columns:
            ax.set_xlabel("rank among all chains' draws", fontsize=7)
    axes[0, 0].set_ylabel("draws per rank bin", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=chains, fontsize=8, frameon=False)
    figure.suptitle(title or "Rank plots of eta_k (flat = chains agree)", fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure


def plot_pareto_k(
    pareto_k: np.ndarray, good_k: float = 0.7, unit: str = "unit", title: str = ""
) -> plt.Figure:
    """PSIS-LOO's Pareto ``k`` per unit, in unit order: below ``good_k`` (0.7, less
    for few draws) the unit's ``elpd`` term is reliable, above it not, above 1 the
    importance sampling fails. ``k = inf`` (an unfittable tail) is drawn at the top."""
    k = np.asarray(pareto_k, dtype=np.float64)
    shown = np.where(np.isfinite(k), k, np.nan)
    top = max(1.2, float(np.nanmax(shown)) + 0.1 if np.isfinite(shown).any() else 1.2)
    shown = np.where(np.isfinite(k), k, top)
    bad = k > good_k
    figure, ax = plt.subplots(figsize=(6.5, 3.2))
    x = np.arange(k.size)
    ax.scatter(x[~bad], shown[~bad], s=6, color="tab:blue", label=f"k <= {good_k:.2f}")
    ax.scatter(x[bad], shown[bad], s=14, color="tab:red", marker="x", label=f"k > {good_k:.2f}")
    for level, style, meaning in (
        (good_k, "--", f"{good_k:.2f}: reliable below (for this many draws)"),
        (1.0, "-", "1: importance sampling fails above"),
    ):
        ax.axhline(level, color="grey", ls=style, lw=1, label=meaning)
    ax.set_xlabel(unit)
    ax.set_ylabel("Pareto k")
    ax.set_ylim(min(-0.1, float(np.nanmin(shown)) - 0.05), top + 0.05)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(
        title or f"PSIS-LOO Pareto k: {int(bad.sum())} of {k.size} {unit}s above {good_k:.2f}"
    )
    return figure


def plot_predictive(checks: pd.DataFrame, title: str = "") -> plt.Figure:
    """Posterior predictive checks (:func:`~repo.diagnostics.summary.predictive_checks`):
    for the pooled labels (``all``, top) and each annotator drawn, the replicated 90%
    interval of the statistic and the observed value, red when its p-value is below
    0.05 or above 0.95. Up to :data:`PREDICTIVE_ROWS` annotators, the most extreme first."""
    statistics = ["agreement", "balance"]
    per = checks[~checks.pooled].copy()
    extremity = per.assign(e=(per.p_value - 0.5).abs()).groupby("annotator")["e"].max()
    chosen = extremity.sort_values(ascending=False).index[:PREDICTIVE_ROWS].tolist()
    order = ["all", *chosen]
    height = max(2.6, 0.24 * len(order) + 1.4)
    figure, axes = plt.subplots(1, 2, figsize=(9, height), sharey=True)
    y = np.arange(len(order))[::-1]
    for ax, statistic in zip(axes, statistics, strict=True):
        rows = checks[checks.statistic == statistic].set_index("annotator")
        part = pd.concat(  # the pooled row, then the chosen annotators' (one may be "all")
            [rows[rows.pooled], rows[~rows.pooled].reindex(chosen)]
        )
        extreme = (part.p_value < 0.05) | (part.p_value > 0.95)
        ax.hlines(y, part.replicated_lo90, part.replicated_hi90, color="tab:grey", lw=3, alpha=0.6)
        ax.plot(part.observed[~extreme], y[~extreme.to_numpy()], "o", color="tab:blue", ms=4)
        ax.plot(part.observed[extreme], y[extreme.to_numpy()], "o", color="tab:red", ms=5)
        ax.set_xlabel(
            "agreement rate" if statistic == "agreement" else "label balance (share saying A)"
        )
        ax.set_title(statistic, fontsize=9)
    axes[0].set_yticks(y, [short(name) for name in order], fontsize=7 if len(order) > 20 else 9)
    more = len(extremity) - len(chosen)
    note = f" ({len(chosen)} most extreme of {len(extremity)} annotators)" if more > 0 else ""
    figure.suptitle(
        f"{title or 'Posterior predictive checks'}{note}\nobserved (dot; red: p < 0.05 or "
        "> 0.95) against the replicated 90% interval (bar)",
        fontsize=9,
    )
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
    names = list(dict.fromkeys(trajectory["annotator"]))
    shown = names[:max_annotators]
    for name in shown:
        part = trajectory[trajectory["annotator"] == name]
        ax.plot(part["step"], part["eta"], lw=1, label=short(name))
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("eta")
    if len(shown) <= 8:
        ax.legend(fontsize=7)
    more = f" (first {len(shown)} of {len(names)} annotators)" if len(names) > len(shown) else ""
    ax.set_title(f"EM trajectories of eta_k{more}")
    return figure
