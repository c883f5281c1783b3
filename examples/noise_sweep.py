"""Held-out accuracy and calibration of eleven preference methods as the label-flip rate grows.

Experiment 1 of ``docs/experiments/noise-sweep.md``. The tiny model
(``models/tiny-llama``, full fine-tuning) learns the rule of
:mod:`repo.data.rule_pairs` (the better response carries a "good" marker word)
from labels flipped at rate rho = 0, 0.2, 0.4, and is scored on held-out pairs
against their clean labels: accuracy of ``sign(s)``, and log loss and expected
calibration error (15 equal-width bins) of ``sigmoid(s)``, ``s`` the loss family's
induced logit. Methods: DPO, cDPO (label smoothing), rDPO (told the true flip
rate), Hölder-DPO (a redescending loss that ignores contradicted pairs), and IPO,
SimPO, CPO - each of DPO, IPO, SimPO and CPO also with RE-PO (EM over the
annotators' reliabilities) with ``[em] enabled = true`` and every other E-step field
at its default, as a user gets it (the settings each run resolved to are columns of
the CSV; a cross-fitted run's ``scorer_accuracy`` is the share of its training pairs
whose cross-fitted score's sign is the true preference). Two kinds of noise:

* ``single``: one annotator (K = 1) flips every label with probability rho;
* ``pool``: four annotators flip with probabilities 0, rho/2, 3 rho/2, 2 rho
  (mean rho; at rho = 0.4 two of them flip more often than not), and RE-PO is
  told who labelled what.

At rho = 0 both kinds are the same clean data, run once. Every seed draws its own
training and held-out pairs; at one seed all methods and flip rates see the same
pairs (the flipped labels at rho = 0.2 are a subset of those at 0.4), so
differences between methods are paired. Two training regimes: ``--epochs 1`` (one
pass: every E-step is out of sample) and the default four epochs.

    python examples/noise_sweep.py --out docs/experiments              # four epochs
    python examples/noise_sweep.py --epochs 1 --out docs/experiments   # one pass
    python examples/noise_sweep.py --quick --out /tmp/noise-sweep       # a small grid
    python examples/noise_sweep.py --replot --out docs/experiments     # table, figure from CSV
    python examples/noise_sweep.py --targets --out docs/experiments    # both regimes, targets
    python examples/noise_sweep.py --hh-rlhf --out docs/experiments    # SmolLM2 on HH-RLHF

The grid writes ``noise-sweep.csv`` (one row a run), ``noise-sweep-table.md`` and
``noise-sweep.png`` (``-epochs1`` before the suffix for one pass; ``--pairs N``, the
training pairs per seed, 512 without it, puts ``-pairsN`` before that); ``--settings``
runs a part of the grid and ``--append`` keeps the CSV's rows and skips the runs
already in it (so several processes can share a grid); ``--targets`` writes
``noise-sweep-targets.md`` from the two regimes' CSVs (RE-X against X and eta against
the realised reliability, per regime, setting and family); ``--hh-rlhf`` writes
``noise-sweep-hh-rlhf.json``. Progress goes to stderr; the last line printed is one
JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from repo.data.loaders import load_preferences
from repo.data.rule_pairs import rule_pairs, true_preferences
from repo.experiments import (
    Method,
    annotator_pool,
    method_from_text,
    scorer_accuracy,
    t_interval,
    train_and_score,
)

BETA = {"dpo": 0.3, "ipo": 0.1, "simpo": 2.0, "cpo": 1.0}
"""beta per family (DPO's also for cDPO, rDPO and Hölder-DPO); see the docs page for how chosen."""
CDPO_EPSILON = 0.1
HOLDER_GAMMA = 1.0
"""Hölder-DPO's exponent: the family's default (the Brier case), not tuned."""
MARKERS = 4
HELD_OUT = 500
EPOCHS = 4
"""Passes over the data of the default regime (``--epochs 1`` is the one-pass regime)."""
SETTINGS = (("single", 0.2), ("single", 0.4), ("single", 0.0), ("pool", 0.4), ("pool", 0.2))
"""Noise settings in the order they are run (most wanted first)."""
COLUMNS = ("clean", "K=1 0.2", "K=1 0.4", "pool 0.2", "pool 0.4")
"""Table columns, in the order shown."""
FAMILIES = ("dpo", "ipo", "simpo", "cpo")
PLAIN_NAMES = {"dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "cpo": "CPO"}


def methods(flip_rate: float) -> list[Method]:
    """The eleven methods at mean flip rate ``flip_rate`` (rDPO is told it). RE-PO runs
    with ``[em]`` as a user gets it with ``enabled = true``: every E-step field at its
    default (:func:`repo.train.build.estep_settings`)."""
    out = [
        Method("DPO", "dpo", False, {"beta": BETA["dpo"]}),
        Method("cDPO", "cdpo", False, {"beta": BETA["dpo"], "epsilon": CDPO_EPSILON}),
        Method("rDPO", "rdpo", False, {"beta": BETA["dpo"], "epsilon": flip_rate}),
        Method("Hölder-DPO", "holder_dpo", False, {"beta": BETA["dpo"], "gamma": HOLDER_GAMMA}),
    ]
    for family in FAMILIES:
        loss = {"beta": BETA[family]}
        if family != "dpo":
            out.append(Method(PLAIN_NAMES[family], family, False, loss))
        out.append(Method("RE-" + PLAIN_NAMES[family], family, True, loss))
    return out


def variant(text: str, flip_rate: float) -> Method:
    """A method of :func:`methods` with fields of its sections set, named by ``text``:
    ``"RE-CPO em.epoch_m_step=true"`` is RE-CPO with ``[em] epoch_m_step = true``
    (:func:`repo.experiments.method_from_text`). Its runs are paired with the plain loss of
    the first word (:func:`plain_name`)."""
    return method_from_text(text, {m.name: m for m in methods(flip_rate)})


@dataclass
class Grid:
    """What to run: noise settings, seeds, data sizes and the optimizer's fields."""

    settings: tuple[tuple[str, float], ...] = SETTINGS
    seeds: tuple[int, ...] = tuple(range(10, 20))
    num_pairs: int = 512
    held_out: int = HELD_OUT
    optim: dict = dataclasses.field(default_factory=lambda: {"epochs": EPOCHS})
    only: tuple[str, ...] = ()  # method names to run (empty: all of them)


QUICK = Grid(
    settings=(("single", 0.0), ("single", 0.4)),
    seeds=(10, 11),
    num_pairs=128,
    held_out=100,
    optim={"epochs": 3},
)


def annotator_etas(noise: str, flip_rate: float) -> list[float]:
    """The annotators' true reliabilities of a noise setting."""
    if noise == "single":
        return [1.0 - flip_rate]
    if noise == "pool":
        return annotator_pool(flip_rate)
    raise ValueError(f"unknown noise {noise!r}: single or pool")


def _done_runs(csv_path: Path | None) -> set[tuple[str, float, int, str]]:
    """``(noise, flip_rate, seed, method)`` of the runs already in ``csv_path``."""
    if csv_path is None or not csv_path.exists() or csv_path.stat().st_size == 0:
        return set()
    old = pd.read_csv(csv_path)
    return {
        (n, float(r), int(s), m)
        for n, r, s, m in zip(old.noise, old.flip_rate, old.seed, old.method, strict=True)
    }


SECOND_TIER = ("cDPO", "rDPO")
"""Methods run after all the others, setting by setting (the first to go when time is short)."""


def _append_row(csv_path: Path, row: dict) -> None:
    """Append ``row`` to ``csv_path`` in the file's own column order, or start the file
    with ``row``'s columns. A column the file lacks (a CSV from before the column was
    added) is added after its own, blank in its earlier rows; the file is rewritten
    then."""
    frame = pd.DataFrame([row])
    if csv_path.exists() and csv_path.stat().st_size > 0:
        columns = list(pd.read_csv(csv_path, nrows=0).columns)
        if set(frame.columns) <= set(columns):
            frame = frame.reindex(columns=columns)
            frame.to_csv(csv_path, mode="a", header=False, index=False)
            return
        old = pd.read_csv(csv_path, dtype=str, keep_default_na=False)  # rows as written
        columns += [c for c in frame.columns if c not in columns]
        frame = pd.concat([old, frame], ignore_index=True).reindex(columns=columns)
    frame.to_csv(csv_path, index=False)


def run_order(grid: Grid) -> list[tuple[tuple[str, float], list[str]]]:
    """``(setting, method names)`` in the order they are run: every setting with all
    but the :data:`SECOND_TIER` methods, then every setting with those (``grid.only``:
    these methods alone)."""
    order = []
    variants = [name for name in grid.only if " " in name]
    for tier in (False, True):
        for noise, rho in grid.settings:
            names = [
                m.name
                for m in methods(rho)
                if (m.name in SECOND_TIER) == tier and (not grid.only or m.name in grid.only)
            ] + ([] if tier else variants)
            if names:
                order.append(((noise, rho), names))
    return order


def run_grid(
    grid: Grid, csv_path: Path | None = None, reference_cache_dir: Path | None = None
) -> pd.DataFrame:
    """Train and score every method on every setting and seed; one row a run.

    Runs go in :func:`run_order`, all seeds of a setting before the next, so a grid
    cut short has every seed of its first settings. Rows are appended to ``csv_path``
    as runs finish (a crash loses one run); runs already there are skipped, and the
    frame returned holds the new rows only. ``reference_cache_dir`` keeps reference
    log-probs between runs (see :func:`repo.experiments.train_and_score`).
    """
    rows = []
    done_before = _done_runs(csv_path)
    order = run_order(grid)
    total = sum(len(names) for _, names in order) * len(grid.seeds)
    done = 0
    start = time.perf_counter()
    epochs = int(grid.optim.get("epochs", 2))
    held_outs: dict[int, list[dict]] = {}
    for (noise, rho), names in order:
        known = {m.name: m for m in methods(rho)}
        by_name = {name: method_from_text(name, known) for name in names}
        for seed in grid.seeds:
            if seed not in held_outs:
                held_outs[seed] = rule_pairs(
                    grid.held_out, [1.0], seed=10_000 + seed, markers=MARKERS
                ).rows
            data = rule_pairs(
                grid.num_pairs, annotator_etas(noise, rho), seed=seed, markers=MARKERS
            )
            records = load_preferences(data.rows, annotator_column="annotator")
            truth = true_preferences(data.rows, [r.label for r in records])
            for name in names:
                method = by_name[name]
                done += 1
                if (noise, float(rho), seed, method.name) in done_before:
                    continue
                result = train_and_score(
                    records,
                    held_outs[seed],
                    method,
                    seed=seed,
                    optim=grid.optim,
                    reference_cache_dir=reference_cache_dir,
                )
                eta_hat = [result.eta[f"a{k}"] for k in range(len(data.eta))] if result.eta else []
                test = result.noise_test
                crossed = result.cross_fit_logits
                row = {
                    "noise": noise,
                    "flip_rate": rho,
                    "seed": seed,
                    "epochs": epochs,
                    "method": method.name,
                    "family": method.family,
                    "re_po": method.robust,
                    "temperature": result.estep.temperature if result.estep else None,
                    "calibrate": result.estep.calibrate if result.estep else None,
                    "out_of_sample": result.estep.out_of_sample if result.estep else None,
                    "noise_test": result.estep.noise_test if result.estep else None,
                    "epoch_m_step": result.estep.epoch_m_step if result.estep else None,
                    "held_out": result.estep.held_out if result.estep else None,
                    "cross_fit": result.estep.cross_fit if result.estep else None,
                    "cross_fit_scorer": result.estep.cross_fit_scorer if result.estep else None,
                    "cross_fit_folds": result.estep.cross_fit_folds if result.estep else None,
                    "policy_calibrate": result.estep.policy_calibrate if result.estep else None,
                    "scorer_accuracy": None if crossed is None else scorer_accuracy(crossed, truth),
                    "noise_evident": test.rejected if test else None,
                    "noise_test_items": test.items if test else None,
                    "noise_test_p": round(test.p_value, 6) if test else None,
                    "accuracy": result.accuracy,
                    "log_loss": round(result.log_loss, 5),
                    "ece": round(result.ece, 5),
                    "realised_flip_rate": data.flip_rate,
                    "eta_true": json.dumps([round(float(e), 4) for e in data.realised_eta]),
                    "eta_hat": json.dumps([round(e, 4) for e in eta_hat]),
                    "eta_low": result.eta_interval[0] if result.eta_interval else None,
                    "eta_high": result.eta_interval[1] if result.eta_interval else None,
                    "steps": result.steps,
                    "wall_s": round(result.wall_seconds, 2),
                    "cpu_s": round(result.cpu_seconds, 2),
                }
                rows.append(row)
                if csv_path is not None:
                    _append_row(csv_path, row)
                elapsed = time.perf_counter() - start
                print(
                    f"[{done}/{total}] {noise} rho={rho} seed={seed} {method.name}: "
                    f"acc {result.accuracy:.3f} log loss {result.log_loss:.3f} "
                    f"ece {result.ece:.3f}"
                    + (f" eta {np.round(eta_hat, 3).tolist()}" if eta_hat else "")
                    + f" ({result.wall_seconds:.1f} s; {elapsed / 60:.1f} min so far)",
                    file=sys.stderr,
                    flush=True,
                )
    return pd.DataFrame(rows)


def complete(frame: pd.DataFrame, min_seeds: int) -> pd.DataFrame:
    """The rows of the (setting, method) cells run at ``min_seeds`` seeds or more (a grid
    cut short leaves cells with fewer; tables and figures can leave them out)."""
    if min_seeds <= 1 or frame.empty:
        return frame
    counts = frame.groupby(["noise", "flip_rate", "method"]).seed.transform("nunique")
    return frame[counts >= min_seeds]


def setting_label(noise: str, rho: float) -> str:
    """A column name: ``clean`` (rho = 0, shared by both kinds), ``K=1 0.2``, ``pool 0.2``."""
    if rho == 0:
        return "clean"
    return f"{'K=1' if noise == 'single' else 'pool'} {rho:g}"


def _columns(settings) -> list[str]:
    present = set(settings)
    return [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))


def summarise(frame: pd.DataFrame, measure: str = "accuracy") -> pd.DataFrame:
    """Mean of ``measure`` (``accuracy``, ``log_loss``, ``ece``) and the 95% t-interval
    half-width per setting and method."""
    out = []
    for (noise, rho, method), group in frame.groupby(["noise", "flip_rate", "method"], sort=False):
        mean, half = t_interval(group[measure].to_numpy())
        out.append(
            {
                "noise": noise,
                "flip_rate": rho,
                "setting": setting_label(noise, rho),
                "method": method,
                "seeds": len(group),
                "mean": mean,
                "half_width": half,
            }
        )
    return pd.DataFrame(out)


def plain_name(method: str) -> str:
    """The plain loss an RE-PO method (or a :func:`variant` of one) is compared with:
    ``RE-DPO`` -> ``DPO``, ``RE-CPO em.epoch_m_step=true`` -> ``CPO``."""
    return method.split()[0].removeprefix("RE-")


def paired_gains(frame: pd.DataFrame, measure: str = "accuracy") -> pd.DataFrame:
    """Every RE-PO method minus its plain loss, per setting: mean of the per-seed
    differences of ``measure`` (same data) and its 95% t-interval half-width."""
    out = []
    robust_names = list(dict.fromkeys(frame[frame.re_po].method))
    for (noise, rho), group in frame.groupby(["noise", "flip_rate"], sort=False):
        for name in robust_names:
            plain = group[group.method == plain_name(name)].set_index("seed")[measure]
            robust = group[group.method == name].set_index("seed")[measure]
            diff = (robust - plain).dropna()
            if diff.empty:
                continue
            mean, half = t_interval(diff.to_numpy())
            out.append(
                {
                    "noise": noise,
                    "flip_rate": rho,
                    "setting": setting_label(noise, rho),
                    "method": name,
                    "family": plain_name(name),
                    "seeds": len(diff),
                    "mean": mean,
                    "half_width": half,
                }
            )
    return pd.DataFrame(out)


def eta_errors(group: pd.DataFrame) -> np.ndarray:
    """Per run: mean over annotators of |learned eta - realised share of correct labels|."""
    hat = np.array([json.loads(x) for x in group.eta_hat])
    true = np.array([json.loads(x) for x in group.eta_true])
    return np.abs(hat - true).mean(axis=1)


def eta_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """RE-PO runs: learned reliabilities against the realised ones (means over seeds),
    and the mean absolute error with its 95% t-interval half-width over seeds."""
    out = []
    robust = frame[frame.re_po]
    for (noise, rho, method), group in robust.groupby(["noise", "flip_rate", "method"], sort=False):
        hat = np.array([json.loads(x) for x in group.eta_hat])
        true = np.array([json.loads(x) for x in group.eta_true])
        mae, half = t_interval(eta_errors(group))
        out.append(
            {
                "noise": noise,
                "flip_rate": rho,
                "setting": setting_label(noise, rho),
                "method": method,
                "seeds": len(group),
                "eta_true": np.round(true.mean(axis=0), 3).tolist(),
                "eta_hat": np.round(hat.mean(axis=0), 3).tolist(),
                "mean_abs_error": mae,
                "mae_half_width": half,
            }
        )
    return pd.DataFrame(out)


def _cell(mean: float, half: float, signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    if math.isnan(half):
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {half:.3f}"


def _grid_table(table: pd.DataFrame, key: str, columns: list[str], signed: bool) -> list[str]:
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in dict.fromkeys(table[key]):
        cells = []
        for col in columns:
            match = table[(table[key] == name) & (table.setting == col)]
            if match.empty:
                cells.append("")
                continue
            r = match.iloc[0]
            seeds = "" if r.seeds == table.seeds.max() else f" ({int(r.seeds)} seeds)"
            cells.append(_cell(r["mean"], r.half_width, signed) + seeds)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


MEASURES = {
    "accuracy": "Held-out accuracy against clean labels",
    "log_loss": "Held-out log loss of sigmoid(s) against clean labels (nats)",
    "ece": "Held-out expected calibration error of sigmoid(s) (15 equal-width bins)",
}


def markdown_tables(frame: pd.DataFrame) -> str:
    """Accuracy, log loss and ECE tables, RE-PO minus the plain loss (accuracy and log
    loss), and the reliability table, in Markdown."""
    epochs = sorted(int(e) for e in frame.epochs.unique()) if "epochs" in frame else []
    regime = ""
    if epochs:
        regime = " - " + ", ".join("one pass" if e == 1 else f"{e} epochs" for e in epochs)
    lines: list[str] = []
    for measure, title in MEASURES.items():
        summary = summarise(frame, measure)
        columns = _columns(summary.setting)
        lines += [
            f"{title} (mean ± 95% t-interval half-width over "
            f"{int(summary.seeds.max())} seeds{regime}):",
            "",
            *_grid_table(summary, "method", columns, signed=False),
            "",
        ]
    for measure in ("accuracy", "log_loss"):
        gains = paired_gains(frame, measure)
        if gains.empty:
            continue
        lines += [
            f"RE-PO minus the plain loss, {measure.replace('_', ' ')} (paired by seed; "
            "mean ± 95% t-interval half-width):",
            "",
            *_grid_table(gains, "method", _columns(gains.setting), signed=True),
            "",
        ]
    etas = eta_summary(frame)
    if not etas.empty:
        lines += [
            "Learned reliabilities of the RE-PO runs (means over seeds; true = realised share "
            "of correct labels per annotator; error: mean over seeds of the mean absolute "
            "error over annotators ± 95% t-interval half-width):",
            "",
            "| method | setting | true eta | learned eta | mean abs. error |",
            "|---|---|---|---|---|",
        ]
        order = {c: i for i, c in enumerate(COLUMNS)}
        etas = etas.assign(_o=etas.setting.map(order)).sort_values("_o", kind="stable")
        for _, r in etas.iterrows():
            fmt = ", ".join(f"{x:.3f}" for x in r.eta_true)
            hat = ", ".join(f"{x:.3f}" for x in r.eta_hat)
            lines.append(
                f"| {r.method} | {r.setting} | {fmt} | {hat} | "
                f"{_cell(r.mean_abs_error, r.mae_half_width)} |"
            )
    return "\n".join(lines).rstrip("\n") + "\n"


ETA_TARGET = 0.03
"""Issue 11's target for learned eta with one annotator: mean absolute error against the
realised share of correct labels at most this."""


def targets_table(regimes: dict[str, pd.DataFrame]) -> str:
    """Per regime, setting and family: RE-X minus X (accuracy, paired by seed), learned
    eta's mean absolute error, the E-step the defaults resolved to, and which of the
    targets hold: RE-X not below X (the 95% interval of the difference not below zero),
    above it (the interval above zero), eta within :data:`ETA_TARGET` (one annotator)."""
    lines = [
        "RE-X (`[em]` at its defaults) minus X, held-out accuracy (paired by seed, mean ± "
        "95% t half-width); learned eta's mean absolute error against the realised share "
        "of correct labels (mean ± 95% t half-width over seeds); the E-step the defaults "
        "resolved to (T: temperature; learned: the logits' scale learned; oos: annotator "
        "statistics from first visits; test: the noise test's level; refit: EM on each "
        "epoch's scores at its end; held out: the share of items held out for the refit; "
        "cross-fit: the E-step reads cross-fitted scores, by dpo: of scorers trained by "
        "DPO) and in how many runs "
        "the noise test switched the posterior on (`on`); where the runs recorded it, the "
        "95% profile-likelihood interval of eta at the scores it was refitted on "
        "(`eta_low`, `eta_high`): in how many runs it holds the realised share, and its "
        "median width (an interval as wide as [0.5, 1] says those scores do not "
        "identify eta). Targets: `not below` = the interval of RE-X - X "
        f"is not below zero, `above` = it is above zero, `eta` = MAE at most {ETA_TARGET} "
        "(one annotator).",
        "",
        "| regime | setting | family | seeds | E-step | on | RE-X - X | eta MAE "
        "| eta interval | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, frame in regimes.items():
        gains = paired_gains(frame)
        etas = eta_summary(frame)
        for col in COLUMNS:
            for family in FAMILIES:
                name = "RE-" + PLAIN_NAMES[family]
                gain = gains[(gains.method == name) & (gains.setting == col)]
                eta = etas[(etas.method == name) & (etas.setting == col)]
                if gain.empty:
                    continue
                g = gain.iloc[0]
                half = 0.0 if math.isnan(g.half_width) else g.half_width  # one seed: the mean
                low, high = g["mean"] - half, g["mean"] + half
                met = ["not below" if high >= 0 else "**below**"]
                if low > 0:
                    met.append("above")
                eta_cell = ""
                if not eta.empty:
                    e = eta.iloc[0]
                    eta_cell = _cell(e.mean_abs_error, e.mae_half_width)
                    if col.startswith("K=1") or col == "clean":
                        met.append("eta" if e.mean_abs_error <= ETA_TARGET else "**not eta**")
                lines.append(
                    f"| {regime} | {col} | {PLAIN_NAMES[family]} | {int(g.seeds)} | "
                    f"{estep_label(frame, name, col)} | {switched_on(frame, name, col)} | "
                    f"{_cell(g['mean'], g.half_width, True)} | "
                    f"{eta_cell} | {interval_cell(frame, name, col)} | {', '.join(met)} |"
                )
    return "\n".join(lines) + "\n"


def interval_cell(frame: pd.DataFrame, method: str, setting: str) -> str:
    """Over ``method``'s runs in ``setting`` that recorded the profile interval of one
    annotator's eta (``eta_low``, ``eta_high``): ``"k/n hold, width w"``, k the runs
    whose interval holds the realised share, w the median width; empty where none did
    (runs from before the columns, or without one annotator)."""
    if "eta_low" not in frame:
        return ""
    rows = _runs(frame, method, setting)
    rows = rows[rows.eta_low.notna() & rows.eta_high.notna()]
    if rows.empty:
        return ""
    true = np.array([json.loads(x)[0] for x in rows.eta_true])
    low, high = rows.eta_low.to_numpy(float), rows.eta_high.to_numpy(float)
    hold = int(((low <= true) & (true <= high)).sum())
    return f"{hold}/{len(rows)} hold, width {float(np.median(high - low)):.2f}"


def estep_label(frame: pd.DataFrame, method: str, setting: str) -> str:
    """The E-step settings ``method``'s runs resolved to in ``setting``: ``T=20 learned
    oos``, ``T=1 learned (policy s/T)`` (the policy step's posterior at ``s / T``),
    ``cross-fit test 0.05``, ``cross-fit 4 folds`` (``[em] cross_fit_folds`` other than
    2), ``cross-fit by dpo`` (scorers of another family;
    several, joined by ``/``, if runs differ)."""
    rows = _runs(frame, method, setting)
    labels = []
    tests = rows.noise_test if "noise_test" in rows else [math.nan] * len(rows)
    refits = rows.epoch_m_step if "epoch_m_step" in rows else [False] * len(rows)
    held = rows.held_out if "held_out" in rows else [0.0] * len(rows)
    crossed = rows.cross_fit if "cross_fit" in rows else [False] * len(rows)
    scorers = rows.cross_fit_scorer if "cross_fit_scorer" in rows else [""] * len(rows)
    policy = rows.policy_calibrate if "policy_calibrate" in rows else [True] * len(rows)
    folds = rows.cross_fit_folds if "cross_fit_folds" in rows else [2] * len(rows)
    for t, calibrate, oos, level, refit, share, cross, scorer, family, whole, k in zip(
        rows.temperature,
        rows.calibrate,
        rows.out_of_sample,
        tests,
        refits,
        held,
        crossed,
        scorers,
        rows.family,
        policy,
        folds,
        strict=True,
    ):
        if pd.isna(t):
            continue
        if not pd.isna(cross) and bool(cross):  # the E-step reads the folds' scores
            parts = ["cross-fit"]
            if not pd.isna(k) and int(k) != 2:  # [em] cross_fit_folds
                parts.append(f"{int(k)} folds")
            if isinstance(scorer, str) and scorer and scorer != family:
                parts.append(f"by {scorer}")
        else:
            parts = [f"T={float(t):g}"] + (["learned"] if calibrate else [])
            if calibrate and not pd.isna(whole) and not bool(whole):
                parts.append("(policy s/T)")  # [em] policy_calibrate false
            parts += ["oos"] if oos else []
        if not pd.isna(level) and level > 0:
            parts.append(f"test {float(level):g}")
        if not pd.isna(refit) and bool(refit):
            parts.append("refit")
        if not pd.isna(share) and share > 0:
            parts.append(f"held out {float(share):g}")
        labels.append(" ".join(parts))
    return "/".join(dict.fromkeys(labels))


def switched_on(frame: pd.DataFrame, method: str, setting: str) -> str:
    """In how many of ``method``'s runs in ``setting`` the noise test switched the
    posterior on (``k/n``; empty for runs without the test). A run whose test was never
    taken (cross-fitted scores that carry nothing of the truths) counts as off."""
    rows = _runs(frame, method, setting)
    if "noise_evident" not in rows or rows.noise_evident.isna().all():
        return ""
    return f"{int(rows.noise_evident.eq(True).sum())}/{len(rows)}"


def _runs(frame: pd.DataFrame, method: str, setting: str) -> pd.DataFrame:
    """``method``'s runs in ``setting`` (a column label: ``K=1 0.4``, ``clean``, ...)."""
    return frame[(frame.method == method) & (frame.apply(_setting_of, axis=1) == setting)]


def _setting_of(row: pd.Series) -> str:
    return setting_label(row.noise, row.flip_rate)


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Accuracy against flip rate: rows = noise kind, columns = loss family; plain
    losses dashed, RE-PO solid, 95% t-intervals as error bars (rho = 0 in both rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(frame)
    clean = summary[summary.flip_rate == 0]
    groups = {
        "DPO": ["DPO", "cDPO", "rDPO", "Hölder-DPO", "RE-DPO"],
        **{PLAIN_NAMES[f]: [PLAIN_NAMES[f], "RE-" + PLAIN_NAMES[f]] for f in FAMILIES[1:]},
    }
    colours = {"DPO": "C0", "cDPO": "C2", "rDPO": "C4", "Hölder-DPO": "C1"}
    kinds = [k for k in ("single", "pool") if (summary.noise == k).any()]
    fig, axes = plt.subplots(
        len(kinds), 4, figsize=(13, 3.3 * len(kinds)), sharex=True, sharey=True, squeeze=False
    )
    for i, kind in enumerate(kinds):
        part = pd.concat([clean, summary[(summary.noise == kind) & (summary.flip_rate > 0)]])
        for j, (title, names) in enumerate(groups.items()):
            ax = axes[i, j]
            for name in names:
                m = part[part.method == name].sort_values("flip_rate")
                if m.empty:
                    continue
                robust = name.startswith("RE-")
                colour = "C3" if robust else colours.get(name, "C0")
                ax.errorbar(
                    m.flip_rate,
                    m["mean"],
                    yerr=m.half_width.fillna(0),
                    label=name,
                    color=colour,
                    linestyle="-" if robust else "--",
                    marker="o",
                    capsize=3,
                )
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylim(0.4, 1.02)
            ax.set_title(f"{title} ({'one annotator' if kind == 'single' else 'pool of four'})")
            ax.set_xticks(sorted(part.flip_rate.unique()))
            if i == len(kinds) - 1:
                ax.set_xlabel("mean flip rate rho")
            if j == 0:
                ax.set_ylabel("held-out accuracy (clean labels)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(frame: pd.DataFrame) -> dict:
    """Mean accuracy, log loss and ECE per setting and method, RE-PO's paired accuracy
    gains and eta's mean absolute errors."""
    out: dict = {}
    for measure in MEASURES:
        table: dict[str, dict[str, float]] = {}
        for _, r in summarise(frame, measure).iterrows():
            table.setdefault(r.setting, {})[r.method] = round(r["mean"], 4)
        out[measure] = table
    gain: dict[str, dict[str, list[float | None]]] = {}
    for _, r in paired_gains(frame).iterrows():
        gain.setdefault(r.setting, {})[r.method] = [
            round(r["mean"], 4),
            round(r.half_width, 4) if not math.isnan(r.half_width) else None,
        ]
    out["re_po_minus_plain"] = gain
    mae: dict[str, dict[str, float]] = {}
    for _, r in eta_summary(frame).iterrows():
        mae.setdefault(r.setting, {})[r.method] = round(r.mean_abs_error, 4)
    out["eta_mae"] = mae
    return out


# ----------------------------------------------------------------------------- HH-RLHF


@dataclass
class HHSettings:
    """The SmolLM2 run on HH-RLHF: sizes, length cap and optimizer."""

    train_pairs: int = 112
    held_out: int = 96
    max_tokens: int = 128  # prompt + both responses, SmolLM2 tokens (614 of 1,991 pairs fit)
    flip_rate: float = 0.2
    seed: int = 0
    optim: dict = dataclasses.field(
        default_factory=lambda: {
            "batch_size": 8,
            "epochs": 1,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.1,
        }
    )


def hh_pairs(settings: HHSettings, tokenizer):
    """Shuffled HH-RLHF pairs of the shipped subsample whose prompt and two responses
    fit ``max_tokens`` together: ``(train, held_out)`` records. Train labels are
    flipped by a pool of four annotators (:func:`annotator_pool`); held-out labels
    are the originals."""
    from repo.data.hh_rlhf import load_hh_rlhf
    from repo.data.records import PreferenceData

    records = list(load_hh_rlhf())
    order = np.random.default_rng(settings.seed).permutation(len(records))

    def size(text) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    need = settings.train_pairs + settings.held_out
    kept = []
    for i in order:
        r = records[int(i)]
        if size(r.prompt) + size(r.response_a) + size(r.response_b) <= settings.max_tokens:
            kept.append(r)
        if len(kept) == need:
            break
    if len(kept) < need:
        raise ValueError(f"only {len(kept)} pairs fit {settings.max_tokens} tokens; need {need}")
    rng = np.random.default_rng(settings.seed + 1)
    etas = annotator_pool(settings.flip_rate)
    train = []
    for r in kept[: settings.train_pairs]:
        k = int(rng.integers(len(etas)))
        correct = rng.random() < etas[k]
        label = r.label if correct else 1 - r.label
        train.append(dataclasses.replace(r, label=label, annotator=f"a{k}"))
    held = [dataclasses.replace(r, annotator="a0") for r in kept[settings.train_pairs :]]
    flipped = float(np.mean([t.label != r.label for t, r in zip(train, kept, strict=False)]))
    return PreferenceData(train), PreferenceData(held), etas, flipped


def run_hh_rlhf(settings: HHSettings) -> dict:
    """DPO and RE-DPO with SmolLM2-135M-Instruct (LoRA) on HH-RLHF, 20% of labels flipped."""
    from repo.policy import load_model_and_tokenizer

    recipe = "smollm2-135m-instruct"
    start = time.perf_counter()
    _, tokenizer = load_model_and_tokenizer(recipe, device="cpu")
    train, held, etas, flipped = hh_pairs(settings, tokenizer)
    print(
        f"HH-RLHF: {len(train)} training pairs ({flipped:.3f} flipped), {len(held)} held out",
        file=sys.stderr,
    )
    results = {}
    for method in (
        Method("DPO", "dpo", False, {"beta": 0.1}),
        Method("RE-DPO", "dpo", True, {"beta": 0.1}),
    ):
        print(f"HH-RLHF: training {method.name} ...", file=sys.stderr, flush=True)
        result = train_and_score(
            train,
            held,
            method,
            seed=settings.seed,
            optim=settings.optim,
            recipe=recipe,
            model={"use_lora": True, "max_length": settings.max_tokens + 16},
        )
        results[method.name] = {
            "accuracy": result.accuracy,
            "eta_hat": [round(result.eta[f"a{k}"], 4) for k in range(len(etas))]
            if result.eta
            else None,
            "steps": result.steps,
            "wall_s": round(result.wall_seconds, 1),
        }
        print(f"HH-RLHF: {method.name} {results[method.name]}", file=sys.stderr, flush=True)
    n = len(held)
    return {
        "experiment": "noise_sweep_hh_rlhf",
        "model": recipe,
        "lora": True,
        "train_pairs": len(train),
        "held_out": n,
        "max_tokens": settings.max_tokens,
        "flip_rate": settings.flip_rate,
        "realised_flip_rate": round(flipped, 4),
        "annotator_eta": etas,
        "seed": settings.seed,
        "optim": settings.optim,
        "beta": 0.1,
        "results": results,
        "chance_sd": round(0.5 / math.sqrt(n), 4),
        "wall_s": round(time.perf_counter() - start, 1),
    }


# ----------------------------------------------------------------------------- main


def parse_setting(text: str) -> tuple[str, float]:
    """``single:0.2`` -> ``("single", 0.2)``."""
    noise, _, rho = text.partition(":")
    try:
        value = float(rho)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"setting {text!r}: want NOISE:RHO, e.g. single:0.2"
        ) from err
    annotator_etas(noise, value)
    return noise, value


def stem_for(quick: bool, epochs: int, pairs: int | None = None) -> str:
    """File stem: ``noise-sweep``, ``-quick`` for the small grid, ``-pairs{N}`` off the
    grid's training pairs, ``-epochs{N}`` off 4 epochs."""
    stem = "noise-sweep" + ("-quick" if quick else "")
    stem += "" if pairs is None else f"-pairs{pairs}"
    return stem + ("" if epochs == EPOCHS else f"-epochs{epochs}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--quick", action="store_true", help="a small grid")
    parser.add_argument("--replot", action="store_true", help="table and figure from the CSV")
    parser.add_argument("--hh-rlhf", action="store_true", help="SmolLM2 on HH-RLHF instead")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    parser.add_argument(
        "--epochs", type=int, help=f"passes over the data (default {EPOCHS}; 3 with --quick)"
    )
    parser.add_argument(
        "--settings",
        type=parse_setting,
        nargs="+",
        help="run only these settings, e.g. single:0.2 pool:0.4 (default: all five)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="run only these methods, e.g. DPO RE-DPO, or variants of them with fields set, "
        "e.g. 'RE-CPO em.epoch_m_step=true' (section em, loss or noise; TOML values)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help="training pairs per seed (default 512); files get -pairs{N} in their names",
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the CSV's rows; skip the runs already in it"
    )
    parser.add_argument(
        "--min-seeds",
        type=int,
        default=1,
        help="tables and figure leave out setting-method cells with fewer seeds (default 1)",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="write noise-sweep-targets.md from the one-pass and four-epoch CSVs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.hh_rlhf:
        result = run_hh_rlhf(HHSettings())
        (args.out / "noise-sweep-hh-rlhf.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return result
    if args.targets:
        regimes = {}
        for epochs, label in ((1, "one pass"), (EPOCHS, f"{EPOCHS} epochs")):
            path = args.out / f"{stem_for(args.quick, epochs, args.pairs)}.csv"
            if path.exists():
                regimes[label] = complete(pd.read_csv(path), args.min_seeds)
        table = targets_table(regimes)
        (args.out / f"{stem_for(args.quick, EPOCHS, args.pairs)}-targets.md").write_text(table)
        print(table)
        return {"experiment": "noise_sweep_targets", "regimes": list(regimes)}
    grid = QUICK if args.quick else Grid()
    epochs = args.epochs if args.epochs is not None else int(grid.optim["epochs"])
    grid = dataclasses.replace(grid, optim={**grid.optim, "epochs": epochs})
    if args.seeds:
        grid = dataclasses.replace(grid, seeds=tuple(args.seeds))
    if args.pairs:
        grid = dataclasses.replace(grid, num_pairs=args.pairs)
    if args.settings:
        grid = dataclasses.replace(grid, settings=tuple(args.settings))
    if args.methods:
        for name in args.methods:
            try:
                variant(name, 0.0)
            except ValueError as err:
                parser.error(str(err))
        grid = dataclasses.replace(grid, only=tuple(args.methods))
    stem = stem_for(args.quick, args.epochs if args.epochs is not None else EPOCHS, args.pairs)
    csv_path = args.out / f"{stem}.csv"
    if not args.replot:
        if not args.append:
            csv_path.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="noise-sweep-reference-") as cache:
            run_grid(grid, csv_path, reference_cache_dir=Path(cache))
    frame = complete(pd.read_csv(csv_path), args.min_seeds)
    tables = markdown_tables(frame)
    (args.out / f"{stem}-table.md").write_text(tables)
    plot(frame, args.out / f"{stem}.png")
    print(tables)
    result = {
        "experiment": "noise_sweep",
        "quick": args.quick,
        "epochs": sorted(int(e) for e in frame.epochs.unique()),
        "runs": len(frame),
        "seeds": sorted(int(s) for s in frame.seed.unique()),
        "train_pairs": grid.num_pairs,
        "held_out": grid.held_out,
        **headline(frame),
        "run_wall_s": round(float(frame.wall_s.sum()), 1),
        "run_cpu_s": round(float(frame.cpu_s.sum()), 1),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
