"""Posterior draws of annotator parameters, the currency of every inference method.

EM (through its Laplace approximation), MAP (Laplace at the mode), NUTS and SVI all
end in a :class:`PosteriorDraws`: draws ``theta^(c, d)`` of the continuous
parameters, indexed by chain ``c`` and draw ``d`` (one chain for the
approximations). Everything downstream (RESULT.json summaries, ArviZ data,
PSIS-LOO, plots) reads draws and so treats the four methods alike.

Discrete latents are never sampled. Given a draw, the exact posterior marginals of
the enumerated latents ``p(z_i | o, theta^(c, d))`` and the pointwise marginal
log-likelihood ``log p(o_i | theta^(c, d))`` (latents summed out) come from one
enumeration trace (:func:`~repo.inference.enumeration.enumerate_posterior`). The
Rao-Blackwellised posterior of a latent is the average over draws of those exact
marginals::

    p(z_i | o) ~= (1 / CD) sum_{c, d} p(z_i | o, theta^(c, d))

which has lower variance than the frequency of sampled ``z`` (Rao-Blackwell).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pyro import poutine
from torch import Tensor

from repo.inference.em import set_value
from repo.inference.enumeration import enumerate_posterior
from repo.noise.base import NoiseModel
from repo.noise.layout import LabelData


@dataclass
class PosteriorDraws:
    """Draws of the continuous parameters of a noise model.

    :param method: ``"em"``, ``"map"``, ``"nuts"`` or ``"svi"``.
    :param samples: site name -> ``(chains, draws, *shape)`` array, constrained space.
    :param sample_stats: per-draw sampler statistics, ``(chains, draws)`` each
        (NUTS: ``diverging``, ``lp``, ``step_size``).
    :param point: the method's point estimate by site name (EM estimate, MAP mode);
        empty for NUTS and SVI, whose point summary is the posterior mean.
    :param seconds: timings by phase. ``total`` is wall-clock; for NUTS, ``warmup`` and
        ``sampling`` are summed over chains (chain-seconds), so with chains in parallel
        processes they can exceed ``total``.
    :param info: settings and facts of the run (chains, warm-up, jit, ELBO trace...).
    """

    method: str
    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray] = field(default_factory=dict)
    point: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    @property
    def num_divergences(self) -> int:
        """Divergent transitions after warm-up (0 for methods that cannot diverge)."""
        diverging = self.sample_stats.get("diverging")
        return 0 if diverging is None else int(np.asarray(diverging).sum())

    def draw(self, chain: int, index: int) -> dict[str, Tensor]:
        """One draw as float64 tensors, ready for :func:`pyro.poutine.condition`."""
        return {
            name: torch.as_tensor(value[chain, index], dtype=torch.float64)
            for name, value in self.samples.items()
        }

    def thinned(self, max_draws: int | None) -> list[tuple[int, int]]:
        """``(chain, draw)`` indices, at most ``max_draws`` in all, evenly spaced
        within each chain (every chain keeps the same number)."""
        c, d = self.num_chains, self.num_draws
        per_chain = d if max_draws is None else max(1, min(d, max_draws // c))
        keep = np.unique(np.linspace(0, d - 1, per_chain).round().astype(int))
        return [(i, j) for i in range(c) for j in keep]


@dataclass
class DrawEnumeration:
    """Per-draw enumeration of the latents.

    :param marginals: site name -> Rao-Blackwellised marginals (average over draws
        of each draw's exact posterior marginals), value axis last.
    :param log_likelihood: ``(chains, draws', I)`` pointwise marginal
        log-likelihood of each truth unit at each (thinned) draw.
    :param index: the ``(chain, draw)`` pairs used, in order.
    """

    marginals: dict[str, Tensor]
    log_likelihood: np.ndarray
    index: list[tuple[int, int]]


def enumerate_draws(
    bayes_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    draws: PosteriorDraws,
    max_draws: int | None = None,
) -> DrawEnumeration:
    """Exact enumeration of the latents at each draw; see the module docstring.

    :param bayes_model: the model with its parameters as random variables
        (:meth:`NoiseModel.bayesian`); each draw conditions its sample sites.
    :param max_draws: thin to at most this many draws (evenly within each chain).
    """
    index = draws.thinned(max_draws)
    totals: dict[str, Tensor] = {}
    log_lik = np.empty((len(index), data.num_units), dtype=np.float64)  # filled in place
    with torch.no_grad():
        for j, (chain, d) in enumerate(index):
            conditioned = poutine.condition(bayes_model, data=draws.draw(chain, d))
            posterior = enumerate_posterior(conditioned, logits, data)
            for name, value in posterior.marginals.items():
                totals[name] = totals.get(name, 0) + value
            log_lik[j] = posterior.log_likelihood.numpy()
    marginals = {name: value / len(index) for name, value in totals.items()}
    per_chain = len(index) // draws.num_chains
    shape = (draws.num_chains, per_chain, -1)
    return DrawEnumeration(marginals, log_lik.reshape(shape), index)


def load_draw(point_model: NoiseModel, draw: dict[str, Tensor]) -> None:
    """Set a point model's parameters (and the hierarchical model's posterior
    buffers, from ``logit_eta``) to one draw."""
    for name, value in draw.items():
        if name == "logit_eta":
            set_value(point_model, "post_loc", value)
            set_value(point_model, "post_eta", torch.sigmoid(value))
        else:
            set_value(point_model, name, value)


def implied_eta_draws(
    point_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    draws: PosteriorDraws,
) -> np.ndarray:
    """``(chains, draws, K)`` draws of each annotator's reliability ``eta_k``.

    ``eta_k`` is the probability that a label of annotator ``k`` is correct, averaged
    over their labels (:meth:`NoiseModel.implied_eta`) at each draw: always the
    model's own statement of its reliability, never a parameter looked up by name
    (a model's parameter called ``eta`` is reported as ``eta`` only because it is
    declared the reliability and ``implied_eta`` returns it).
    """
    model = copy.deepcopy(point_model)
    counts = data.label_counts().clamp_min(1)
    out = np.empty((draws.num_chains, draws.num_draws, data.num_annotators))
    with torch.no_grad():
        for chain in range(draws.num_chains):
            for d in range(draws.num_draws):
                load_draw(model, draws.draw(chain, d))
                implied = model.implied_eta(logits, data).expand_as(data.label)
                out[chain, d] = (data.per_annotator_sum(implied) / counts).numpy()
    return out
