"""What a run's first-visit scores know of the truth, block by block of its first pass.

Trains one RE-PO run on the rule pairs of the noise sweep (one annotator, the tiny
model) and reads back each item's first-visit logit ``c_i`` (the E-step's score before
the policy trained on the item, :meth:`repo.inference.online.OnlineEM.first_visit_logits`)
and the optimizer step of that visit (from the run's batch schedule). Per block of
steps it reports how often ``sign(c_i)`` is the truth, the mean ``|c_i|``, and how
often the label agrees with ``sign(c_i)``: the first-visit fit of ``eta`` reads
``|c|`` as confidence (``docs/math.md`` sections 9 and 12), which holds only where the
share of right signs grows with ``|c|``.

.. code-block:: bash

    python examples/first_visit_scores.py \\
        --method "RE-IPO em.out_of_sample=true em.held_out=false" \\
        --seed 23 --flip-rate 0.4 --out docs/experiments

Writes ``first-visit-scores-<method>-seed<seed>.csv`` (a row per block) and prints a
summary (about two minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise_sweep import HELD_OUT, MARKERS, annotator_etas, variant  # noqa: E402

from repo.data.loaders import load_preferences  # noqa: E402
from repo.data.rule_pairs import rule_pairs  # noqa: E402
from repo.experiments import held_out_scores, rule_config  # noqa: E402
from repo.train import Trainer  # noqa: E402


def first_visit_steps(trainer: Trainer) -> np.ndarray:
    """``(I,)`` the optimizer step (from 0) of each item's first visit, -1 if never."""
    steps = np.full(len(trainer.data.pairs), -1)
    unit_item = trainer.data.labels.unit
    for step in range(trainer.schedule.steps_per_epoch):
        items = unit_item[trainer.schedule.global_units(step)].numpy()
        fresh = items[steps[items] < 0]
        steps[fresh] = step
    return steps


def blocks(logits: np.ndarray, truth: np.ndarray, label: np.ndarray, steps: np.ndarray, size: int):
    """Per block of ``size`` steps: items, share of right signs, mean ``|c|``, share of
    labels agreeing with the sign (``truth`` and ``label``: 1 when A)."""
    sign = np.where(logits > 0, 1, 0)
    rows = []
    for start in range(0, int(steps.max()) + 1, size):
        inside = (steps >= start) & (steps < start + size)
        rows.append(
            {
                "first_step": start,
                "last_step": start + size - 1,
                "items": int(inside.sum()),
                "sign_right": float((sign[inside] == truth[inside]).mean()),
                "mean_abs_logit": float(np.abs(logits[inside]).mean()),
                "labels_agree": float((sign[inside] == label[inside]).mean()),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="RE-IPO em.out_of_sample=true em.held_out=false")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--flip-rate", type=float, default=0.4)
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--block", type=int, default=32, help="steps per block")
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    args = parser.parse_args(argv)
    method = variant(args.method, args.flip_rate)
    data = rule_pairs(
        args.pairs, annotator_etas("single", args.flip_rate), seed=args.seed, markers=MARKERS
    )
    held = rule_pairs(HELD_OUT, [1.0], seed=10_000 + args.seed, markers=MARKERS).rows
    with tempfile.TemporaryDirectory(prefix="re-po-fv-") as tmp:
        cfg = rule_config(tmp, method, seed=args.seed, optim={"epochs": args.epochs})
        records = load_preferences(data.rows, annotator_column="annotator")
        trainer = Trainer(cfg, records=records)
        trainer.train()
        scores = held_out_scores(trainer, load_preferences(held, annotator_column="annotator"))
        logits = trainer.em.first_visit_logits().numpy()
        steps = first_visit_steps(trainer)
        label = (trainer.data.labels.label[:, 0] > 0.5).numpy().astype(int)
        clean = np.array([r["clean"] for r in data.rows])
        truth = np.where(clean, label, 1 - label)
        eta = float(trainer.noise.eta.detach()[0])
        table = blocks(logits, truth, label, steps, args.block)
        summary = {
            "method": args.method,
            "seed": args.seed,
            "flip_rate": args.flip_rate,
            "held_out_accuracy": float(scores["accuracy"]),
            "realised_eta": float(data.realised_eta[0]),
            "learned_eta": eta,
            "first_visit_scale": trainer.em.out_of_sample_scale,
            "first_visit_sign_right": float((np.where(logits > 0, 1, 0) == truth).mean()),
            "first_visit_labels_agree": float((np.where(logits > 0, 1, 0) == label).mean()),
        }
    stem = re.sub(r"[^A-Za-z0-9]+", "-", args.method).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    table.round(4).to_csv(args.out / f"first-visit-scores-{stem}-seed{args.seed}.csv", index=False)
    print(table.round(3).to_string(index=False))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
