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

:func:`enumerate_draws` computes all draws at once: the enumeration of one draw,
a Pyro program, is traced once by the PyTorch JIT into a graph of tensor
operations, which :func:`torch.func.vmap` evaluates over a chunk of draws (one
``draws x units`` operation per step of the graph). The trace is of one draw's
program, so the vectorised values are checked against Pyro's own enumeration at
the first and the last draw; where they differ (a model whose program branches
on its parameters' values) or the trace fails, every draw is enumerated by Pyro
one after another.
"""

from __future__ import annotations

import copy
import warnings
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
    :param vectorised: whether the draws were enumerated at once (the traced,
        vmapped program) rather than one after another.
    """

    marginals: dict[str, Tensor]
    log_likelihood: np.ndarray
    index: list[tuple[int, int]]
    vectorised: bool = False


CHUNK_ELEMENTS = 2**21
"""Draws enumerated at once: as many as keep ``draws x units x slots`` under this."""


def _enumeration_program(bayes_model: NoiseModel, logits: Tensor, data: LabelData, names):
    """One draw's enumeration as a function of the draw's values (in ``names``
    order) returning the marginals' probabilities and the pointwise log-likelihood."""

    def program(*values: Tensor) -> tuple[Tensor, ...]:
        conditioned = poutine.condition(bayes_model, data=dict(zip(names, values, strict=True)))
        posterior = enumerate_posterior(conditioned, logits, data)
        return (*posterior.marginals.values(), posterior.log_likelihood)

    return program


def _close(computed: tuple[Tensor, ...], expected: tuple[Tensor, ...]) -> bool:
    return len(computed) == len(expected) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-9)
        for a, b in zip(computed, expected, strict=True)
    )


def _vectorised(program, values: list[Tensor], chunk: int) -> list[tuple[Tensor, ...]] | None:
    """``program`` at every draw (``values``: one ``(draws, ...)`` tensor per site)
    by the traced program under ``vmap``, ``chunk`` draws at a time; None when it
    cannot be traced or vectorised, or disagrees with ``program`` at the ends."""
    ends = [0, values[0].shape[0] - 1]
    expected = [program(*(v[i] for v in values)) for i in ends]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(program, tuple(v[0] for v in values), check_trace=False)
            batched = torch.func.vmap(traced)
            chunks = [
                batched(*(v[start : start + chunk] for v in values))
                for start in range(0, values[0].shape[0], chunk)
            ]
    except Exception:  # a program the JIT or vmap cannot take: Pyro draw by draw
        return None
    for i, want in zip(ends, expected, strict=True):
        start = i - i % chunk
        if not _close(tuple(part[i - start] for part in chunks[i // chunk]), want):
            return None
    return chunks


def enumerate_draws(
    bayes_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    draws: PosteriorDraws,
    max_draws: int | None = None,
    vectorise: bool = True,
) -> DrawEnumeration:
    """Exact enumeration of the latents at each draw; see the module docstring.

    :param bayes_model: the model with its parameters as random variables
        (:meth:`NoiseModel.bayesian`); each draw conditions its sample sites.
    :param max_draws: thin to at most this many draws (evenly within each chain).
    :param vectorise: enumerate the draws at once (checked, else one by one).
    """
    index = draws.thinned(max_draws)
    names = sorted(draws.samples)
    chains, steps = np.array(index).T
    values = [
        torch.as_tensor(draws.samples[name][chains, steps], dtype=torch.float64) for name in names
    ]
    program = _enumeration_program(bayes_model, logits, data, names)
    with torch.no_grad():
        sites = list(
            enumerate_posterior(
                poutine.condition(bayes_model, data=draws.draw(*index[0])), logits, data
            ).marginals
        )
        chunk = max(1, CHUNK_ELEMENTS // (data.num_units * data.num_slots))
        chunks = _vectorised(program, values, chunk) if vectorise else None
        vectorised = chunks is not None
        if chunks is None:
            chunks = [
                tuple(value.unsqueeze(0) for value in program(*(v[j] for v in values)))
                for j in range(len(index))
            ]
    totals = {
        name: sum(part[i].sum(0) for part in chunks) / len(index) for i, name in enumerate(sites)
    }
    log_lik = torch.cat([part[-1] for part in chunks]).numpy().astype(np.float64)
    per_chain = len(index) // draws.num_chains
    shape = (draws.num_chains, per_chain, -1)
    return DrawEnumeration(totals, log_lik.reshape(shape), index, vectorised)


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
