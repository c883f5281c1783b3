"""Variational inference and MAP with Pyro autoguides, latents enumerated.

The guide covers the continuous parameters only: :class:`~pyro.infer.autoguide.AutoNormal`
(a mean-field Normal in unconstrained space) for SVI, or
:class:`~pyro.infer.autoguide.AutoDelta` (a point mass: the posterior mode) for
MAP. Autoguides refuse models with discrete sample sites, so the guide is built on
the model with every enumerated site hidden (:func:`pyro.poutine.block`), while the
objective is :class:`~pyro.infer.TraceEnum_ELBO` on the full model: the discrete
latents are summed out exactly in the ELBO::

    ELBO(q) = E_q(theta) [ log p(theta) + sum_i log sum_{z_i} p(z_i | s_i) p(o_i | z_i, theta)
                           - log q(theta) ]

Convergence: the ELBO (one Monte Carlo sample per step for AutoNormal; exact for
AutoDelta) is averaged over windows of ``window`` steps; the run stops when the
relative change between two consecutive window means falls below ``tol``, and
reports whether that happened within ``steps``.
"""

from __future__ import annotations

import time

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_median, init_to_value
from torch import Tensor

from repo.inference.draws import PosteriorDraws
from repo.inference.enumeration import MAX_PLATE_NESTING, local_params
from repo.noise.base import NoiseModel
from repo.noise.layout import LabelData


def enumerated_sites(model: NoiseModel, logits: Tensor, data: LabelData) -> list[str]:
    """Names of the sites marked for parallel enumeration (the discrete latents)."""
    with local_params(), poutine.block():
        trace = poutine.trace(model).get_trace(logits, data)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
    ]


def _converged(trace: list[float], window: int, tol: float) -> bool:
    if len(trace) < 2 * window:
        return False
    last = float(np.mean(trace[-window:]))
    before = float(np.mean(trace[-2 * window : -window]))
    return abs(last - before) <= tol * abs(last)


def fit_autoguide(
    bayes_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    *,
    guide: str = "normal",
    steps: int = 3000,
    lr: float = 0.05,
    seed: int = 0,
    tol: float = 1e-4,
    window: int = 100,
    init: dict[str, Tensor] | None = None,
) -> tuple[AutoNormal | AutoDelta, dict]:
    """Fit an autoguide (``"normal"`` or ``"delta"``) by SVI; see the module docstring.

    :returns: the fitted guide and facts of the run (``elbo`` trace per step,
        ``converged``, ``steps``, ``seconds``).
    """
    if guide not in ("normal", "delta"):
        raise ValueError(f"guide must be 'normal' or 'delta', got {guide!r}")
    bayes_model.check_bayesian()
    logits = logits.detach()
    pyro.set_rng_seed(seed)
    hidden = enumerated_sites(bayes_model, logits, data)
    continuous = poutine.block(bayes_model, hide=hidden)
    init_loc = init_to_value(values=init) if init else init_to_median
    with local_params():
        if guide == "normal":
            autoguide = AutoNormal(continuous, init_loc_fn=init_loc, init_scale=0.05)
        else:
            autoguide = AutoDelta(continuous, init_loc_fn=init_loc)
        elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
        svi = SVI(bayes_model, autoguide, pyro.optim.ClippedAdam({"lr": lr}), elbo)
        start = time.perf_counter()
        trace: list[float] = []
        converged = False
        scale = max(data.num_labels, 1)
        for _ in range(steps):
            trace.append(-svi.step(logits, data) / scale)
            if len(trace) % window == 0 and _converged(trace, window, tol):
                converged = True
                break
    info = {
        "guide": guide,
        "elbo": trace,
        "elbo_per_label": True,
        "converged": converged,
        "steps": len(trace),
        "lr": lr,
        "tol": tol,
        "seconds": time.perf_counter() - start,
    }
    return autoguide, info


def run_svi(
    bayes_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    *,
    num_draws: int = 1000,
    seed: int = 0,
    **options,
) -> PosteriorDraws:
    """Mean-field Normal SVI (AutoNormal); ``num_draws`` draws from the fitted guide.

    ``options`` go to :func:`fit_autoguide` (``steps``, ``lr``, ``tol``, ``window``,
    ``init``).
    """
    autoguide, info = fit_autoguide(bayes_model, logits, data, guide="normal", seed=seed, **options)
    start = time.perf_counter()
    pyro.set_rng_seed(seed + 1)
    draws: dict[str, list[np.ndarray]] = {}
    with local_params(), torch.no_grad():
        for _ in range(num_draws):
            for name, value in autoguide(logits.detach(), data).items():
                draws.setdefault(name, []).append(value.numpy().astype(np.float64))
    samples = {name: np.stack(values)[None] for name, values in draws.items()}
    seconds = {"fit": info.pop("seconds"), "draws": time.perf_counter() - start}
    seconds["total"] = seconds["fit"] + seconds["draws"]
    return PosteriorDraws(method="svi", samples=samples, seconds=seconds, info=info)


def run_map(
    bayes_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    *,
    seed: int = 0,
    **options,
) -> tuple[dict[str, Tensor], dict]:
    """The posterior mode (AutoDelta): ``argmax_theta log p(theta) + log p(o | theta)``.

    :returns: the mode by site name (constrained) and facts of the run.
    """
    options.setdefault("lr", 0.02)
    options.setdefault("tol", 1e-7)
    autoguide, info = fit_autoguide(bayes_model, logits, data, guide="delta", seed=seed, **options)
    with local_params(), torch.no_grad():
        mode = {k: v.detach().clone() for k, v in autoguide.median(logits, data).items()}
    return mode, info
