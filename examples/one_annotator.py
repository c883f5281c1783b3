"""What one annotator's labels can tell of its reliability: the profile likelihood of eta.

Experiment of ``docs/experiments/one-annotator.md`` (issue: calibrated EM). The tiny
model learns the rule of :mod:`repo.data.rule_pairs` from one annotator (K = 1)
whose labels are flipped at rate rho, for four epochs, three ways: plain DPO, RE-DPO
as shipped (the paper's online update), and RE-DPO with ``[em] out_of_sample = true``
(eta learned from each item's first visit, refitted after each epoch with the
first-visit scores' scale learned). After the first pass (every item visited once)
and after the last epoch it records eta, held-out accuracy and log loss against
clean labels, and the profile likelihood of eta at the first-visit logits
(:func:`repo.inference.profile.eta_profile`: its maximum and 95% interval), which
says how much any estimator could learn of eta from these labels and scores.

    python examples/one_annotator.py --out docs/experiments
    python examples/one_annotator.py --quick --out /tmp/one-annotator

Writes ``one-annotator.csv`` (a row per run and snapshot) and
``one-annotator-table.md``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from repo.data.loaders import load_preferences
from repo.data.rule_pairs import rule_pairs
from repo.experiments import Method, rule_config, t_interval
from repo.inference.profile import eta_profile
from repo.train import Trainer

BETA = 0.3
MARKERS = 4
METHODS = (
    Method("DPO", "dpo", False, {"beta": BETA}),
    Method("RE-DPO", "dpo", True, {"beta": BETA}),
    Method("RE-DPO, out of sample", "dpo", True, {"beta": BETA}, em={"out_of_sample": True}),
)


@dataclass
class Grid:
    """Flip rates, seeds, data sizes and epochs."""

    flip_rates: tuple[float, ...] = (0.2, 0.4)
    seeds: tuple[int, ...] = (10, 11, 12, 13, 14)
    num_pairs: int = 512
    held_out: int = 500
    epochs: int = 4


QUICK = Grid(flip_rates=(0.4,), seeds=(10,), num_pairs=48, held_out=48, epochs=2)


def run_one(rho: float, seed: int, method: Method, grid: Grid) -> list[dict]:
    """One training run; a row after the first pass and one after the last epoch."""
    train = rule_pairs(grid.num_pairs, [1 - rho], seed=seed, markers=MARKERS)
    held = load_preferences(
        rule_pairs(grid.held_out, [1.0], seed=10_000 + seed, markers=MARKERS).rows,
        annotator_column="annotator",
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="re-po-one-") as tmp:
        config = rule_config(tmp, method, seed=seed, optim={"epochs": grid.epochs})
        trainer = Trainer(
            config, records=load_preferences(train.rows, annotator_column="annotator")
        )
        per_epoch = trainer.schedule.steps_per_epoch
        while trainer.step < trainer.total_steps:
            trainer.train_step(trainer.step)
            trainer.step += 1
            if trainer.step % per_epoch:
                continue
            if config.em.enabled and config.em.out_of_sample:
                trainer.epoch_m_step()
            epoch = trainer.step // per_epoch
            if epoch not in (1, grid.epochs):
                continue
            scores = trainer.evaluate(held)
            row = {
                "flip_rate": rho,
                "seed": seed,
                "method": method.name,
                "epoch": epoch,
                "eta_true": float(train.realised_eta[0]),
                "eta": float(trainer.noise.eta.detach()[0]) if config.em.enabled else np.nan,
                "accuracy": float(scores["accuracy"]),
                "log_loss": float(scores["log_loss"]),
            }
            first = trainer.em.first_visit_logits()
            if config.em.enabled and first is not None:
                labels = trainer.data.labels
                profile = eta_profile(first[labels.unit], labels.label[:, 0])
                row.update(
                    profile_eta=profile.estimate,
                    profile_low=profile.interval[0],
                    profile_high=profile.interval[1],
                    profile_scale=profile.scale_estimate,
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _cell(values: np.ndarray) -> str:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return "-"
    mean, half = t_interval(values.tolist())
    return f"{mean:.3f} ± {half:.3f}"


def summarise(frame: pd.DataFrame) -> str:
    """Markdown: per flip rate and snapshot, eta error, accuracy and paired differences."""
    lines = [
        f"Means over {frame.seed.nunique()} seeds (± 95% t-interval half-width). "
        "eta error: |eta - realised share of correct labels|; profile: the maximum and "
        "95% interval of the profile likelihood of eta at the first-visit logits.",
        "",
    ]
    settings = sorted({(r, e) for r, e in zip(frame.flip_rate, frame.epoch, strict=True)})
    header = " | ".join(f"rho={r}, epoch {e}" for r, e in settings)
    lines += [f"| measure | {header} |", "|---|" + "---|" * len(settings)]

    def row(label: str, fn) -> None:
        cells = []
        for rho, epoch in settings:
            part = frame[(frame.flip_rate == rho) & (frame.epoch == epoch)]
            cells.append(fn(part))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def per(method: str, column: str, transform=lambda v: v):
        def fn(part: pd.DataFrame) -> str:
            sub = part[part.method == method].sort_values("seed")
            return _cell(transform(sub)[column].to_numpy(dtype=float))

        return fn

    def error(sub: pd.DataFrame) -> pd.DataFrame:
        return sub.assign(err=(sub.eta - sub.eta_true).abs())

    row("realised eta", per("RE-DPO", "eta_true"))
    for name in ("RE-DPO", "RE-DPO, out of sample"):
        row(f"eta, {name}", per(name, "eta"))
        row(f"eta error, {name}", per(name, "err", error))
    row("profile maximum of eta", per("RE-DPO", "profile_eta"))
    row("profile 95% interval, low", per("RE-DPO", "profile_low"))
    row("profile 95% interval, high", per("RE-DPO", "profile_high"))
    for name in ("DPO", "RE-DPO", "RE-DPO, out of sample"):
        row(f"accuracy, {name}", per(name, "accuracy"))
    for name in ("DPO", "RE-DPO", "RE-DPO, out of sample"):
        row(f"log loss, {name}", per(name, "log_loss"))
    for name in ("RE-DPO", "RE-DPO, out of sample"):

        def diff(part: pd.DataFrame, name: str = name) -> str:
            base = part[part.method == "DPO"].set_index("seed").accuracy
            other = part[part.method == name].set_index("seed").accuracy
            both = (other - base).dropna().to_numpy(dtype=float)
            return _cell(both)

        row(f"accuracy, {name} minus DPO", diff)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the grid; write the CSV and the table; return the headline figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = QUICK if args.quick else Grid()
    if args.seeds:
        grid.seeds = tuple(args.seeds)
    rows = []
    for rho in grid.flip_rates:
        for seed in grid.seeds:
            for method in METHODS:
                rows += run_one(rho, seed, method, grid)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "one-annotator.csv", index=False)
    (args.out / "one-annotator-table.md").write_text(summarise(frame))
    re_dpo = frame[frame.method == "RE-DPO"]
    headline = {
        "runs": int(len(frame)),
        "profile_width_mean": float((re_dpo.profile_high - re_dpo.profile_low).mean()),
    }
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
