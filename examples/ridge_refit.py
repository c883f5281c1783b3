"""Where EM stops on the one-annotator ridge, against the likelihood's maximum.

With one annotator and the symmetric flip, the likelihood of ``(eta, a)`` at a scorer's
logits read through a Platt scale ``a`` is a long, flat ridge when the scorer is weak
(``docs/math.md`` section 9). EM's refit (:func:`repo.inference.online.fit_calibrated`)
runs from the model's start (``eta_init = 0.9``) at every scale of ``REFIT_SCALES`` and
stops when the objective changes by less than ``tol = 1e-6`` of itself: on the ridge,
short of the maximum. The refit now also starts EM at the profile likelihood's maximum
(:meth:`repo.noise.base.NoiseModel.eta_profile`) and keeps that fit when it is higher.

This simulation measures what that does to ``eta``'s error against the realised share
of correct labels, with a scorer calibrated by construction: truths ``z ~ Bernoulli(
sigmoid(c))`` at logits ``c ~ N(0, sd^2)``, labels right with probability ``eta``.

* ``stalled``: EM from the model's start at every scale of ``REFIT_SCALES``, the highest
  fit kept (the refit before the profile's start);
* ``refit``: :func:`~repo.inference.online.fit_calibrated`, the profile's start included.

    python examples/ridge_refit.py --out docs/experiments

Writes ``ridge-refit.csv`` (one row per size, reliability, spread and seed) and prints
the table of ``ridge-refit-table.md``: the mean absolute error of each, the seeds the
profile's start changed, and the mean width of the profile's 95% interval.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from repo.diagnostics.report import markdown_table
from repo.inference.online import REFIT_SCALES, fit_calibrated, fit_from_starts
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData
from repo.scorers import CalibratedLogits


def simulate(seed: int, n: int, sd: float, eta: float) -> tuple[torch.Tensor, LabelData, float]:
    """Logits, one annotator's labels, and the realised share of correct labels."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=g, dtype=torch.float64) * sd
    z = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(c)).double()
    correct = torch.rand(n, generator=g, dtype=torch.float64) < eta
    label = torch.where(correct, z, 1 - z)
    data = LabelData.from_labels(torch.zeros(n, dtype=torch.long), label, num_annotators=1)
    return c, data, float(correct.double().mean())


def stalled_fit(c: torch.Tensor, data: LabelData) -> tuple[float, float]:
    """EM from ``eta_init = 0.9`` at every scale of ``REFIT_SCALES``: ``(eta, objective)``
    of the highest fit."""
    best: tuple[float, float] | None = None
    for scale in REFIT_SCALES:
        noise = SymmetricFlip(1)
        start = [{k: v.detach().clone() for k, v in noise.state_dict().items()}]
        result = fit_from_starts(noise, CalibratedLogits(c, scale), data, start, 1e-6, 500)
        if best is None or result.objective > best[1]:
            best = (float(noise.eta.detach()[0]), result.objective)
    return best


def run_one(n: int, eta: float, sd: float, seed: int) -> dict:
    """Both fits of one simulated data set."""
    c, data, realised = simulate(seed, n, sd, eta)
    eta_stalled, objective_stalled = stalled_fit(c, data)
    noise = SymmetricFlip(1)
    start = [{k: v.detach().clone() for k, v in noise.state_dict().items()}]
    result, _ = fit_calibrated(noise, c, data, start)
    profile = noise.eta_profile(c, data)
    return {
        "pairs": n,
        "eta": eta,
        "sd": sd,
        "seed": seed,
        "realised": realised,
        "eta_stalled": eta_stalled,
        "eta_refit": float(noise.eta.detach()[0]),
        "objective_gain": result.objective - objective_stalled,
        "interval_low": profile.interval[0],
        "interval_high": profile.interval[1],
    }


def table(rows: pd.DataFrame) -> str:
    """MAE of each fit against the realised share, per size, reliability and spread."""
    out = []
    for (n, eta, sd), g in rows.groupby(["pairs", "eta", "sd"]):
        changed = (g.eta_refit - g.eta_stalled).abs() > 1e-3
        out.append(
            {
                "pairs": int(n),
                "eta": eta,
                "sd of logits": sd,
                "MAE stalled": f"{(g.eta_stalled - g.realised).abs().mean():.4f}",
                "MAE refit": f"{(g.eta_refit - g.realised).abs().mean():.4f}",
                "seeds changed": f"{int(changed.sum())} of {len(g)}",
                "interval width": f"{(g.interval_high - g.interval_low).mean():.3f}",
            }
        )
    return markdown_table(pd.DataFrame(out))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--reliabilities", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seeds", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    start = time.time()
    for n in args.sizes:
        for eta in args.reliabilities:
            for sd in args.spreads:
                for seed in range(args.seeds):
                    rows.append(run_one(n, eta, sd, seed))
                print(f"{n} {eta} {sd} ({time.time() - start:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "ridge-refit.csv", index=False)
    text = table(frame)
    (args.out / "ridge-refit-table.md").write_text(text + "\n")
    print(text)
    return frame


if __name__ == "__main__":
    main()
