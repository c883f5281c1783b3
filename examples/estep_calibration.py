"""Why EM over-estimates one annotator's reliability: the E-step's scorer, tracked over training.

Experiment of ``docs/experiments/estep-calibration.md`` (issue: calibrated EM). The
tiny model learns the rule of :mod:`repo.data.rule_pairs` by RE-DPO from one
annotator (K = 1) whose labels are flipped at rate rho, for four epochs (the
first is one pass, where every E-step is out of sample). At every quarter epoch it
records, at the current policy:

* ``eta_online``: the trainer's reliability (the paper's EMA, Algorithm 1);
* ``w_clean`` / ``w_flipped``: the mean posterior that a label is correct, over the
  training labels that are correct / flipped (in-sample E-step);
* ``agree``: the share of training labels that agree with ``sign(s)``;
* ``held_accuracy``, ``held_log_loss``, ``held_ece``: accuracy and calibration of
  ``sigmoid(s)`` on held-out pairs against their clean labels;
* ``scale_held``: the Platt scale (no intercept) that would calibrate ``s`` on held-out
  pairs (:func:`repo.scorers.calibration_scale` on the clean labels);
* the maximum-likelihood eta at the current policy, three ways: ``eta_in`` (training
  labels, the scorer as it is), ``eta_in_cal`` (training labels, scale learned by EM
  jointly, :class:`repo.scorers.CalibratedLogits`) and ``eta_out_cal`` (a fresh set
  of labels from the same annotator the policy never trained on, scale learned: what
  cross-fitting would give).

With ``--ablation`` it runs, on the same data, what separates the causes at the end
of training: plain DPO; RE-DPO as it is; RE-DPO with eta frozen at the realised
share of correct labels (an oracle: what a perfect eta estimate would buy); and a
2-fold cross-fit (two policies by plain DPO, each on half the pairs, each scoring
the other half's labels out of sample), whose EM eta is fitted with the scale held
(``eta_xfit``) or learned (``eta_xfit_cal``); ``dpo_xfit_clean``: plain DPO on the
labels whose cross-fitted posterior ``w`` is at least 1/2, the others reversed.

    python examples/estep_calibration.py --out docs/experiments
    python examples/estep_calibration.py --ablation --out docs/experiments
    python examples/estep_calibration.py --quick --out /tmp/estep-calibration

Writes ``estep-calibration.csv`` (one row a snapshot), ``estep-calibration-table.md``
and ``estep-calibration.png`` (``--ablation``: ``estep-calibration-ablation.csv`` and
``estep-calibration-ablation-table.md``); the last line printed is one JSON object.
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
from repo.inference.em import EM, fit_em
from repo.noise import LabelData, SymmetricFlip
from repo.scorers import CalibratedLogits, FixedLogits, calibration_scale
from repo.train import Trainer
from repo.train.dataset import TrainingData
from repo.train.evaluate import calibration, item_scores

BETA = 0.3
MARKERS = 4
READ_POLICY = {"cross_fit": False}
"""Every RE-DPO here reads the policy's own scores, the E-step whose calibration this
experiment tracks, at any size (over several passes at 4,096 items or more one
annotator's default reads cross-fitted scores instead, docs/math.md section 13; the
ablation's cross-fit is built by hand, as it was before that default)."""


@dataclass
class Grid:
    """Flip rates, seeds, data sizes, epochs and snapshots per epoch."""

    flip_rates: tuple[float, ...] = (0.2, 0.4)
    seeds: tuple[int, ...] = (10, 11, 12)
    num_pairs: int = 512
    held_out: int = 500
    epochs: int = 4
    snapshots: int = 4


QUICK = Grid(flip_rates=(0.4,), seeds=(10,), num_pairs=64, held_out=64, epochs=2, snapshots=1)


def ml_eta(logits: torch.Tensor, data, learn_scale: bool) -> tuple[float, float]:
    """``(eta, scale)``: EM of one symmetric-flip annotator at fixed logits."""
    noise = SymmetricFlip(1)
    scorer = CalibratedLogits(logits, 1.0) if learn_scale else FixedLogits(logits)
    fit_em(noise, scorer, data, tol=1e-9)
    scale = float(scorer.scale.detach()) if learn_scale else 1.0
    return float(noise.eta.detach()[0]), scale


def run_one(rho: float, seed: int, grid: Grid) -> list[dict]:
    """One RE-DPO run; a row per snapshot."""
    train = rule_pairs(grid.num_pairs, [1 - rho], seed=seed, markers=MARKERS)
    fresh = rule_pairs(grid.held_out, [1 - rho], seed=20_000 + seed, markers=MARKERS)
    held = rule_pairs(grid.held_out, [1.0], seed=10_000 + seed, markers=MARKERS)
    clean = torch.tensor([r["clean"] for r in train.rows])
    method = Method("RE-DPO", "dpo", True, {"beta": BETA}, em=dict(READ_POLICY))
    rows = []
    with tempfile.TemporaryDirectory(prefix="re-po-estep-") as tmp:
        config = rule_config(tmp, method, seed=seed, optim={"epochs": grid.epochs})
        trainer = Trainer(
            config, records=load_preferences(train.rows, annotator_column="annotator")
        )
        tokenizer = trainer.pair_tokenizer

        def build(rows_):
            records = load_preferences(rows_, annotator_column="annotator")
            return TrainingData.build(records, tokenizer)

        held_data, fresh_data = build(held.rows), build(fresh.rows)
        per_epoch = trainer.schedule.steps_per_epoch
        every = max(1, per_epoch // grid.snapshots)

        def snapshot() -> None:
            labels = trainer.data.labels
            unit_logits, posterior = trainer.full_posterior()
            w = trainer.noise.label_correct(unit_logits, labels, posterior.marginals)[labels.mask]
            observed = labels.label[labels.mask]
            s_held, _, _ = item_scores(trainer.policy, trainer.likelihood, held_data, batch_size=64)
            o_held = held_data.labels.label[:, 0]
            s_fresh, _, _ = item_scores(
                trainer.policy, trainer.likelihood, fresh_data, batch_size=64
            )
            cal = calibration(torch.sigmoid(s_held), o_held)
            eta_in, _ = ml_eta(unit_logits, labels, learn_scale=False)
            eta_in_cal, scale_in = ml_eta(unit_logits, labels, learn_scale=True)
            fresh_units = s_fresh[fresh_data.labels.unit]
            eta_out_cal, scale_out = ml_eta(fresh_units, fresh_data.labels, learn_scale=True)
            rows.append(
                {
                    "flip_rate": rho,
                    "seed": seed,
                    "step": trainer.step,
                    "epoch": trainer.step / per_epoch,
                    "eta_true": float(train.realised_eta[0]),
                    "eta_online": float(trainer.noise.eta.detach()[0]),
                    "w_clean": float(w[clean].mean()),
                    "w_flipped": float(w[~clean].mean()) if (~clean).any() else float("nan"),
                    "agree": float(((unit_logits > 0).double() == observed).double().mean()),
                    "held_accuracy": float(((s_held > 0).double() == o_held).double().mean()),
                    "held_log_loss": cal["log_loss"],
                    "held_ece": cal["ece"],
                    "scale_held": calibration_scale(s_held, o_held),
                    "eta_in": eta_in,
                    "eta_in_cal": eta_in_cal,
                    "scale_in": scale_in,
                    "eta_out_true": float(fresh.realised_eta[0]),
                    "eta_out_cal": eta_out_cal,
                    "scale_out": scale_out,
                }
            )

        snapshot()
        while trainer.step < trainer.total_steps:
            trainer.train_step(trainer.step)
            trainer.step += 1
            if trainer.step % every == 0:
                snapshot()
    return rows


def _train(rows: list[dict], method: Method, seed: int, epochs: int) -> Trainer:
    """A finished run of ``method`` on ``rows`` (in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="re-po-estep-") as tmp:
        config = rule_config(tmp, method, seed=seed, optim={"epochs": epochs})
        trainer = Trainer(config, records=load_preferences(rows, annotator_column="annotator"))
        trainer.train()
    return trainer


def _accuracy(trainer: Trainer, rows: list[dict]) -> float:
    records = load_preferences(rows, annotator_column="annotator")
    return float(trainer.evaluate(records)["accuracy"])


def ablation_one(rho: float, seed: int, grid: Grid) -> dict:
    """Held-out accuracy and eta of the ablation's methods (module docstring) on one
    data set."""
    train = rule_pairs(grid.num_pairs, [1 - rho], seed=seed, markers=MARKERS)
    held = rule_pairs(grid.held_out, [1.0], seed=10_000 + seed, markers=MARKERS)
    realised = float(train.realised_eta[0])
    epochs = grid.epochs
    dpo = Method("DPO", "dpo", False, {"beta": BETA})
    re_dpo = Method("RE-DPO", "dpo", True, {"beta": BETA}, em=dict(READ_POLICY))
    oracle = Method(
        "RE-DPO, oracle eta",
        "dpo",
        True,
        {"beta": BETA},
        em={"alpha": 1e-12, **READ_POLICY},
        noise={"eta_init": min(max(realised, 1e-3), 1 - 1e-3)},
    )
    row: dict = {"flip_rate": rho, "seed": seed, "eta_true": realised}
    row["acc_dpo"] = _accuracy(_train(train.rows, dpo, seed, epochs), held.rows)
    trainer = _train(train.rows, re_dpo, seed, epochs)
    row["acc_re_dpo"] = _accuracy(trainer, held.rows)
    row["eta_re_dpo"] = float(trainer.noise.eta.detach()[0])
    row["acc_oracle"] = _accuracy(_train(train.rows, oracle, seed, epochs), held.rows)
    # 2-fold cross-fit: each half scored by the policy trained on the other half
    folds = [train.rows[0::2], train.rows[1::2]]
    halves = [_train(rows, dpo, seed, epochs) for rows in folds]
    logits, labels, order = [], [], []
    for f in (0, 1):
        scorer = halves[1 - f]
        records = load_preferences(folds[f], annotator_column="annotator")
        data = TrainingData.build(records, scorer.pair_tokenizer)
        s, _, _ = item_scores(scorer.policy, scorer.likelihood, data, batch_size=64)
        logits.append(s[data.labels.unit])
        labels.append(data.labels.label[:, 0])
        order += folds[f]
    s, o = torch.cat(logits), torch.cat(labels)
    data = LabelData.from_labels(torch.zeros(len(s), dtype=torch.long), o, num_annotators=1)
    row["eta_xfit"], _ = ml_eta(s, data, learn_scale=False)
    row["eta_xfit_cal"], row["scale_xfit"] = ml_eta(s, data, learn_scale=True)
    noise = SymmetricFlip(1)
    fit_em(noise, FixedLogits(s), data, tol=1e-9)
    _, posterior = EM(noise, FixedLogits(s), data).e_step()[:2]
    w = noise.label_correct(s, data, posterior.marginals)[:, 0]
    cleaned = [
        r if keep else {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        for r, keep in zip(order, (w >= 0.5).tolist(), strict=True)
    ]
    row["acc_dpo_xfit_clean"] = _accuracy(_train(cleaned, dpo, seed, epochs), held.rows)
    return row


def summarise_ablation(frame: pd.DataFrame) -> str:
    """Markdown: per flip rate, means (± 95% t half-width) and paired differences to DPO."""
    columns = [
        ("eta_true", "realised eta"),
        ("eta_re_dpo", "eta, RE-DPO (online EMA)"),
        ("eta_xfit", "eta, 2-fold cross-fit, scale held"),
        ("eta_xfit_cal", "eta, 2-fold cross-fit, scale learned"),
        ("acc_dpo", "accuracy, DPO"),
        ("acc_re_dpo", "accuracy, RE-DPO"),
        ("acc_oracle", "accuracy, RE-DPO with eta frozen at the truth"),
        ("acc_dpo_xfit_clean", "accuracy, DPO on cross-fit-cleaned labels"),
    ]
    rates = sorted(frame.flip_rate.unique())
    lines = ["| measure | " + " | ".join(f"rho={r:g}" for r in rates) + " |"]
    lines.append("|---" * (1 + len(rates)) + "|")

    def cell(values: np.ndarray) -> str:
        mean, half = t_interval(values)
        return f"{mean:.3f}" + (f" ± {half:.3f}" if np.isfinite(half) else "")

    for column, name in columns:
        lines.append(
            f"| {name} | "
            + " | ".join(cell(frame[frame.flip_rate == r][column].to_numpy()) for r in rates)
            + " |"
        )
    for column, name in [
        ("acc_re_dpo", "RE-DPO minus DPO"),
        ("acc_oracle", "oracle-eta RE-DPO minus DPO"),
        ("acc_dpo_xfit_clean", "cross-fit-cleaned DPO minus DPO"),
    ]:
        cells = []
        for r in rates:
            g = frame[frame.flip_rate == r]
            mean, half = t_interval((g[column] - g.acc_dpo).to_numpy())
            cells.append(f"{mean:+.3f}" + (f" ± {half:.3f}" if np.isfinite(half) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for column, name in [
        ("eta_re_dpo", "eta error, RE-DPO"),
        ("eta_xfit", "eta error, cross-fit, scale held"),
        ("eta_xfit_cal", "eta error, cross-fit, scale learned"),
    ]:
        cells = []
        for r in rates:
            g = frame[frame.flip_rate == r]
            cells.append(f"{(g[column] - g.eta_true).abs().mean():.3f}")
        lines.append(f"| mean abs. {name} | " + " | ".join(cells) + " |")
    return (
        f"Means over {frame.seed.nunique()} seeds (± 95% t-interval half-width; differences "
        "paired by seed), one annotator, end of training.\n\n" + "\n".join(lines) + "\n"
    )


def summarise(frame: pd.DataFrame) -> str:
    """Markdown: per flip rate, at the end of epoch 1 (one pass) and of the last epoch,
    means over seeds (± 95% t-interval half-width) of each measure."""
    columns = [
        ("eta_true", "realised eta"),
        ("eta_online", "eta, online EMA (today)"),
        ("eta_in", "ML eta, in-sample"),
        ("eta_in_cal", "ML eta, in-sample, scale learned"),
        ("eta_out_cal", "ML eta, out-of-sample, scale learned"),
        ("eta_out_true", "realised eta of the out-of-sample labels"),
        ("w_clean", "mean w, correct labels"),
        ("w_flipped", "mean w, flipped labels"),
        ("agree", "training labels agreeing with sign(s)"),
        ("held_accuracy", "held-out accuracy"),
        ("held_log_loss", "held-out log loss"),
        ("held_ece", "held-out ECE"),
        ("scale_held", "scale calibrating s on held-out"),
    ]
    epochs = sorted({1.0, float(frame.epoch.max())})
    header = "| measure | " + " | ".join(
        f"rho={rho:g}, epoch {e:g}" for rho in sorted(frame.flip_rate.unique()) for e in epochs
    )
    lines = [header + " |", "|---" * (1 + len(epochs) * frame.flip_rate.nunique()) + "|"]
    for column, name in columns:
        cells = []
        for rho in sorted(frame.flip_rate.unique()):
            for e in epochs:
                values = frame[(frame.flip_rate == rho) & np.isclose(frame.epoch, e)][column]
                mean, half = t_interval(values.to_numpy())
                cells.append(f"{mean:.3f}" + (f" ± {half:.3f}" if np.isfinite(half) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = frame.seed.nunique()
    return (
        f"Means over {seeds} seeds (± 95% t-interval half-width), RE-DPO, one annotator.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Eta estimates, w of correct and flipped labels, and held-out calibration over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(frame.flip_rate.unique())
    fig, axes = plt.subplots(len(rates), 3, figsize=(15, 4.2 * len(rates)), squeeze=False)
    for r, rho in enumerate(rates):
        mean = frame[frame.flip_rate == rho].groupby("epoch").mean(numeric_only=True)
        ax = axes[r][0]
        for column, label in [
            ("eta_online", "online EMA (today)"),
            ("eta_in", "ML, in-sample"),
            ("eta_in_cal", "ML, in-sample, scale learned"),
            ("eta_out_cal", "ML, out-of-sample, scale learned"),
        ]:
            ax.plot(mean.index, mean[column], marker=".", label=label)
        ax.axhline(mean.eta_true.iloc[0], color="black", ls="--", label="realised eta")
        ax.set(
            title=f"rho = {rho:g}: eta estimates", xlabel="epoch", ylabel="eta", ylim=(0.0, 1.02)
        )
        ax.legend(fontsize=8)
        ax = axes[r][1]
        ax.plot(mean.index, mean.w_clean, marker=".", label="w, correct labels")
        ax.plot(mean.index, mean.w_flipped, marker=".", label="w, flipped labels")
        ax.plot(mean.index, mean.agree, marker=".", label="labels agreeing with sign(s)")
        ax.axhline(mean.eta_true.iloc[0], color="black", ls="--", label="realised eta")
        ax.set(title=f"rho = {rho:g}: in-sample posteriors", xlabel="epoch", ylim=(0.3, 1.02))
        ax.legend(fontsize=8)
        ax = axes[r][2]
        ax.plot(mean.index, mean.held_accuracy, marker=".", label="held-out accuracy")
        ax.plot(mean.index, mean.held_log_loss, marker=".", label="held-out log loss")
        ax.plot(mean.index, mean.held_ece, marker=".", label="held-out ECE")
        ax2 = ax.twinx()
        ax2.plot(mean.index, mean.scale_held, color="grey", ls=":", label="scale a (right axis)")
        ax2.set_ylabel("scale a that calibrates s on held-out pairs")
        ax.set(title=f"rho = {rho:g}: held-out calibration of sigmoid(s)", xlabel="epoch")
        handles = ax.get_legend_handles_labels()
        extra = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="one small run (tests)")
    parser.add_argument("--ablation", action="store_true", help="the ablation (docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = QUICK if args.quick else Grid()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ablation:
        rows = []
        for rho in grid.flip_rates:
            for seed in grid.seeds:
                rows.append(ablation_one(rho, seed, grid))
                print(json.dumps({k: round(v, 3) for k, v in rows[-1].items()}), file=sys.stderr)
        frame = pd.DataFrame(rows)
        frame.to_csv(args.out / "estep-calibration-ablation.csv", index=False)
        table = summarise_ablation(frame)
        (args.out / "estep-calibration-ablation-table.md").write_text(table, encoding="utf-8")
        result = {"runs": len(rows), "mean": frame.mean(numeric_only=True).round(4).to_dict()}
        print(json.dumps(result))
        return result
    rows = []
    for rho in grid.flip_rates:
        for seed in grid.seeds:
            rows += run_one(rho, seed, grid)
            last = rows[-1]
            print(
                f"rho={rho} seed={seed}: eta true {last['eta_true']:.3f}, online "
                f"{last['eta_online']:.3f}, in {last['eta_in']:.3f}, in+cal "
                f"{last['eta_in_cal']:.3f}, out+cal {last['eta_out_cal']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "estep-calibration.csv", index=False)
    (args.out / "estep-calibration-table.md").write_text(summarise(frame), encoding="utf-8")
    plot(frame, args.out / "estep-calibration.png")
    final = frame[np.isclose(frame.epoch, frame.epoch.max())]
    result = {
        "runs": int(frame.seed.nunique() * frame.flip_rate.nunique()),
        "final_mean_abs_error": {
            name: float((final[name] - final[truth]).abs().mean())
            for name, truth in [
                ("eta_online", "eta_true"),
                ("eta_in", "eta_true"),
                ("eta_in_cal", "eta_true"),
                ("eta_out_cal", "eta_out_true"),
            ]
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
