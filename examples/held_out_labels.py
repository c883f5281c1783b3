"""Held-out labels against every label trained on: one annotator, rule pairs, the tiny model.

Compares RE-X with ``[em] held_out = true`` (a tenth of the items kept out of every
batch, the annotator parameters refitted on their scores after each pass;
``docs/math.md`` section 12) with RE-X training on every label (``held_out = false``,
the default of every family but IPO, and IPO's before held-out labels became its
default at 8,192 pairs) and with plain X, seed by seed on the same data. The runs are
the noise sweep's (``examples/noise_sweep.py``):

.. code-block:: bash

    # the held-out runs (about 75 s a run at four epochs, 25 s at one pass, one core);
    # RE-IPO at 8,192 pairs holds out by default, so plain "RE-IPO" runs the same
    for m in RE-DPO RE-IPO RE-SimPO RE-CPO; do for e in 1 4; do
      python examples/noise_sweep.py --out /tmp/held-out --pairs 8192 --epochs $e \\
        --settings single:0.2 single:0.4 --seeds 20 21 22 23 24 25 26 27 28 29 \\
        --methods "$m em.held_out=true"
    done; done
    # and RE-IPO on the fresh seeds 30 to 37 (flip rate 0.4, four epochs), and at
    # 512 pairs (seeds 10 to 19); the rows gathered, with a pairs column, in
    # docs/experiments/noise-sweep-held-out-labels.csv; then the table
    python examples/held_out_labels.py --out docs/experiments

The runs it is paired with are those of the sweep's CSVs (:data:`BASE_CSVS`); RE-IPO's
and RE-CPO's with every label trained on at 8,192 pairs after four epochs are kept in
``noise-sweep-pairs8192-ipo-online.csv`` and ``-cpo-online.csv`` (``RE-X
em.held_out=false``), since the sweep's own rows of both hold labels out. Writes
``held-out-labels-table.md``; ``--held-out`` and ``--table`` name another CSV of
held-out runs and its table (RE-CPO's, run when held-out labels became its default:
``--held-out noise-sweep-held-out-labels-cpo.csv --table held-out-labels-cpo-table.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise_sweep import eta_errors, plain_name  # noqa: E402

from repo.experiments import t_interval  # noqa: E402

HELD_OUT_CSV = "noise-sweep-held-out-labels.csv"
BASE_CSVS = (
    (8192, "noise-sweep-pairs8192.csv"),
    (8192, "noise-sweep-pairs8192-epochs1.csv"),
    (8192, "noise-sweep-pairs8192-holdout.csv"),
    (8192, "noise-sweep-pairs8192-ipo-online.csv"),
    (8192, "noise-sweep-pairs8192-cpo-online.csv"),
    (512, "noise-sweep.csv"),
)
"""The sweep's runs the held-out ones are paired with: (pairs, CSV)."""
FRESH_SEEDS = range(30, 38)
"""Seeds first run after the defaults they test were chosen (reported apart)."""
FAMILIES = ("DPO", "IPO", "SimPO", "CPO")


def _cell(values: np.ndarray, signed: bool = True) -> str:
    mean, half = t_interval(values)
    return f"{mean:+.3f} ± {half:.3f}" if signed else f"{mean:.3f} ± {half:.3f}"


def every_label(frame: pd.DataFrame, family: str) -> pd.DataFrame:
    """RE-X's runs with every label trained on: ``RE-X em.held_out=false`` where the
    frame has them (IPO, whose default holds labels out at 8,192 pairs), else ``RE-X``."""
    explicit = frame[frame.method == f"RE-{family} em.held_out=false"]
    return explicit if len(explicit) else frame[frame.method == f"RE-{family}"]


def compare(held_out: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per data size, regime, flip rate, family and seed set (the sweep's or
    :data:`FRESH_SEEDS`), over the seeds both frames hold: held-out RE-X minus X and
    minus RE-X with every label trained on (held-out accuracy, paired by seed), the
    lowest held-out accuracy of a run, and each RE-X's mean absolute ``eta`` error.
    Both frames have a ``pairs`` column."""
    rows = []
    held_out = held_out.assign(fresh=held_out.seed.isin(FRESH_SEEDS))
    keys = ["noise", "pairs", "epochs", "flip_rate", "fresh"]
    for (noise, pairs, epochs, rho, _), group in held_out.groupby(keys, sort=True):
        for method, runs in group.groupby("method", sort=False):
            family = plain_name(method)
            same = base[
                (base.noise == noise)
                & (base.pairs == pairs)
                & (base.epochs == epochs)
                & (base.flip_rate == rho)
            ]
            plain = same[same.method == family].set_index("seed")
            default = every_label(same, family).set_index("seed")
            runs = runs.set_index("seed")
            seeds = sorted(set(runs.index) & set(plain.index) & set(default.index))
            if not seeds:
                continue
            r, p, d = runs.loc[seeds], plain.loc[seeds], default.loc[seeds]
            rows.append(
                {
                    "pairs": int(pairs),
                    "epochs": int(epochs),
                    "flip_rate": float(rho),
                    "family": family,
                    "seeds": f"{len(seeds)} ({min(seeds)}-{max(seeds)})",
                    "minus_plain": _cell((r.accuracy - p.accuracy).to_numpy()),
                    "minus_default": _cell((r.accuracy - d.accuracy).to_numpy()),
                    "default_minus_plain": _cell((d.accuracy - p.accuracy).to_numpy()),
                    "lowest": f"{r.accuracy.min():.3f} ({d.accuracy.min():.3f})",
                    "eta_mae": _cell(eta_errors(r), signed=False),
                    "default_eta_mae": _cell(eta_errors(d), signed=False),
                }
            )
    order = {f: i for i, f in enumerate(FAMILIES)}
    frame = pd.DataFrame(rows)
    return frame.sort_values(
        ["pairs", "epochs", "flip_rate", "family", "seeds"],
        key=lambda c: c.map(order) if c.name == "family" else c,
    )


def markdown(table: pd.DataFrame) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| pairs | regime | flip rate | family | seeds | held-out RE-X minus X "
        "| minus RE-X, all labels | RE-X, all labels, minus X | lowest run (all labels) "
        "| eta error, held-out | eta error, all labels |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        regime = "one pass" if r.epochs == 1 else f"{r.epochs} epochs"
        lines.append(
            f"| {r.pairs:,} | {regime} | {r.flip_rate} | {r.family} | {r.seeds} | "
            f"{r.minus_plain} | {r.minus_default} | {r.default_minus_plain} | {r.lowest} | "
            f"{r.eta_mae} | "
            f"{r.default_eta_mae} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument(
        "--held-out",
        default=HELD_OUT_CSV,
        help="the CSV of held-out runs in --out (a noise sweep's rows with a pairs column)",
    )
    parser.add_argument(
        "--table", default="held-out-labels-table.md", help="the table's file name in --out"
    )
    args = parser.parse_args(argv)
    read = {"dtype": {"seed": int}}
    held_out = pd.read_csv(args.out / args.held_out, **read)
    base = pd.concat(
        [pd.read_csv(args.out / name, **read).assign(pairs=pairs) for pairs, name in BASE_CSVS]
    )
    table = compare(held_out, base)
    text = markdown(table)
    (args.out / args.table).write_text(text, encoding="utf-8")
    print(text)
    return table


if __name__ == "__main__":
    main()
