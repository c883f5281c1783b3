"""What one annotator's labels can tell of its reliability: the profile likelihood of eta.

Experiments of ``docs/experiments/one-annotator.md`` (issue: calibrated EM). The tiny
model learns the rule of :mod:`repo.data.rule_pairs` from one annotator (K = 1)
whose labels are flipped at rate rho, three ways: the plain loss X, RE-X with the
paper's online update of eta (``[em] out_of_sample = false``), and RE-X with
out-of-sample statistics (``true``, the default for one annotator: eta learned from
each item's first visit, refitted after each epoch with the first-visit scores'
scale learned). After the first pass (every item visited once) and after the last
epoch it records eta, held-out accuracy and log loss against clean labels, and the
profile likelihood of eta at the first-visit logits
(:func:`repo.inference.profile.eta_profile`: its maximum and 95% interval), which
says how much any estimator could learn of eta from these labels and scores.

    python examples/one_annotator.py --seeds 10 11 12 --out docs/experiments   # 512 pairs, 4 epochs
    python examples/one_annotator.py --name one-annotator-data --pairs 512 2048 8192 \
        --epochs 1 --out docs/experiments                    # how much data identifies eta
    python examples/one_annotator.py --quick --out /tmp/one-annotator

``--families`` runs other loss families than DPO (the noise sweep's beta);
``--flip-rates`` and ``--seeds`` narrow the grid. Rows are appended to
``<name>.csv`` as runs finish (a row per run and snapshot; runs already there are
skipped, so a grid can be split over processes); ``<name>-table.md`` is written from
the whole CSV (``--table``: only that). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_sweep as sweep  # noqa: E402

MARKERS = 4


POSTERIOR = {"noise_test": 0.0, "cross_fit": False}
"""The E-step reaches the policy from the first step: this experiment compares two
estimators of eta, each with the policy it trains (not the noise test before them),
both reading the policy's own scores (over several passes at 4,096 items or more one
annotator's default reads cross-fitted scores instead, ``docs/math.md`` section 13)."""


def methods(family: str = "dpo") -> tuple[Method, ...]:
    """X; RE-X with the paper's online update of eta (``[em] out_of_sample = false``, the
    default before ``"auto"``); RE-X with out-of-sample statistics (the default now for
    one annotator). The noise sweep's beta per family; the E-step's other settings are
    the family's defaults, without the noise test (:data:`POSTERIOR`)."""
    name, loss = sweep.PLAIN_NAMES[family], {"beta": sweep.BETA[family]}
    return (
        Method(name, family, False, loss),
        Method(f"RE-{name}{ONLINE}", family, True, loss, em={**POSTERIOR, "out_of_sample": False}),
        Method(
            f"RE-{name}{OUT_OF_SAMPLE}", family, True, loss, em={**POSTERIOR, "out_of_sample": True}
        ),
    )


COLUMNS = [
    *("pairs", "flip_rate", "seed", "method", "epoch", "eta_true", "eta", "accuracy"),
    *("log_loss", "profile_eta", "profile_low", "profile_high", "profile_scale"),
]
"""The CSV's columns (a row per run and snapshot)."""
ONLINE = ", online"
OUT_OF_SAMPLE = ", out of sample"
"""Suffixes of the two RE-X methods' names."""


@dataclass
class Grid:
    """Flip rates, seeds, data sizes (training pairs) and epochs."""

    flip_rates: tuple[float, ...] = (0.2, 0.4)
    seeds: tuple[int, ...] = (10, 11, 12, 13, 14)
    num_pairs: tuple[int, ...] = (512,)
    held_out: int = 500
    epochs: int = 4


QUICK = Grid(flip_rates=(0.4,), seeds=(10,), num_pairs=(48,), held_out=48, epochs=2)


