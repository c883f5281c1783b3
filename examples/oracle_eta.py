"""RE-X with the annotators' reliabilities known: what reweighting can do, whatever EM learns.

A diagnostic beside ``noise_sweep.py`` (same task, data, seeds and training): for each
seed it trains X, RE-X with ``[em]`` at its defaults, and RE-X with every annotator's
``eta`` held at its *realised* share of correct labels from the first step (the
posterior on from the first step: ``[em] noise_test = 0``, no refit after a pass, the
annotator M-step replaced by nothing, and the E-step reading the policy, ``[em]
cross_fit = false``), twice: ``oracle`` with the E-step's logit
scale learned as the family's default has it, ``oracle, scale 1`` with the scale held
at 1 (``[em] calibrate = false``). If the oracles do not beat X, no estimator of
``eta`` can, and a cell's shortfall lies in what reweighting does to the policy step,
not in EM.

    python examples/oracle_eta.py --family SimPO --flip-rate 0.2 --epochs 1 \\
        --seeds 10 11 12 13 14 15 16 17 18 19 --out docs/experiments/oracle-eta.csv

One CSV row per run (``--out``, appended); the last line printed is one JSON object
with the paired differences (mean and 95% t half-width over seeds) of RE-X and of the
oracle against X.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_sweep import MARKERS, annotator_etas, methods  # noqa: E402

from repo.data.rule_pairs import rule_pairs  # noqa: E402
from repo.experiments import _records, method_from_text, rule_config, t_interval  # noqa: E402
from repo.inference.em import set_value  # noqa: E402
from repo.train.evaluate import evaluate_records  # noqa: E402
from repo.train.trainer import Trainer  # noqa: E402

HELD_OUT, TRAIN_PAIRS = 500, 512  # as noise_sweep.py


def hold_eta(trainer: Trainer, eta: torch.Tensor) -> None:
    """Set the noise model's ``eta`` and keep it there: no annotator M-step, no refit."""
    set_value(trainer.noise, "eta", eta)
    m_step = trainer.em.m_step  # at EMA rate 0: the scale still learns, eta stays
    trainer.em.m_step = lambda reduce=None, *, alpha=None: m_step(reduce, alpha=0.0)
    trainer.em.end_pass = lambda step, reduce=None, held_out=None: None


def run(
    family: str, flip_rate: float, epochs: int, seed: int, noise: str, pairs: int = TRAIN_PAIRS
) -> list[dict]:
    """X, RE-X and the two oracles on one seed's data; one row each (``eta``: the
    annotators' reliabilities at the end, in the data's order; empty for X)."""
    data = rule_pairs(pairs, annotator_etas(noise, flip_rate), seed=seed, markers=MARKERS)
    held_out = _records(rule_pairs(HELD_OUT, [1.0], seed=10_000 + seed, markers=MARKERS).rows)
    known = {m.name: m for m in methods(flip_rate)}
    oracles = {
        f"RE-{family} em.noise_test=0 em.epoch_m_step=false em.held_out=false "
        "em.cross_fit=false": "oracle",
        f"RE-{family} em.noise_test=0 em.epoch_m_step=false em.held_out=false "
        "em.cross_fit=false em.calibrate=false": "oracle, scale 1",
    }
    rows = []
    for name in (family, f"RE-{family}", *oracles):
        method = method_from_text(name, known)
        with tempfile.TemporaryDirectory(prefix="oracle-eta-") as tmp:
            config = rule_config(tmp, method, seed=seed, optim={"epochs": epochs})
            trainer = Trainer(config, records=_records(data.rows))
            order = [int(a[1:]) for a in trainer.data.annotator_ids]  # ids "a0", "a1", ...
            if name in oracles:
                realised = [float(data.realised_eta[k]) for k in order]
                hold_eta(trainer, torch.tensor(realised, dtype=torch.float64).clamp(1e-4, 1 - 1e-4))
            trainer.train()
            eta = []
            if method.robust:  # back in the annotators' order
                by_annotator = dict(zip(order, trainer.noise.eta.detach().tolist(), strict=True))
                eta = [by_annotator[k] for k in sorted(by_annotator)]
            scores = evaluate_records(
                trainer.config, trainer.policy, trainer.likelihood, trainer.pair_tokenizer, held_out
            )
        rows.append(
            {
                "noise": noise,
                "flip_rate": flip_rate,
                "epochs": epochs,
                "pairs": pairs,
                "seed": seed,
                "family": family,
                "method": oracles.get(name, name),
                "accuracy": float(scores["accuracy"]),
                "eta_true": json.dumps([round(float(e), 4) for e in data.realised_eta]),
                "eta": json.dumps([round(e, 4) for e in eta]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="SimPO", choices=["DPO", "IPO", "SimPO", "CPO"])
    parser.add_argument("--flip-rate", type=float, default=0.2)
    parser.add_argument("--noise", default="pool", choices=["pool", "single"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=TRAIN_PAIRS, help="training pairs per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 20)))
    parser.add_argument("--out", type=Path, help="append the rows to this CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        new = run(args.family, args.flip_rate, args.epochs, seed, args.noise, args.pairs)
        rows += new
        print({r["method"]: r["accuracy"] for r in new}, f"seed {seed}", file=sys.stderr)
        if args.out is not None:
            header = not args.out.exists()
            pd.DataFrame(new).to_csv(args.out, mode="a", header=header, index=False)
    frame = pd.DataFrame(rows).pivot(index="seed", columns="method", values="accuracy")
    summary = {"family": args.family, "noise": args.noise, "flip_rate": args.flip_rate}
    summary.update(epochs=args.epochs, pairs=args.pairs)
    for method in (f"RE-{args.family}", "oracle", "oracle, scale 1"):
        mean, half = t_interval((frame[method] - frame[args.family]).tolist())
        summary[f"{method} - {args.family}"] = [round(mean, 4), round(half, 4)]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
