"""Calibration studies of the posterior on simulated annotators with known truth.

* :func:`coverage_study`: replications of a symmetric-flip pool (``eta_k ~
  Beta(a, b)``, scores ``s ~ N(0, 3^2)`` given to the fit, per-label truth) with
  label counts from ``max_labels`` down to ``min_labels`` (Zipf-like:
  ``n_r ∝ r^-alpha``, the heavy-tailed shape of real crowds); per annotator the
  NUTS 90% interval, R-hat, bulk ESS and the EM estimate, so one can ask how often
  the interval covers the truth and the EM estimate.
* :func:`sbc_ranks`: simulation-based calibration (Talts et al., 2018): draw
  ``eta ~ prior``, simulate labels, sample the posterior and record the rank of the
  true ``eta_k`` among ``L`` thinned draws; ranks are uniform on ``0..L`` when
  the inference is calibrated. :func:`rank_uniformity` gives the chi-square test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch
from scipy import stats

from repo.inference.bayes import BayesSettings, infer, summarise_draws
from repo.inference.em import fit_em
from repo.noise import LabelData, SymmetricFlip
from repo.scorers import FixedLogits


def label_counts(num_annotators: int, min_labels: int, max_labels: int) -> np.ndarray:
    """``max_labels * r^-alpha`` for ranks ``r = 1..K``, ``alpha`` so the last is
    ``min_labels``."""
    alpha = np.log(max_labels / min_labels) / np.log(num_annotators)
    ranks = np.arange(1, num_annotators + 1)
    return np.round(max_labels * ranks**-alpha).astype(int)


def simulate_pool(
    counts: np.ndarray, eta: np.ndarray, rng: np.random.Generator, logit_scale: float = 3.0
) -> tuple[LabelData, FixedLogits]:
    """Per-label truth ``z ~ Bernoulli(sigmoid(s))``, ``o = z`` with probability ``eta_k``."""
    annotator = np.repeat(np.arange(counts.size), counts)
    scores = rng.normal(0.0, logit_scale, annotator.size)
    truth = rng.random(annotator.size) < 1 / (1 + np.exp(-scores))
    label = np.where(rng.random(annotator.size) < eta[annotator], truth, ~truth).astype(float)
    data = LabelData.from_labels(annotator, label, num_annotators=counts.size)
    return data, FixedLogits(torch.as_tensor(scores))


def _beta(a: float, b: float) -> dist.Beta:
    return dist.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def _fit_pool(counts, prior, settings, seed):
    """Simulate a pool from ``seed``, fit EM then NUTS: (true eta, EM model, result)."""
    rng = np.random.default_rng(seed)
    eta = rng.beta(*prior, counts.size)
    data, scorer = simulate_pool(counts, eta, rng)
    model = SymmetricFlip(counts.size, prior=_beta(*prior))
    fit_em(model, scorer, data)
    settings.seed = seed
    return eta, model, infer("nuts", model, scorer, data, settings)


def coverage_study(
    replications: int,
    settings: BayesSettings,
    *,
    num_annotators: int = 50,
    min_labels: int = 20,
    max_labels: int = 2000,
    prior: tuple[float, float] = (4.0, 1.5),
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (replication, annotator): ``n_labels``, ``eta_true``, ``em``,
    ``lo90``, ``hi90``, ``r_hat``, ``ess_bulk``, ``divergences`` (of the run)."""
    counts = label_counts(num_annotators, min_labels, max_labels)
    rows = []
    for replication in range(replications):
        eta, model, result = _fit_pool(counts, prior, settings, seed + replication)
        frame, _ = summarise_draws(result)
        rows.append(
            pd.DataFrame(
                {
                    "replication": replication,
                    "annotator": np.arange(num_annotators),
                    "n_labels": counts,
                    "eta_true": eta,
                    "em": model.eta.detach().numpy(),
                    "lo90": frame["eta_lo90"].to_numpy(),
                    "hi90": frame["eta_hi90"].to_numpy(),
                    "r_hat": frame["eta_r_hat"].to_numpy(),
                    "ess_bulk": frame["eta_ess_bulk"].to_numpy(),
                    "divergences": result.draws.num_divergences,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def coverage_figures(study: pd.DataFrame) -> dict[str, float]:
    """Coverage of the truth, share of EM estimates inside, worst R-hat and ESS."""
    inside = (study.eta_true >= study.lo90) & (study.eta_true <= study.hi90)
    em_inside = (study.em >= study.lo90) & (study.em <= study.hi90)
    return {
        "intervals": int(len(study)),
        "coverage90": float(inside.mean()),
        "em_inside90": float(em_inside.mean()),
        "max_r_hat": float(study.r_hat.max()),
        "min_ess_bulk": float(study.ess_bulk.min()),
        "divergences": int(study.groupby("replication").divergences.first().sum()),
    }


def sbc_ranks(
    replications: int,
    settings: BayesSettings,
    *,
    num_annotators: int = 3,
    labels_per_annotator: int = 60,
    prior: tuple[float, float] = (4.0, 1.5),
    thin_to: int = 99,
    seed: int = 0,
) -> np.ndarray:
    """``(replications, K)`` ranks of the true ``eta_k`` among ``thin_to`` thinned
    posterior draws (NUTS), each in ``0..thin_to``."""
    counts = np.full(num_annotators, labels_per_annotator)
    ranks = np.empty((replications, num_annotators), dtype=int)
    for replication in range(replications):
        eta, _, result = _fit_pool(counts, prior, settings, seed + replication)
        draws = result.draws.samples["eta"].reshape(-1, num_annotators)
        keep = np.linspace(0, draws.shape[0] - 1, thin_to).round().astype(int)
        ranks[replication] = (draws[keep] < eta).sum(0)
    return ranks


def rank_uniformity(ranks: np.ndarray, thin_to: int = 99, bins: int = 10) -> dict[str, float]:
    """Chi-square test that the ranks are uniform on ``0..thin_to`` (``bins`` bins)."""
    flat = ranks.reshape(-1)
    counts = np.histogram(flat, bins=bins, range=(-0.5, thin_to + 0.5))[0]
    result = stats.chisquare(counts)
    return {
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "bins": counts.tolist(),
    }
