"""Held-out accuracy of eleven preference losses as the label-flip rate grows.

Experiment 1 of ``docs/experiments/noise-sweep.md``. The tiny model
(``models/tiny-llama``, full fine-tuning) learns the rule of
:mod:`repo.data.rule_pairs` (the better response carries a "good" marker word)
from labels flipped at rate rho = 0, 0.2, 0.4, and is scored on held-out pairs
against their clean labels. Methods: DPO, cDPO (label smoothing), rDPO (told the
true flip rate), Hölder-DPO (a redescending loss that ignores contradicted pairs),
and IPO, SimPO, CPO - each of DPO, IPO, SimPO and CPO also with RE-PO (EM over the
annotators' reliabilities). Two kinds of noise:

* ``single``: one annotator (K = 1) flips every label with probability rho;
* ``pool``: four annotators flip with probabilities 0, rho/2, 3 rho/2, 2 rho
  (mean rho; at rho = 0.4 two of them flip more often than not), and RE-PO is
  told who labelled what.

At rho = 0 both kinds are the same clean data, run once. Every seed draws its own
training and held-out pairs; at one seed all methods and flip rates see the same
pairs (the flipped labels at rho = 0.2 are a subset of those at 0.4), so
differences between methods are paired.

    python examples/noise_sweep.py --out docs/experiments            # the grid
    python examples/noise_sweep.py --quick --out /tmp/noise-sweep     # about a minute
    python examples/noise_sweep.py --replot --out docs/experiments   # table, figure from CSV
    python examples/noise_sweep.py --hh-rlhf --out docs/experiments  # SmolLM2 on HH-RLHF

The grid writes ``noise-sweep.csv`` (one row a run), ``noise-sweep-table.md`` and
``noise-sweep.png``; ``--hh-rlhf`` writes ``noise-sweep-hh-rlhf.json``. Progress
goes to stderr; the last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from repo.data.rule_pairs import rule_pairs
from repo.experiments import Method, annotator_pool, t_interval, train_and_score

BETA = {"dpo": 0.3, "ipo": 0.1, "simpo": 2.0, "cpo": 1.0}
"""beta per family (DPO's also for cDPO, rDPO and Hölder-DPO); see the docs page for how chosen."""
TEMPERATURE = {"dpo": 1.0, "ipo": 20.0, "simpo": 1.0, "cpo": 50.0}
"""RE-PO's E-step temperature per family."""
CDPO_EPSILON = 0.1
HOLDER_GAMMA = 1.0
"""Hölder-DPO's exponent: the family's default (the Brier case), not tuned."""
MARKERS = 4
HELD_OUT = 500
SETTINGS = (("single", 0.0), ("single", 0.2), ("single", 0.4), ("pool", 0.2), ("pool", 0.4))
FAMILIES = ("dpo", "ipo", "simpo", "cpo")
PLAIN_NAMES = {"dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "cpo": "CPO"}


def methods(flip_rate: float) -> list[Method]:
    """The eleven methods at mean flip rate ``flip_rate`` (rDPO is told it)."""
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
        out.append(
            Method(
                "RE-" + PLAIN_NAMES[family],
                family,
                True,
                loss,
                em={"temperature": TEMPERATURE[family]},
            )
        )
    return out


@dataclass
class Grid:
    """What to run: noise settings, seeds, data sizes and the optimizer's fields."""

    settings: tuple[tuple[str, float], ...] = SETTINGS
    seeds: tuple[int, ...] = (10, 11, 12, 13, 14, 15)
    num_pairs: int = 512
    held_out: int = HELD_OUT
    optim: dict = dataclasses.field(default_factory=dict)
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


def run_grid(grid: Grid, csv_path: Path | None = None) -> pd.DataFrame:
    """Train and score every method on every setting and seed; one row a run.

    Rows are appended to ``csv_path`` as runs finish (a crash loses one run).
    """
    rows = []
    total = len(grid.settings) * len(grid.seeds) * len(methods(0.0))
    done = 0
    start = time.perf_counter()
    for seed in grid.seeds:
        held_out = rule_pairs(grid.held_out, [1.0], seed=10_000 + seed, markers=MARKERS).rows
        for noise, rho in grid.settings:
            data = rule_pairs(
                grid.num_pairs, annotator_etas(noise, rho), seed=seed, markers=MARKERS
            )
            for method in methods(rho):
                done += 1
                if grid.only and method.name not in grid.only:
                    continue
                result = train_and_score(data.rows, held_out, method, seed=seed, optim=grid.optim)
                eta_hat = [result.eta[f"a{k}"] for k in range(len(data.eta))] if result.eta else []
                row = {
                    "noise": noise,
                    "flip_rate": rho,
                    "seed": seed,
                    "method": method.name,
                    "family": method.family,
                    "re_po": method.robust,
                    "accuracy": result.accuracy,
                    "realised_flip_rate": data.flip_rate,
                    "eta_true": json.dumps([round(float(e), 4) for e in data.realised_eta]),
                    "eta_hat": json.dumps([round(e, 4) for e in eta_hat]),
                    "steps": result.steps,
                    "wall_s": round(result.wall_seconds, 2),
                    "cpu_s": round(result.cpu_seconds, 2),
                }
                rows.append(row)
                if csv_path is not None:
                    pd.DataFrame([row]).to_csv(
                        csv_path, mode="a", header=len(rows) == 1, index=False
                    )
                elapsed = time.perf_counter() - start
                print(
                    f"[{done}/{total}] {noise} rho={rho} seed={seed} {method.name}: "
                    f"acc {result.accuracy:.3f}"
                    + (f" eta {np.round(eta_hat, 3).tolist()}" if eta_hat else "")
                    + f" ({result.wall_seconds:.1f} s; {elapsed / 60:.1f} min so far)",
                    file=sys.stderr,
                    flush=True,
                )
    return pd.DataFrame(rows)


def setting_label(noise: str, rho: float) -> str:
    """A column name: ``rho=0`` (clean, shared by both kinds), ``K=1 rho=0.2``, ``pool rho=0.2``."""
    if rho == 0:
        return "clean"
    return f"{'K=1' if noise == 'single' else 'pool'} {rho:g}"


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean held-out accuracy and the 95% t-interval half-width per setting and method."""
    out = []
    for (noise, rho, method), group in frame.groupby(["noise", "flip_rate", "method"], sort=False):
        mean, half = t_interval(group["accuracy"].to_numpy())
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


def paired_gains(frame: pd.DataFrame) -> pd.DataFrame:
    """RE-PO minus the plain loss, per family and setting: mean of the per-seed
    differences (same data) and its 95% t-interval half-width."""
    out = []
    for (noise, rho), group in frame.groupby(["noise", "flip_rate"], sort=False):
        for family in FAMILIES:
            plain = group[(group.family == family) & ~group.re_po].set_index("seed").accuracy
            robust = group[(group.family == family) & group.re_po].set_index("seed").accuracy
            diff = (robust - plain).dropna()
            if diff.empty:
                continue
            mean, half = t_interval(diff.to_numpy())
            out.append(
                {
                    "noise": noise,
                    "flip_rate": rho,
                    "setting": setting_label(noise, rho),
                    "family": PLAIN_NAMES[family],
                    "seeds": len(diff),
                    "mean": mean,
                    "half_width": half,
                }
            )
    return pd.DataFrame(out)


def eta_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """RE-PO runs: learned reliabilities against the realised ones (means over seeds)."""
    out = []
    robust = frame[frame.re_po]
    for (noise, rho, method), group in robust.groupby(["noise", "flip_rate", "method"], sort=False):
        hat = np.array([json.loads(x) for x in group.eta_hat])
        true = np.array([json.loads(x) for x in group.eta_true])
        out.append(
            {
                "noise": noise,
                "flip_rate": rho,
                "method": method,
                "eta_true": np.round(true.mean(axis=0), 3).tolist(),
                "eta_hat": np.round(hat.mean(axis=0), 3).tolist(),
                "mean_abs_error": float(np.abs(hat - true).mean()),
            }
        )
    return pd.DataFrame(out)


def _cell(mean: float, half: float, signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    if math.isnan(half):
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {half:.3f}"


def markdown_tables(frame: pd.DataFrame) -> str:
    """The accuracy table, the RE-PO gain table and the reliability table, in Markdown."""
    summary = summarise(frame)
    columns = list(dict.fromkeys(summary.setting))
    names = list(dict.fromkeys(summary.method))
    lines = [
        "Held-out accuracy against clean labels (mean ± 95% t-interval half-width over "
        f"{int(summary.seeds.max())} seeds):",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = []
        for col in columns:
            match = summary[(summary.method == name) & (summary.setting == col)]
            first = None if match.empty else match.iloc[0]
            cells.append("" if first is None else _cell(first["mean"], first.half_width))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gains = paired_gains(frame)
    lines += [
        "",
        "RE-PO minus the plain loss (paired by seed; mean ± 95% t-interval half-width):",
        "",
        "| family | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for family in dict.fromkeys(gains.family):
        cells = []
        for col in columns:
            match = gains[(gains.family == family) & (gains.setting == col)]
            cells.append(
                "" if match.empty else _cell(match["mean"].iloc[0], match.half_width.iloc[0], True)
            )
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    etas = eta_summary(frame)
    lines += [
        "",
        "Learned reliabilities of the RE-PO runs (means over seeds; true = realised share "
        "of correct labels per annotator):",
        "",
        "| method | setting | true eta | learned eta | mean abs. error |",
        "|---|---|---|---|---|",
    ]
    for _, r in etas.iterrows():
        fmt = ", ".join(f"{x:.3f}" for x in r.eta_true)
        hat = ", ".join(f"{x:.3f}" for x in r.eta_hat)
        lines.append(
            f"| {r.method} | {setting_label(r.noise, r.flip_rate)} | {fmt} | {hat} | "
            f"{r.mean_abs_error:.3f} |"
        )
    return "\n".join(lines) + "\n"


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
        "IPO": ["IPO", "RE-IPO"],
        "SimPO": ["SimPO", "RE-SimPO"],
        "CPO": ["CPO", "RE-CPO"],
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
                ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(frame: pd.DataFrame) -> dict:
    """Mean accuracies per setting and method, and RE-PO's paired gains."""
    summary = summarise(frame)
    gains = paired_gains(frame)
    acc: dict[str, dict[str, float]] = {}
    for _, r in summary.iterrows():
        acc.setdefault(r.setting, {})[r.method] = round(r["mean"], 4)
    gain: dict[str, dict[str, list[float]]] = {}
    for _, r in gains.iterrows():
        gain.setdefault(r.setting, {})[r.family] = [
            round(r["mean"], 4),
            round(r.half_width, 4) if not math.isnan(r.half_width) else None,
        ]
    return {"accuracy": acc, "re_po_minus_plain": gain}


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--replot", action="store_true", help="table and figure from the CSV")
    parser.add_argument("--hh-rlhf", action="store_true", help="SmolLM2 on HH-RLHF instead")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.hh_rlhf:
        result = run_hh_rlhf(HHSettings())
        (args.out / "noise-sweep-hh-rlhf.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return result
    grid = QUICK if args.quick else Grid()
    if args.seeds:
        grid = dataclasses.replace(grid, seeds=tuple(args.seeds))
    stem = "noise-sweep-quick" if args.quick else "noise-sweep"
    csv_path = args.out / f"{stem}.csv"
    if args.replot:
        frame = pd.read_csv(csv_path)
    else:
        csv_path.unlink(missing_ok=True)
        frame = run_grid(grid, csv_path)
    tables = markdown_tables(frame)
    (args.out / f"{stem}-table.md").write_text(tables)
    plot(frame, args.out / f"{stem}.png")
    print(tables)
    result = {
        "experiment": "noise_sweep",
        "quick": args.quick,
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