def run_one(num_pairs: int, rho: float, seed: int, method: Method, grid: Grid) -> list[dict]:
    """One training run; a row after the first pass and one after the last epoch."""
    train = rule_pairs(num_pairs, [1 - rho], seed=seed, markers=MARKERS)
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
            if config.em.enabled:  # the annotator refit of the pass, as Trainer.train
                trainer.em.end_pass(trainer.step, trainer.reduce)
            epoch = trainer.step // per_epoch
            if epoch not in (1, grid.epochs):
                continue
            scores = trainer.evaluate(held)
            row = {
                "pairs": num_pairs,
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
    keys = zip(frame.pairs, frame.flip_rate, frame.epoch, strict=True)
    settings = sorted(set(keys))
    header = " | ".join(f"{n} pairs, rho={r}, epoch {e}" for n, r, e in settings)
    lines += [f"| measure | {header} |", "|---|" + "---|" * len(settings)]

    def row(label: str, fn) -> None:
        cells = []
        for pairs, rho, epoch in settings:
            part = frame[(frame.pairs == pairs) & (frame.flip_rate == rho) & (frame.epoch == epoch)]
            cells.append(fn(part))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def per(method: str, column: str, transform=lambda v: v):
        def fn(part: pd.DataFrame) -> str:
            sub = part[part.method == method].sort_values("seed")
            return _cell(transform(sub)[column].to_numpy(dtype=float))

        return fn

    def error(sub: pd.DataFrame) -> pd.DataFrame:
        return sub.assign(err=(sub.eta - sub.eta_true).abs())

    plains = [m for m in dict.fromkeys(frame.method) if not m.startswith("RE-")]
    for plain in plains:
        online, oos = f"RE-{plain}{ONLINE}", f"RE-{plain}{OUT_OF_SAMPLE}"
        row(f"realised eta ({plain})", per(online, "eta_true"))
        for name in (online, oos):
            row(f"eta, {name}", per(name, "eta"))
            row(f"eta error, {name}", per(name, "err", error))
        row(f"profile maximum of eta ({online})", per(online, "profile_eta"))
        row(f"profile 95% interval, low ({online})", per(online, "profile_low"))
        row(f"profile 95% interval, high ({online})", per(online, "profile_high"))
        for name in (plain, online, oos):
            row(f"accuracy, {name}", per(name, "accuracy"))
        for name in (plain, online, oos):
            row(f"log loss, {name}", per(name, "log_loss"))
        for name in (online, oos):

            def diff(part: pd.DataFrame, name: str = name, plain: str = plain) -> str:
                base = part[part.method == plain].set_index("seed").accuracy
                other = part[part.method == name].set_index("seed").accuracy
                both = (other - base).dropna().to_numpy(dtype=float)
                return _cell(both)

            row(f"accuracy, {name} minus {plain}", diff)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the grid (appending to the CSV, skipping runs already there); write the table;
    return the headline figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    parser.add_argument("--pairs", type=int, nargs="+", help="training pairs (default 512)")
    parser.add_argument("--flip-rates", type=float, nargs="+", help="default 0.2 0.4")
    parser.add_argument("--epochs", type=int, help="passes over the data (default 4)")
    parser.add_argument(
        "--families", nargs="+", default=["dpo"], choices=list(sweep.PLAIN_NAMES), help="dpo"
    )
    parser.add_argument("--name", default="one-annotator", help="stem of the CSV and table")
    parser.add_argument("--table", action="store_true", help="only the table, from the CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = QUICK if args.quick else Grid()
    for option, name in (("seeds", "seeds"), ("pairs", "num_pairs"), ("flip_rates", "flip_rates")):
        if getattr(args, option):
            setattr(grid, name, tuple(getattr(args, option)))
    if args.epochs:
        grid.epochs = args.epochs
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.csv"
    done = set()
    if path.exists():
        old = pd.read_csv(path)
        done = set(zip(old.pairs, old.flip_rate, old.seed, old.method, strict=True))
    for num_pairs in grid.num_pairs:
        for rho in grid.flip_rates:
            for seed in grid.seeds:
                for method in (m for f in args.families for m in methods(f)):
                    if args.table or (num_pairs, rho, seed, method.name) in done:
                        continue
                    rows = pd.DataFrame(run_one(num_pairs, rho, seed, method, grid))
                    rows = rows.reindex(columns=COLUMNS)  # DPO's rows have no profile
                    rows.to_csv(path, mode="a", header=not path.exists(), index=False)
    frame = pd.read_csv(path)
    (args.out / f"{args.name}-table.md").write_text(summarise(frame))
    online = frame[frame.method.str.endswith(ONLINE)]
    headline = {
        "runs": int(len(frame)),
        "profile_width_mean": float((online.profile_high - online.profile_low).mean()),
    }
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
