"""The compute of cross-fitting: a whole run of RE-IPO with 2 and 4 folds against IPO.

``[em] cross_fit`` fixes the E-step on cross-fitted scores (``docs/math.md`` section
13): the items are split in ``K`` folds (``[em] cross_fit_folds``), and each fold's
scorer trains on the other ``K - 1`` folds, then scores its own. The scorers together
train on ``K - 1`` times the run's items, for as many passes as the run makes, and
score each item once, so a run with ``K`` folds should cost about ``K`` times plain
IPO's (the policy's own training, plus ``K - 1`` runs' worth of scorers), where one
whose E-step reads the policy costs about IPO's (``estep_overhead.py``). This
script measures it: one pass of one annotator's rule pairs (flip rate 0.4), LoRA on
the tiny model (``models/tiny-llama``), each method a run of its own
(:class:`repo.train.Trainer`, model loading included), after one untimed run of IPO
(first-call costs), the methods in a rotated order in each of ``--rounds`` rounds. The
figure of a method is the median over the rounds of its CPU time divided by IPO's of
the same round (one torch thread; see ``common.clock``), with the wall-time ratio
beside it. The tiny model's steps are cheap, so a run's fixed costs weigh here as they
do not with a real model: the noise test's looks, each a fit of ``eta`` and the scale
(about a second), make RE-IPO reading the policy cost more than IPO, where its cost per
step is within a few per cent (``estep_overhead.py``).

    python benchmarks/cross_fit_cost.py --quick     # 128 pairs, one round: a smoke test
    python benchmarks/cross_fit_cost.py             # 1,024 pairs, three rounds

The last line printed is one JSON object with the figures; it is also written to
``benchmarks/results/cross_fit_cost[-quick].json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _results import record
from common import config, median, timed

from repo.data.loaders import load_preferences
from repo.data.rule_pairs import rule_pairs
from repo.train import Trainer

METHODS: dict[str, dict] = {
    "IPO": {"enabled": False},
    "RE-IPO, the policy's scores": {"enabled": True, "cross_fit": False},
    "RE-IPO, 2 folds": {"enabled": True, "cross_fit": True, "cross_fit_folds": 2},
    "RE-IPO, 4 folds": {"enabled": True, "cross_fit": True, "cross_fit_folds": 4},
}
"""Each method's ``[em]`` fields; the first is the baseline the ratios divide by."""


def expected_ratio(em: dict) -> float:
    """The ratio a method's cost should be near by the count above: ``K`` for ``K``
    folds, 1 otherwise (the figure to read the measured ratio against, not a target)."""
    return float(em.get("cross_fit_folds", 1))


def run_time(records: list, em: dict, folder: str, seed: int) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of one run of IPO (``em``: its ``[em]`` fields) over
    ``records``, one pass, LoRA at lr 2e-3, in ``folder`` (the trainer seeds
    everything from ``[run] seed``)."""
    settings = config(
        folder,
        loss={"family": "ipo"},
        em=em,
        optim={"learning_rate": 2e-3, "epochs": 1},
        run={"seed": seed},
    )
    return timed(lambda: Trainer(settings, records=records).train())


def measure(pairs: int, rounds: int, seed: int = 1) -> dict:
    """Every method of :data:`METHODS` ``rounds`` times on the same ``pairs`` pairs: the
    median CPU and wall seconds of each, and the median of its per-round ratios to
    IPO's."""
    data = rule_pairs(pairs, [0.6], seed=seed)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data.rows]
    records = load_preferences(rows)
    names = list(METHODS)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="re-po-cross-fit-cost-") as tmp:
        run_time(records, METHODS[names[0]], f"{tmp}/warm-up", seed)  # first-call costs
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotated
            for name in order:
                folder = f"{tmp}/round{r}-{names.index(name)}"
                times[name].append(run_time(records, METHODS[name], folder, seed))
    base = times[names[0]]
    methods = []
    for name in names:
        cpu = [t[1] / b[1] for t, b in zip(times[name], base, strict=True)]
        wall = [t[0] / b[0] for t, b in zip(times[name], base, strict=True)]
        methods.append(
            {
                "method": name,
                "cpu_s": round(median([t[1] for t in times[name]]), 2),
                "wall_s": round(median([t[0] for t in times[name]]), 2),
                "ratio": round(median(cpu), 3),
                "ratio_wall": round(median(wall), 3),
                "expected_ratio": expected_ratio(METHODS[name]),
            }
        )
    return {"pairs": pairs, "rounds": rounds, "methods": methods}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 pairs, one round")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pairs, rounds = (128, 1) if args.quick else (args.pairs, args.rounds)
    return record("cross_fit_cost", args.quick, measure(pairs, rounds), args.out)


if __name__ == "__main__":
    main()
