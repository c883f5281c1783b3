"""Which E-step settings each loss family gets by default: the evidence.

Experiment of ``docs/experiments/estep-defaults.md``. One annotator (K = 1) flips
each label with probability rho = 0.2 or 0.4; the tiny model learns the rule pairs of
:mod:`repo.data.rule_pairs` in one pass and in four epochs, exactly as in
``examples/noise_sweep.py`` (same data per seed, same optimizer, same beta per
family), and RE-X is run under several E-step settings:

* ``fixed``: the E-step reads the induced logit ``s`` at face value (temperature 1,
  scale not learned; every family's default before this experiment);
* ``learned``: the E-step reads ``a s`` with the scale ``a`` learned by EM, one
  undamped Newton step per optimizer step (``[em] calibrate = true``; the default now
  for the families that are not likelihood-style);
* ``T=20`` (IPO) and ``T=50`` (CPO): the fixed temperatures the noise sweep used;
* ``T=50 learned`` (CPO): the learned scale started at 1/50;
* ``nll`` (IPO, CPO): the EM-derived policy step instead of the family's mixture;
* ``<default> oos``: the family's default with ``[em] out_of_sample = true`` (eta from
  first visits; the default with one annotator for DPO), at K = 1 and on clean data;
* ``<default> warm-up`` (IPO, SimPO, CPO): the family's default with an EM warm-up of a
  quarter of the optimizer steps (``[em] warmup_steps``: 8 in one pass, 32 in four
  epochs; the policy learns from the raw labels before the E-step reads it), in every
  noise setting.

and the plain losses X (``plain``), so that RE-X minus X is paired by seed. Clean
data (rho = 0) and the noise sweep's pool (four annotators flipping at 0, rho/2,
3 rho/2 and 2 rho, told apart; rho = 0.4) are run for the plain losses, each
family's default (:data:`DEFAULTS`) and ``fixed`` only. Runs that the noise sweep had already made
with the same seeds, data and settings were copied from its CSVs (their ``ece`` is
kept; runs made by this script's first version lack it).

    python examples/estep_defaults.py --out docs/experiments            # runs, table
    python examples/estep_defaults.py --table --out docs/experiments    # table from the CSV

Rows go to ``estep-defaults.csv`` as runs finish (runs already there are skipped);
``estep-defaults-table.md`` holds RE-X minus X (accuracy, mean over seeds, 95% t
interval), the learned eta's mean absolute error and the held-out log loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_sweep as sweep  # noqa: E402

from repo.data.rule_pairs import rule_pairs  # noqa: E402
from repo.experiments import Method, t_interval, train_and_score  # noqa: E402
from repo.likelihoods import get_likelihood  # noqa: E402

SETTINGS: dict[str, dict] = {
    "fixed": {"temperature": 1.0, "calibrate": False, "out_of_sample": False},
    "learned": {"temperature": 1.0, "calibrate": True, "out_of_sample": False},
    "T=20": {"temperature": 20.0, "calibrate": False, "out_of_sample": False},
    "T=50": {"temperature": 50.0, "calibrate": False, "out_of_sample": False},
    "T=50 learned": {"temperature": 50.0, "calibrate": True, "out_of_sample": False},
    "nll": {"temperature": 1.0, "calibrate": False, "out_of_sample": False},
}
"""E-step settings by name (``[em]`` fields); a name with the suffix :data:`OOS` is the
setting with ``out_of_sample = true``."""
OOS = " oos"
"""Suffix of a setting run with ``[em] out_of_sample = true`` (``"fixed oos"``)."""
WARMUP = " warm-up"
"""Suffix of a setting run with an EM warm-up of :data:`WARMUP_SHARE` of the steps."""
WARMUP_SHARE = 0.25
STEPS_PER_EPOCH = 32
"""Optimizer steps an epoch: 512 pairs in batches of 16 (the noise sweep's)."""
GRID: dict[str, tuple[str, ...]] = {
    "dpo": ("fixed", "learned", "fixed oos"),
    "ipo": ("fixed", "learned", "T=20", "nll", "learned oos", "learned warm-up"),
    "simpo": ("fixed", "learned", "learned oos", "learned warm-up"),
    "cpo": (
        "fixed", "learned", "T=50", "T=50 learned", "nll", "T=50 learned oos",
        "T=50 learned warm-up",
    ),
}  # fmt: skip
"""The settings run per family (at K = 1, rho = 0.2 and 0.4)."""
DEFAULTS = {"dpo": "fixed", "ipo": "learned", "simpo": "learned", "cpo": "T=50 learned"}
"""Each family's E-step default (``[em] temperature = 0``, ``calibrate = "auto"``); with
one annotator DPO's runs out of sample (``out_of_sample = "auto"``, :func:`default_for`)."""
STEP = {"simpo": "mixture"}
"""The policy step of the runs where it is not the family's default now: SimPO's was
the mixture when they were made (since 2026-12-06 its default is the exact ``"nll"``
step, with no learned scale with one annotator: ``docs/experiments/noise-sweep.md``,
"SimPO's exact step"). :data:`DEFAULTS` are the E-step readings under these steps."""
NOISES = (("single", 0.2), ("single", 0.4), ("single", 0.0), ("pool", 0.4))
"""Noise settings; the last two for the plain losses, the defaults and ``fixed`` only."""
ONE_PASS_ONLY = ("nll",)
"""Settings tried in one pass only (exploratory)."""
REGIMES = (1, 4)
SEEDS = tuple(range(10, 20))


def default_for(family: str, noise: str) -> str:
    """The setting ``re-po train`` picks with ``[em]`` left alone and the policy step of
    these runs (:data:`STEP`): the family's E-step reading, out of sample with one
    annotator (``noise = "single"``) where the family's ``default_out_of_sample`` says
    so (DPO, SimPO)."""
    one_annotator = noise == "single" and get_likelihood(family).default_out_of_sample
    return DEFAULTS[family] + (OOS if one_annotator else "")


def method(family: str, setting: str, epochs: int = 1) -> Method:
    """X (``setting = "plain"``) or RE-X under an E-step setting (the noise sweep's beta)
    in a run of ``epochs`` passes. The E-step reaches the policy from the first step
    (``[em] noise_test = 0``): these settings are what the noise test, on by default
    now, switches on (the noise sweep measures the defaults with it). Every label is
    trained on (``[em] held_out = false``: IPO's held-out labels are measured in
    ``docs/experiments/held-out-labels.md``), and the E-step reads the policy's own logits
    (``[em] cross_fit = false``: one annotator's default now reads cross-fitted scores,
    ``docs/math.md`` section 13)."""
    loss = {"beta": sweep.BETA[family]}
    name = sweep.PLAIN_NAMES[family]
    if setting == "plain":
        return Method(name, family, False, loss)
    variant = "nll" if setting == "nll" else STEP.get(family)
    if variant is not None:
        loss["variant"] = variant
    em = dict(
        SETTINGS[setting.removesuffix(OOS).removesuffix(WARMUP)],
        noise_test=0.0,
        held_out=False,
        cross_fit=False,
    )
    if setting.endswith(OOS):
        em["out_of_sample"] = True
    if setting.endswith(WARMUP):
        em["warmup_steps"] = round(WARMUP_SHARE * STEPS_PER_EPOCH * epochs)
    return Method(f"RE-{name}", family, True, loss, em=em)


def settings_for(family: str, noise: str, rho: float, epochs: int) -> list[str]:
    """The settings run for ``family`` in one noise setting and regime."""
    if noise == "single" and rho > 0:
        names = ["plain", *GRID[family]]
    else:  # the default against the previous ones (``fixed``, and in sample)
        names = ["plain", DEFAULTS[family], "fixed"]
        if noise == "single":  # one annotator: the default out of sample too
            names.append(DEFAULTS[family] + OOS)
        if DEFAULTS[family] + WARMUP in GRID[family]:
            names.append(DEFAULTS[family] + WARMUP)
        names = list(dict.fromkeys(names))
    return [n for n in names if epochs == 1 or n not in ONE_PASS_ONLY]


def run(out: Path, regimes: tuple[int, ...] = REGIMES, noises=NOISES) -> None:
    """Every (regime, noise, rho, seed, family, setting) not yet in the CSV."""
    path = out / "estep-defaults.csv"
    done = set()
    if path.exists():
        old = pd.read_csv(path)
        keys = (old.epochs, old.noise, old.flip_rate, old.seed, old.family, old.setting)
        done = set(zip(*keys, strict=True))
    torch.set_num_threads(1)
    for epochs in regimes:
        for noise, rho in noises:
            for seed in SEEDS:
                held = rule_pairs(
                    sweep.HELD_OUT, [1.0], seed=10_000 + seed, markers=sweep.MARKERS
                ).rows
                etas = sweep.annotator_etas(noise, rho)
                data = rule_pairs(512, etas, seed=seed, markers=sweep.MARKERS)
                for family in GRID:
                    for setting in settings_for(family, noise, rho, epochs):
                        if (epochs, noise, rho, seed, family, setting) in done:
                            continue
                        result = train_and_score(
                            data.rows, held, method(family, setting, epochs), seed=seed,
                            optim={"epochs": epochs},
                        )  # fmt: skip
                        eta = [result.eta[f"a{k}"] for k in range(len(etas))] if result.eta else []
                        row = {
                            "epochs": epochs,
                            "noise": noise,
                            "flip_rate": rho,
                            "seed": seed,
                            "family": family,
                            "setting": setting,
                            "accuracy": result.accuracy,
                            "log_loss": round(result.log_loss, 5),
                            "ece": round(result.ece, 5),
                            "eta_hat": json.dumps([round(e, 4) for e in eta]),
                            "eta_true": json.dumps([round(float(e), 4) for e in data.realised_eta]),
                        }
                        new = not path.exists()
                        pd.DataFrame([row]).to_csv(path, mode="a", header=new, index=False)
                        print(json.dumps(row), file=sys.stderr, flush=True)


def table(out: Path) -> str:
    """RE-X minus X per family, setting, noise setting and regime (markdown)."""
    runs = pd.read_csv(out / "estep-defaults.csv")
    lines = [
        "RE-X minus X in held-out accuracy (mean over seeds ± 95% t half-width, paired by "
        "seed; `*`: the interval lies below 0, `+`: above), the learned eta's mean absolute "
        "error against the realised share of correct labels, and the held-out log loss of "
        "RE-X (of X). Defaults in bold.",
        "",
        "| family | E-step | data | regime | seeds | RE-X minus X | eta MAE | log loss (X) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, settings in GRID.items():
        for setting in settings:
            for noise, rho in NOISES:
                for epochs in REGIMES:
                    cell = runs[
                        (runs.family == family) & (runs.epochs == epochs)
                        & (runs.noise == noise) & (runs.flip_rate == rho)
                    ]  # fmt: skip
                    mine = cell[cell.setting == setting].set_index("seed")
                    base = cell[cell.setting == "plain"].set_index("seed")
                    diff = (mine.accuracy - base.accuracy).dropna()
                    if diff.empty:
                        continue
                    mean, half = t_interval(diff.to_numpy())
                    mark = "*" if mean + half < 0 else "+" if mean - half > 0 else ""
                    regime = "one pass" if epochs == 1 else f"{epochs} epochs"
                    data = sweep.setting_label(noise, rho)
                    shown = f"**{setting}**" if setting == default_for(family, noise) else setting
                    mae = sweep.eta_errors(mine).mean()
                    lines.append(
                        f"| {sweep.PLAIN_NAMES[family]} | {shown} | {data} | {regime} | "
                        f"{len(diff)} | {mean:+.3f} ± {half:.3f}{mark} | {mae:.3f} | "
                        f"{mine.log_loss.mean():.3f} ({base.log_loss.mean():.3f}) |"
                    )
    text = "\n".join(lines) + "\n"
    (out / "estep-defaults-table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--table", action="store_true", help="only the table, from the CSV")
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=list(REGIMES), help="run only these regimes"
    )
    parser.add_argument(
        "--settings", nargs="+", default=None, help="run only these, e.g. single:0.0 pool:0.4"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    noises = NOISES
    if args.settings:
        noises = tuple((n, float(r)) for n, r in (x.split(":") for x in args.settings))
    if not args.table:
        run(args.out, tuple(args.epochs), noises)
    print(table(args.out))


if __name__ == "__main__":
    main()
