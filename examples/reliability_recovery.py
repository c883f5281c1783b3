"""Does RE-DPO recover the annotators' reliabilities? Estimated against true eta.

Experiment 2 of ``docs/experiments/reliability-recovery.md`` (after the RE-PO
paper's Figure 2). RE-DPO trains the tiny model (``models/tiny-llama``, full
fine-tuning, starting at p = 1/2 exactly: the policy is its own reference) on
rule pairs (:mod:`repo.data.rule_pairs`) whose labels are flipped at rate rho =
0, 0.1, ..., 0.8, in two settings:

* ``one``: a single annotator flips with probability rho (true eta = 1 - rho);
* ``two``: half of the labels come from a reliable annotator (flip rate 0.1,
  eta = 0.9) and half from one flipping with probability rho.

For each run (512 pairs, four epochs, or one pass with ``--epochs 1``) the learned
reliability of every annotator (at the end of training, ``eta_0 = 0.9``,
``alpha = 0.1``) is compared with its realised share of correct labels, and the
policy's held-out accuracy against clean labels says which rule it learned (with
the log loss and expected calibration error of ``sigmoid(s)``, 15 bins). RE-DPO runs
with ``[em]`` at its defaults, as a user gets it: with one annotator ``eta`` learns
from first visits and is refit after every epoch (``out_of_sample = "auto"``; 512 pairs
are too few for cross-fitted scores, ``cross_fit = "auto"``, which the ``cross_fit``
column records), with two by the paper's online update and a refit on each epoch's
scores at its end (``epoch_m_step = "auto"``). ``--methods RE-DPO "RE-DPO online"``
runs beside it the online update with one annotator too (``out_of_sample = false``).

Above rho = 0.5 with one annotator the likelihood's symmetry (scores -> -scores,
eta -> 1 - eta) has nothing to break it but ``eta_0 > 0.5``: the question is
what the runs do.

    python examples/reliability_recovery.py --out docs/experiments
    python examples/reliability_recovery.py --quick --out /tmp/recovery   # half a minute
    python examples/reliability_recovery.py --epochs 1 --out docs/experiments  # one pass

Writes ``reliability-recovery.csv`` (one row per run and annotator; ``-epochs{N}``
before the suffix off four epochs),
``reliability-recovery-table.md`` and ``reliability-recovery.png``. Progress goes to
stderr; the last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from repo.data.rule_pairs import rule_pairs
from repo.experiments import Method, method_from_text, t_interval, train_and_score

RE_DPO = Method("RE-DPO", "dpo", True, {"beta": 0.3})
"""The noise sweep's RE-DPO (beta 0.3; eta_0 = 0.9, alpha = 0.1) with ``[em]`` at its
defaults: out-of-sample annotator statistics with one annotator, the paper's online
update and a refit after each epoch with two (``out_of_sample`` and ``epoch_m_step``
``"auto"``; with 4,096 pairs or more and one annotator over several passes, cross-fitted
E-step scores instead, ``cross_fit = "auto"``, docs/math.md section 13)."""
RE_DPO_ONLINE = Method(
    "RE-DPO online", "dpo", True, {"beta": 0.3}, em={"out_of_sample": False, "cross_fit": False}
)
"""RE-DPO with the paper's online update of eta, reading the policy, also for one
annotator (``[em] out_of_sample = false``, the default before ``"auto"``, and
``cross_fit = false``, so that it stays so at any size)."""
METHODS = {m.name: m for m in (RE_DPO, RE_DPO_ONLINE)}
RELIABLE_FLIP = 0.1
MARKERS = 4


@dataclass
class Grid:
    """Settings, flip rates, seeds, data sizes and optimizer fields."""

    settings: tuple[str, ...] = ("one", "two")
    flip_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    seeds: tuple[int, ...] = tuple(range(10, 20))
    num_pairs: int = 512
    held_out: int = 500
    optim: dict = dataclasses.field(default_factory=lambda: {"epochs": EPOCHS})
    methods: tuple[str, ...] = (RE_DPO.name,)  # RE_DPO_ONLINE on request (--methods)


EPOCHS = 4
"""Passes over the data (the noise sweep's two leave the noisier estimates unconverged)."""
QUICK = Grid(flip_rates=(0.2, 0.8), seeds=(10,), held_out=200, methods=("RE-DPO",))
"""Two flip rates, one seed, RE-DPO as shipped: the grid's seed-10 runs at rho = 0.2 and 0.8."""


def etas(setting: str, rho: float) -> list[float]:
    """True reliabilities: ``[1 - rho]`` (one) or ``[0.9, 1 - rho]`` (two)."""
    if setting == "one":
        return [1.0 - rho]
    if setting == "two":
        return [1.0 - RELIABLE_FLIP, 1.0 - rho]
    raise ValueError(f"unknown setting {setting!r}: one or two")


def recover(
    setting: str,
    rho: float,
    seed: int,
    grid: Grid,
    method: Method = RE_DPO,
    reference_cache_dir: Path | None = None,
) -> list[dict]:
    """One run of ``method``; one row per annotator: true and learned eta, held-out
    accuracy, log loss and ECE."""
    data = rule_pairs(grid.num_pairs, etas(setting, rho), seed=seed, markers=MARKERS)
    held_out = rule_pairs(grid.held_out, [1.0], seed=10_000 + seed, markers=MARKERS).rows
    result = train_and_score(
        data.rows,
        held_out,
        method,
        seed=seed,
        optim=grid.optim,
        reference_cache_dir=reference_cache_dir,
    )
    rows = []
    for k, nominal in enumerate(data.eta):
        rows.append(
            {
                "method": method.name,
                "epochs": int(grid.optim.get("epochs", EPOCHS)),
                "out_of_sample": result.estep.out_of_sample,
                "epoch_m_step": result.estep.epoch_m_step,
                "cross_fit": result.estep.cross_fit,
                "noise_evident": result.noise_test.rejected if result.noise_test else None,
                "setting": setting,
                "flip_rate": rho,
                "seed": seed,
                "annotator": f"a{k}",
                "role": "noisy" if k == len(data.eta) - 1 else "reliable",
                "eta_nominal": round(float(nominal), 4),
                "eta_true": round(float(data.realised_eta[k]), 4),
                "eta_hat": round(result.eta[f"a{k}"], 4),
                "accuracy": result.accuracy,
                "log_loss": round(result.log_loss, 5),
                "ece": round(result.ece, 5),
                "wall_s": round(result.wall_seconds, 2),
            }
        )
    return rows


def method_named(text: str) -> Method:
    """A method of :data:`METHODS` by name, or a variant of one with fields of its
    sections set: ``"RE-DPO em.epoch_m_step=true"``
    (:func:`repo.experiments.method_from_text`)."""
    return method_from_text(text, METHODS)


def grid_methods(grid: Grid) -> list[Method]:
    """The grid's methods."""
    return [method_named(n) for n in grid.methods]


def run_grid(
    grid: Grid, csv_path: Path | None = None, reference_cache_dir: Path | None = None
) -> pd.DataFrame:
    """Every setting, flip rate, seed and method; rows appended to ``csv_path`` as runs
    finish (``reference_cache_dir``: reference log-probs kept between runs)."""
    rows: list[dict] = []
    chosen = grid_methods(grid)
    total = len(grid.settings) * len(grid.flip_rates) * len(grid.seeds) * len(chosen)
    done = 0
    start = time.perf_counter()
    for seed in grid.seeds:
        for setting in grid.settings:
            for rho in grid.flip_rates:
                for method in chosen:
                    new = recover(setting, rho, seed, grid, method, reference_cache_dir)
                    rows += new
                    done += 1
                    if csv_path is not None:
                        pd.DataFrame(new).to_csv(
                            csv_path, mode="a", header=len(rows) == len(new), index=False
                        )
                    learned = ", ".join(f"{r['eta_true']:.3f} -> {r['eta_hat']:.3f}" for r in new)
                    print(
                        f"[{done}/{total}] {method.name} {setting} rho={rho} seed={seed}: "
                        f"eta {learned}; acc {new[0]['accuracy']:.3f} "
                        f"({(time.perf_counter() - start) / 60:.1f} min)",
                        file=sys.stderr,
                        flush=True,
                    )
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method, setting, flip rate and annotator: means over seeds and 95% t-intervals."""
    out = []
    keys = ["method", "setting", "flip_rate", "annotator", "role"]
    for (method, setting, rho, annotator, role), g in frame.groupby(keys, sort=False):
        eta_hat, eta_half = t_interval(g.eta_hat.to_numpy())
        acc, acc_half = t_interval(g.accuracy.to_numpy())
        out.append(
            {
                "method": method,
                "setting": setting,
                "flip_rate": rho,
                "annotator": annotator,
                "role": role,
                "seeds": len(g),
                "eta_true": g.eta_true.mean(),
                "eta_hat": eta_hat,
                "eta_hat_half_width": eta_half,
                "abs_error": (g.eta_hat - g.eta_true).abs().mean(),
                "mirror_error": (g.eta_hat - (1 - g.eta_true)).abs().mean(),
                "accuracy": acc,
                "accuracy_half_width": acc_half,
                "log_loss": g.log_loss.mean(),
                "ece": g.ece.mean(),
            }
        )
    return pd.DataFrame(out)


def _pm(mean: float, half: float) -> str:
    return f"{mean:.3f}" if np.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """Per method, one row per flip rate: true and learned eta of each annotator, the
    varied annotator's mean absolute error over seeds, held-out accuracy, log loss and
    ECE."""
    s = summarise(frame)
    seeds = int(s.seeds.max())
    lines = [
        f"Means over {seeds} seeds ± 95% t-interval half-width; true eta = realised share "
        "of correct labels; accuracy = held-out accuracy against clean labels; log loss "
        "and ECE (15 bins) of sigmoid(s) against the same labels.",
    ]
    for method in dict.fromkeys(s.method):
        lines += [
            "",
            f"{method}:",
            "",
            "| rho | one: true eta | one: learned eta | one: eta MAE | one: accuracy "
            "| one: log loss / ECE | two: reliable true / learned | two: noisy true "
            "| two: noisy learned | two: noisy MAE | two: accuracy | two: log loss / ECE |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        part = s[s.method == method]
        for rho in sorted(part.flip_rate.unique()):
            one = part[(part.setting == "one") & (part.flip_rate == rho)]
            two = part[(part.setting == "two") & (part.flip_rate == rho)]
            cells = [f"{rho:g}"]
            if one.empty:
                cells += ["", "", "", "", ""]
            else:
                o = one.iloc[0]
                cells += [
                    f"{o.eta_true:.3f}",
                    _pm(o.eta_hat, o.eta_hat_half_width),
                    f"{o.abs_error:.3f}",
                    _pm(o.accuracy, o.accuracy_half_width),
                    f"{o.log_loss:.3f} / {o.ece:.3f}",
                ]
            if two.empty:
                cells += ["", "", "", "", "", ""]
            else:
                r = two[two.role == "reliable"].iloc[0]
                n = two[two.role == "noisy"].iloc[0]
                cells += [
                    f"{r.eta_true:.3f} / {r.eta_hat:.3f}",
                    f"{n.eta_true:.3f}",
                    _pm(n.eta_hat, n.eta_hat_half_width),
                    f"{n.abs_error:.3f}",
                    _pm(n.accuracy, n.accuracy_half_width),
                    f"{n.log_loss:.3f} / {n.ece:.3f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Top: learned against true eta (every run a point, means joined), identity and
    mirror lines; bottom: held-out accuracy against true eta of the noisy annotator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s_all = summarise(frame)
    online = s_all[s_all.method == RE_DPO_ONLINE.name]
    frame = frame[frame.method == RE_DPO.name]
    s = s_all[s_all.method == RE_DPO.name]
    settings = [x for x in ("one", "two") if (frame.setting == x).any()]
    fig, axes = plt.subplots(
        2, len(settings), figsize=(5.2 * len(settings), 8), squeeze=False, sharex=True
    )
    titles = {
        "one": "one annotator",
        "two": f"two annotators (one fixed at flip rate {RELIABLE_FLIP:g})",
    }
    for j, setting in enumerate(settings):
        ax, ax_acc = axes[0, j], axes[1, j]
        grid = np.linspace(0, 1, 11)
        ax.plot(grid, grid, color="black", linewidth=1, label="identity")
        ax.plot(grid, 1 - grid, color="grey", linewidth=1, linestyle=":", label="mirror 1 - eta")
        ax.axvline(0.5, color="grey", linewidth=0.6)
        raw = frame[frame.setting == setting]
        mean = s[s.setting == setting]
        styles = {"noisy": ("C3", "o", "varied annotator"), "reliable": ("C0", "s", "reliable")}
        for role, (colour, marker, label) in styles.items():
            r = raw[raw.role == role]
            m = mean[mean.role == role].sort_values("eta_true")
            if r.empty:
                continue
            if setting == "one":
                label = "the annotator"
            ax.scatter(r.eta_true, r.eta_hat, color=colour, marker=marker, alpha=0.45, s=18)
            ax.plot(m.eta_true, m.eta_hat, color=colour, marker=marker, label=label)
        for role in ("noisy", "reliable"):
            m = online[(online.setting == setting) & (online.role == role)].sort_values("eta_true")
            if not m.empty:
                who = "the annotator" if setting == "one" else f"{role} annotator"
                label = f"{RE_DPO_ONLINE.name} ({who})"
                ax.plot(m.eta_true, m.eta_hat, color="C5", linestyle="--", marker=".", label=label)
        ax.set_xlim(0.1, 1.02)
        ax.set_ylim(0.1, 1.02)
        ax.set_title(titles[setting])
        ax.set_ylabel("learned eta (RE-DPO)")
        ax.legend(fontsize=8, loc="upper left")
        noisy = mean[mean.role == "noisy"].sort_values("eta_true")
        raw_noisy = raw[raw.role == "noisy"]
        ax_acc.scatter(raw_noisy.eta_true, raw_noisy.accuracy, color="C2", alpha=0.45, s=18)
        ax_acc.plot(noisy.eta_true, noisy.accuracy, color="C2", marker="o", label=RE_DPO.name)
        m = online[(online.setting == setting) & (online.role == "noisy")].sort_values("eta_true")
        if not m.empty:
            ax_acc.plot(
                m.eta_true, m.accuracy, color="C5", linestyle="--", label=RE_DPO_ONLINE.name
            )
            ax_acc.legend(fontsize=8, loc="lower right")
        ax_acc.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        ax_acc.axvline(0.5, color="grey", linewidth=0.6)
        ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.set_xlabel(
            "true eta (realised share of correct labels"
            + (", varied annotator)" if setting == "two" else ")")
        )
        ax_acc.set_ylabel("held-out accuracy (clean labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(frame: pd.DataFrame, method: str = RE_DPO.name) -> dict:
    """Mean absolute errors below and above rho = 0.5, and what happens at the top rate,
    of ``method``'s runs."""
    s = summarise(frame)
    s = s[s.method == method]
    out: dict = {}
    for setting in dict.fromkeys(s.setting):
        part = s[(s.setting == setting) & (s.role == "noisy")]
        low, high = part[part.flip_rate < 0.5], part[part.flip_rate > 0.5]
        top = part.loc[part.flip_rate.idxmax()]
        out[setting] = {
            "mae_rho_below_0.5": round(float(low.abs_error.mean()), 4) if len(low) else None,
            "mae_rho_above_0.5": round(float(high.abs_error.mean()), 4) if len(high) else None,
            "mirror_mae_rho_above_0.5": round(float(high.mirror_error.mean()), 4)
            if len(high)
            else None,
            "top_rho": float(top.flip_rate),
            "top_eta_true": round(float(top.eta_true), 4),
            "top_eta_hat": round(float(top.eta_hat), 4),
            "top_accuracy": round(float(top.accuracy), 4),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--quick", action="store_true", help="two flip rates, one seed")
    parser.add_argument("--replot", action="store_true", help="table and figure from the CSV")
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help=f"passes over the data (default {EPOCHS})"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    parser.add_argument("--flip-rates", type=float, nargs="+", help="override the flip rates")
    parser.add_argument(
        "--methods",
        nargs="+",
        help=f"default: {RE_DPO.name} alone; known: {', '.join(METHODS)}, or one of them with "
        "fields of its sections set, e.g. 'RE-DPO em.epoch_m_step=true' (TOML values)",
    )
    parser.add_argument(
        "--settings", nargs="+", choices=("one", "two"), help="default: one and two annotators"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    grid = dataclasses.replace(QUICK if args.quick else Grid(), optim={"epochs": args.epochs})
    if args.seeds:
        grid = dataclasses.replace(grid, seeds=tuple(args.seeds))
    if args.flip_rates:
        grid = dataclasses.replace(grid, flip_rates=tuple(args.flip_rates))
    if args.methods:
        for name in args.methods:
            try:
                method_named(name)
            except ValueError as err:
                parser.error(str(err))
        grid = dataclasses.replace(grid, methods=tuple(args.methods))
    if args.settings:
        grid = dataclasses.replace(grid, settings=tuple(args.settings))
    stem = "reliability-recovery" + ("-quick" if args.quick else "")
    if args.epochs != EPOCHS:
        stem += f"-epochs{args.epochs}"
    csv_path = args.out / f"{stem}.csv"
    if args.replot:
        frame = pd.read_csv(csv_path)
    else:
        csv_path.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="recovery-reference-") as cache:
            frame = run_grid(grid, csv_path, reference_cache_dir=Path(cache))
    table = markdown_table(frame)
    (args.out / f"{stem}-table.md").write_text(table)
    plot(frame, args.out / f"{stem}.png")
    print(table)
    runs = frame.drop_duplicates(["method", "setting", "flip_rate", "seed"])
    result = {
        "experiment": "reliability_recovery",
        "quick": args.quick,
        "runs": len(runs),
        "seeds": sorted(int(x) for x in frame.seed.unique()),
        "train_pairs": grid.num_pairs,
        "epochs": args.epochs,
        **headline(frame),
        **{m: headline(frame, m) for m in frame.method.unique() if m != RE_DPO.name},
        "run_wall_s": round(float(runs.wall_s.sum()), 1),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
