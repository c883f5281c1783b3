"""When the noise test switches RE-IPO's posterior on in one pass, and what that is worth.

RE-X trains exactly as X (``w = 1``) until the noise test rejects "no label is wrong"
(:mod:`repo.inference.noise_test`, looks at the visit counts of
:func:`repo.inference.online.look_points`, each at level ``alpha / L``). In one pass
over the rule pairs the first-visit scores the test reads gain power only as the policy
learns the rule, so the moment the test can reject comes late in the pass. This script
measures both halves of that, on the noise sweep's data (one annotator, flip rate 0.4,
8,192 pairs, the tiny model, RE-IPO at its defaults, one pass):

* **the test's p-value over the pass**: with the test as configured, at every
  :data:`~repo.inference.online.LOOK_SPACING` visits the p-value a look there would
  have (a probe on a copy of the run's :class:`~repo.inference.online.OnlineEM`: the
  run itself is unchanged), and the visit count at which the test switched the
  posterior on;
* **what switching on is worth, by when**: the same runs with the posterior held back
  until fixed visit counts (``--switch-at``) and switched on there, whatever the test
  says.

.. code-block:: bash

    python examples/noise_test_looks.py --out docs/experiments   # 12 runs, about 10 min

Writes ``noise-test-looks.csv`` (a row per seed and switch point: when the posterior
came on, held-out accuracy, learned eta, realised eta), ``noise-test-looks-p.csv`` (a
row per seed and probe: visits, p-value) and ``noise-test-looks.png``. Plain IPO's
accuracy on the same seeds is in ``noise-sweep-pairs8192-epochs1.csv``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise_sweep import HELD_OUT, MARKERS, annotator_etas, variant  # noqa: E402

from repo.data.loaders import load_preferences  # noqa: E402
from repo.data.rule_pairs import rule_pairs  # noqa: E402
from repo.experiments import held_out_scores, rule_config  # noqa: E402
from repo.inference.online import LOOK_SPACING, look_points  # noqa: E402
from repo.train import Trainer  # noqa: E402

SEEDS = (20, 21, 24, 26)
"""The sweep's seeds traced (20: the test rejected at half the pass; 21, 24, 26 late)."""
SWITCH_AT = (6144, 7168)
"""Visit counts at which the posterior is switched on regardless of the test."""


class ProbedTrainer(Trainer):
    """A :class:`~repo.train.Trainer` that records the noise test's p-value every
    ``every`` visits of the first pass (on a copy of its online EM) and, given
    ``switch_at``, holds the posterior back until that many units have been visited and
    switches it on then, whatever the test says."""

    def __init__(self, *args, switch_at: int | None = None, every: int = LOOK_SPACING, **kw):
        super().__init__(*args, **kw)
        self.switch_at = switch_at
        self.every = every
        self.probes: list[dict] = []
        self.switched_on_at: int | None = None

    def _visits(self, step: int) -> int:
        """Units visited after optimizer step ``step`` (from 0)."""
        return min((step + 1) * self.schedule.global_batch, self.schedule.num_trained)

    def train_step(self, step: int) -> dict[str, float]:
        metrics = super().train_step(step)
        visits = self._visits(step)
        probing = self.switch_at is None and step < self.schedule.steps_per_epoch
        crossed = visits // self.every > (visits - self.schedule.global_batch) // self.every
        if probing and crossed and self.switched_on_at is None:
            if self.em.noise_evident:  # a look of the run's own rejected at this step
                result = self.em.noise_test_result
            else:
                result = copy.deepcopy(self.em).look_for_noise()
            self.probes.append({"visits": visits, "p_value": result.p_value})
        if self.switch_at is not None:  # held back until switch_at, then on
            self.em.noise_evident = visits >= self.switch_at
        if self.em.noise_evident and self.switched_on_at is None:
            self.switched_on_at = visits
        return metrics


def run(seed: int, switch_at: int | None, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """One RE-IPO run: its row and its probes."""
    method = variant("RE-IPO", args.flip_rate)
    data = rule_pairs(
        args.pairs, annotator_etas("single", args.flip_rate), seed=seed, markers=MARKERS
    )
    held = rule_pairs(args.held_out, [1.0], seed=10_000 + seed, markers=MARKERS).rows
    with tempfile.TemporaryDirectory(prefix="re-po-looks-") as tmp:
        cfg = rule_config(tmp, method, seed=seed, optim={"epochs": 1})
        records = load_preferences(data.rows, annotator_column="annotator")
        trainer = ProbedTrainer(cfg, records=records, switch_at=switch_at, every=args.every)
        trainer.train()
        scores = held_out_scores(trainer, load_preferences(held, annotator_column="annotator"))
        looks = look_points(trainer.schedule.num_trained)
        row = {
            "seed": seed,
            "switch": "test" if switch_at is None else str(switch_at),
            "switched_on_at": trainer.switched_on_at,
            "looks": len(looks),
            "accuracy": float(scores["accuracy"]),
            "eta_hat": round(float(trainer.noise.eta.detach()[0]), 4),
            "eta_true": round(float(data.realised_eta[0]), 4),
        }
    probes = [{"seed": seed, **p} for p in trainer.probes]
    return row, probes


def plot(
    rows: pd.DataFrame, probes: pd.DataFrame, pass_size: int, path: Path, alpha: float = 0.05
) -> None:
    """p-value over the pass per seed, beside accuracy against the switch-on point (a
    run the test never switched on is drawn at the pass's end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for seed, part in probes.groupby("seed"):
        left.semilogy(part.visits, part.p_value.clip(lower=1e-12), marker=".", label=f"seed {seed}")
    old = len(look_points(pass_size, spacing=pass_size))  # 64, 128, ... and the pass's end
    left.axhline(alpha / old, ls=":", c="grey", label=f"alpha / {old} (doubling looks)")
    new = len(look_points(pass_size))
    left.axhline(alpha / new, ls="--", c="k", label=f"alpha / {new} (looks every {LOOK_SPACING})")
    left.set(xlabel="items visited", ylabel="noise test p-value", title="the test over one pass")
    left.legend(fontsize=7)
    for seed, part in rows.groupby("seed"):
        on = part.switched_on_at.fillna(pass_size)
        right.plot(on, part.accuracy, "o", label=f"seed {seed}")
    right.set(xlabel="posterior switched on at (items visited)", ylabel="held-out accuracy")
    right.set_title("RE-IPO, one pass, flip rate 0.4")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--switch-at", type=int, nargs="*", default=list(SWITCH_AT))
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument("--held-out", type=int, default=HELD_OUT)
    parser.add_argument("--flip-rate", type=float, default=0.4)
    parser.add_argument("--every", type=int, default=LOOK_SPACING, help="visits between probes")
    args = parser.parse_args(argv)
    rows, probes = [], []
    for seed in args.seeds:
        for switch_at in [None, *args.switch_at]:
            row, seen = run(seed, switch_at, args)
            rows.append(row)
            probes.extend(seen)
            print(row, flush=True)
    frame, probe_frame = pd.DataFrame(rows), pd.DataFrame(probes)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "noise-test-looks.csv", index=False)
    probe_frame.to_csv(args.out / "noise-test-looks-p.csv", index=False)
    if len(probe_frame):
        plot(frame, probe_frame, args.pairs, args.out / "noise-test-looks.png")
    print(frame.to_string(index=False))
    return frame


if __name__ == "__main__":
    main()
