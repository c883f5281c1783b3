"""Full Bayes, MAP and EM uncertainty for a fitted noise model: one entry point.

:func:`infer` takes a noise model fitted by EM (point parameters), its scorer and
data, holds the scorer's logits fixed at their fitted values (a Bradley-Terry or
class-prior scorer at its EM estimate, a policy's logits as given) and returns a
:class:`BayesResult` for one of

* ``"em"``: the EM estimate with its Laplace posterior (:mod:`repo.inference.laplace`);
* ``"map"``: the posterior mode (MAP-EM's estimate, or by SVI with an AutoDelta
  guide from another estimate), with the Laplace posterior there;
* ``"nuts"``: NUTS (:mod:`repo.inference.nuts`), its chains started near the EM
  estimate and its diagonal metric at the Laplace variances (``precondition``);
* ``"svi"``: mean-field Normal SVI (:mod:`repo.inference.svi`).

Full Bayes needs a proper prior on every parameter: a model's parameter without
one is an error when the Bayesian model is made (:meth:`NoiseModel.bayesian`),
before NUTS or SVI start. Flip models without a Beta prior get the uniform
``Beta(1, 1)`` (so MAP equals maximum likelihood); the hierarchical model's
population, the Boltzmann model's ``tau`` and GLAD's ability and ease carry their
own priors (:meth:`NoiseModel.priors`).

:func:`summarise_plates` turns draws into the RESULT.json columns, one table per
plate of the model's declared parameters (annotators, items, any other; global
parameters as single entries): for every parameter ``P`` (``eta``, the probability
that a label is correct, always from :meth:`NoiseModel.implied_eta`, and the
model's own) ``P_mean``, ``P_sd``, ``P_lo90``, ``P_hi90`` (equal-tailed 90%) and,
for NUTS, ``P_r_hat`` and ``P_ess_bulk`` (rank-normalised split R-hat and bulk
ESS, as ArviZ computes them). :func:`summarise_draws` is its annotator table and
global entries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch
from torch import Tensor

from repo.inference.draws import (
    DrawEnumeration,
    PosteriorDraws,
    enumerate_draws,
    implied_eta_draws,
    load_draw,
)
from repo.inference.laplace import laplace_draws, laplace_variances
from repo.inference.nuts import run_nuts
from repo.inference.svi import run_map, run_svi
from repo.noise.base import ANNOTATORS, REPORTED, NoiseModel
from repo.noise.hierarchical import HierarchicalFlip
from repo.noise.layout import LabelData
from repo.scorers import Scorer

METHODS = ("em", "map", "nuts", "svi")


@dataclass
class BayesSettings:
    """Settings of the samplers and approximations (the CLI's options)."""

    num_chains: int = 4
    warmup: int = 500
    draws: int = 500
    seed: int = 0
    jit_compile: bool = True
    target_accept: float = 0.8
    max_tree_depth: int = 10
    precondition: bool = True
    adapt_mass_matrix: bool = True
    svi_steps: int = 3000
    svi_lr: float = 0.05
    svi_draws: int = 1000
    laplace_draws: int = 2000
    max_enumeration_draws: int | None = None
    chain_processes: int | str = 1
    kernel_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BayesResult:
    """Draws of a noise model's parameters given fixed logits.

    :param draws: the parameters' draws (constrained).
    :param eta: ``(chains, draws, K)`` draws of each annotator's ``eta_k``.
    :param logits: the fixed logits of the truth units.
    :param bayes_model: the model with random parameters (conditions on draws).
    :param point_model: the model with point parameters at the method's point
        estimate (EM estimate, MAP mode; EM's estimate for NUTS and SVI).
    """

    method: str
    draws: PosteriorDraws
    eta: np.ndarray
    logits: Tensor
    data: LabelData
    bayes_model: NoiseModel
    point_model: NoiseModel
    settings: BayesSettings
    _enumeration: DrawEnumeration | None = None

    def enumeration(self) -> DrawEnumeration:
        """Rao-Blackwellised marginals and pointwise log-likelihood draws (cached)."""
        if self._enumeration is None:
            self._enumeration = enumerate_draws(
                self.bayes_model,
                self.logits,
                self.data,
                self.draws,
                self.settings.max_enumeration_draws,
            )
        return self._enumeration


def bayesian_copy(model: NoiseModel, missing_prior: str = "error") -> NoiseModel:
    """A copy of ``model`` with its parameters as random variables under their priors
    (a uniform Beta(1, 1) for reliability probabilities without a Beta prior); a
    parameter with no prior is an error (``missing_prior="flat"``: an improper flat
    density, for a model only conditioned on draws)."""
    out = copy.deepcopy(model)
    if out.reliability_names and out.prior is None:
        f64 = torch.float64
        out.prior = dist.Beta(torch.ones((), dtype=f64), torch.ones((), dtype=f64))
    return out.bayesian(missing_prior)


def point_values(model: NoiseModel) -> dict[str, Tensor]:
    """The model's point parameters by site name (hierarchical: ``mu``, ``sigma``
    and the posterior mean of ``logit_eta``)."""
    values = {name: getattr(model, name).detach().clone() for name in model._pyro_params}
    if isinstance(model, HierarchicalFlip):
        values["logit_eta"] = model.post_loc.clone()
    return values


def infer(
    method: str,
    model: NoiseModel,
    scorer: Scorer,
    data: LabelData,
    settings: BayesSettings | None = None,
    *,
    estimate: str | None = None,
) -> BayesResult:
    """Posterior draws for ``method`` starting from an EM-fitted ``model``.

    :param estimate: what EM estimated (``"ml"`` or ``"map"``; None: as the model was
        constructed, :mod:`repo.inference.em`): the EM Laplace approximation is of
        the log-likelihood or of the log posterior accordingly, and ``"map"`` starts
        at a model already at its MAP-EM mode (no AutoDelta climb).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    settings = settings or BayesSettings()
    with torch.no_grad():
        logits = scorer(data).detach()
    point_model = copy.deepcopy(model)
    bayes_model = bayesian_copy(model, "flat" if method == "em" else "error")
    start = point_values(model)
    if method == "em":
        with point_model.estimating(estimate or point_model._estimate):
            draws = laplace_draws(
                point_model,
                logits,
                data,
                method="em",
                num_draws=settings.laplace_draws,
                seed=settings.seed,
                include_prior=(estimate or point_model._estimate) == "map",
            )
    elif method == "map":
        if isinstance(model, HierarchicalFlip):
            raise ValueError(
                "MAP for the hierarchical model is degenerate (the joint density grows "
                "without bound as sigma -> 0): use em (marginal empirical Bayes), nuts or svi"
            )
        info = None
        if estimate != "map":  # EM's estimate is not the mode: climb to it (AutoDelta)
            mode, info = run_map(
                bayes_model, logits, data, seed=settings.seed, steps=settings.svi_steps, init=start
            )
            load_draw(point_model, mode)
        with point_model.estimating("map"):
            draws = laplace_draws(
                point_model,
                logits,
                data,
                method="map",
                num_draws=settings.laplace_draws,
                seed=settings.seed,
            )
        if info is not None:
            draws.info["optimisation"] = info
            draws.seconds["optimisation"] = info["seconds"]
    elif method == "nuts":
        inverse_mass = None
        if settings.precondition:
            with point_model.estimating("map"):  # the curvature of the log posterior
                inverse_mass = laplace_variances(point_model, logits, data)
        draws = run_nuts(
            bayes_model,
            logits,
            data,
            num_chains=settings.num_chains,
            warmup=settings.warmup,
            draws=settings.draws,
            seed=settings.seed,
            jit_compile=settings.jit_compile,
            target_accept=settings.target_accept,
            max_tree_depth=settings.max_tree_depth,
            init=start,
            inverse_mass=inverse_mass,
            adapt_mass_matrix=settings.adapt_mass_matrix,
            kernel_options=settings.kernel_options,
            chain_processes=settings.chain_processes,
        )
    else:
        draws = run_svi(
            bayes_model,
            logits,
            data,
            num_draws=settings.svi_draws,
            seed=settings.seed,
            steps=settings.svi_steps,
            lr=settings.svi_lr,
            init=start,
        )
    eta = implied_eta_draws(point_model, logits, data, draws)
    return BayesResult(method, draws, eta, logits, data, bayes_model, point_model, settings)


def _rhat_ess(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat and bulk ESS over ``(chains, draws, ...)``."""
    from repo.diagnostics.compat import ess_bulk, rhat

    return rhat(values), ess_bulk(values)


def parameter_summary(
    values: np.ndarray, point: np.ndarray | None, with_chains: bool
) -> dict[str, np.ndarray]:
    """Summary columns of one parameter from ``(chains, draws, *shape)`` draws:
    ``point`` (the given point estimate, else the mean), ``mean``, ``sd``,
    ``lo90``, ``hi90`` and with chains ``r_hat``, ``ess_bulk``."""
    flat = values.reshape(-1, *values.shape[2:])
    with np.errstate(invalid="ignore"):
        mean = flat.mean(0)
        out = {
            "mean": mean,
            "sd": flat.std(0, ddof=1) if flat.shape[0] > 1 else np.zeros_like(mean),
            "lo90": np.quantile(flat, 0.05, axis=0),
            "hi90": np.quantile(flat, 0.95, axis=0),
        }
    out["point"] = mean if point is None else np.asarray(point, dtype=np.float64)
    if with_chains:
        out["r_hat"], out["ess_bulk"] = _rhat_ess(values)
    return out


def summarise_plates(
    result: BayesResult, eta_point: np.ndarray | None = None
) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    """One table per plate of the model's declared parameters, and the global entries.

    :param eta_point: the point summary of ``eta`` for EM and MAP (the implied
        reliability at the estimate); NUTS and SVI report the posterior mean.
    :returns: per plate (``"annotators"`` always, with ``eta``; ``"items"`` and any
        other plate a parameter is declared on) a frame with one row per plate index
        and columns ``P`` (point), ``P_mean``, ``P_sd``, ``P_lo90``, ``P_hi90`` (and
        ``P_r_hat``, ``P_ess_bulk`` for NUTS), with the unprefixed ``mean``, ``sd``,
        ... for ``eta``; and the global parameters' entries (same suffixes).
    """
    draws = result.draws
    model = result.point_model
    chains = result.method == "nuts"
    use_point = result.method in ("em", "map")
    parameters = {REPORTED: (ANNOTATORS, result.eta, eta_point if use_point else None)}
    for name, values in draws.samples.items():
        if name == REPORTED:  # declared the reliability: reported through implied_eta
            continue
        point = draws.point.get(name) if use_point else None
        parameters[name] = (model.plate_of(name), values, point)
    tables: dict[str, dict[str, np.ndarray]] = {ANNOTATORS: {}}
    population: dict[str, float] = {}
    for name, (plate, values, point) in parameters.items():
        summary = parameter_summary(values, point, chains)
        if plate is None:
            population[name] = float(summary.pop("point"))
            population.update({f"{name}_{k}": float(v) for k, v in summary.items()})
            continue
        columns = tables.setdefault(plate, {})
        columns[name] = summary.pop("point")
        for key, value in summary.items():
            columns[f"{name}_{key}"] = value
            if name == REPORTED:
                columns[key] = value
    return {plate: pd.DataFrame(columns) for plate, columns in tables.items()}, population


def summarise_draws(
    result: BayesResult, eta_point: np.ndarray | None = None
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The per-annotator table and the global entries of :func:`summarise_plates`."""
    tables, population = summarise_plates(result, eta_point)
    return tables[ANNOTATORS], population
