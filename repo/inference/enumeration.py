"""Exact posterior of the enumerated latents, and the marginal likelihood.

For a noise model with discrete latents ``z`` (and any others, such as a spam
indicator) marked ``infer={"enumerate": "parallel"}``, Pyro's
:class:`~pyro.infer.TraceEnum_ELBO` sums them out exactly by variable
elimination. One trace of the model gives both

* the posterior marginals ``p(z_i | o)`` of every enumerated site
  (:meth:`TraceEnum_ELBO.compute_marginals`' computation), and
* the pointwise marginal log-likelihood ``log p(o_i) = log sum_z p(z) p(o_i | z)``
  of every truth unit ``i`` (all other plates and enumerated sites contracted),
  which model comparison (PSIS-LOO) needs and the EM convergence test sums.

The pointwise contraction mirrors Pyro's own ``_compute_marginals`` with the
target ordinal set to the ``items`` plate rather than a site's ordinal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_model_factors, _find_ordinal, _make_dist
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from torch import Tensor

ITEMS = "items"
"""Name of the plate over truth units that every noise model declares."""

MAX_PLATE_NESTING = 2


@contextmanager
def local_params(validate: bool = False) -> Iterator[None]:
    """Run Pyro with module-local parameters (no global param store).

    Two noise models of one class would otherwise share their parameters through
    Pyro's global param store under the same name. Validation of distribution
    arguments is off by default: inputs are validated once, on the way in.
    """
    with pyro.settings.context(
        module_local_params=True,
        validate_distributions_pyro=validate,
        validate_distributions_torch=validate,
    ):
        yield


def _empty_guide(*args, **kwargs) -> None:
    return None


@dataclass(frozen=True)
class EnumPosterior:
    """Posterior marginals and the pointwise marginal log-likelihood.

    :param marginals: site name -> probabilities over the site's values, the value
        axis last (a Bernoulli site gives ``(..., 2)``: ``[p(0), p(1)]``).
    :param log_likelihood: ``(I,)`` log-likelihood of each truth unit's labels with
        every latent summed out.
    """

    marginals: dict[str, Tensor]
    log_likelihood: Tensor


def _trace(model: Callable, args: tuple, kwargs: dict):
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    return next(elbo._get_traces(model, _empty_guide, args, kwargs))


def _plate_sizes(model_trace) -> dict[str, int]:
    """Plate symbol -> plate size, for every plate of the trace."""
    sizes = {}
    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized:
                sizes[model_trace.plate_to_symbol[frame.name]] = frame.size
    return sizes


def _compute_marginals(model_trace, guide_trace) -> dict[str, pyro.distributions.Distribution]:
    """Posterior marginals of every enumerated site.

    Pyro's own ``_compute_marginals`` with one change: the contraction ring is told
    every plate's size. Packed tensors drop plate dims of size 1, so without the
    sizes a site inside a plate of size 1 (per-label truth has one label slot per
    unit) cannot be broadcast back to its plates (``KeyError`` in ``LogRing``).
    """
    marginal_costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(
        model_trace, guide_trace
    )
    sizes = _plate_sizes(model_trace)
    marginal_dists = {}
    for name, site in model_trace.nodes.items():
        if (
            site["type"] != "sample"
            or name in guide_trace.nodes
            or site["infer"].get("_enumerate_dim") is None
        ):
            continue
        enum_dim = site["infer"]["_enumerate_dim"]
        enum_symbol = site["infer"]["_enumerate_symbol"]
        logits = contract_to_tensor(
            log_factors,
            sum_dims,
            target_ordinal=_find_ordinal(model_trace, site),
            target_dims={enum_symbol},
            ring=LogRing(dim_to_size=dict(sizes)),
        )
        logits = packed.unpack(logits, model_trace.symbol_to_dim)
        logits = logits.unsqueeze(-1).transpose(-1, enum_dim - 1)
        while logits.shape[0] == 1:
            logits = logits.squeeze(0)
        marginal_dists[name] = _make_dist(site["fn"], logits)
    return marginal_dists


def _pointwise(model_trace, guide_trace, num_items: int) -> Tensor:
    marginal_costs, log_factors, ordering, sum_dims, _ = _compute_model_factors(
        model_trace, guide_trace
    )
    items_symbol = model_trace.plate_to_symbol[ITEMS]
    ring = LogRing(dim_to_size=_plate_sizes(model_trace))  # sizes: see _compute_marginals
    total = torch.zeros(num_items)
    terms = []
    if log_factors:
        target = frozenset({items_symbol})
        terms.append(contract_to_tensor(log_factors, sum_dims, target_ordinal=target, ring=ring))
    for ordinal, costs in marginal_costs.items():
        if items_symbol in ordinal:  # a site outside the items plate is not pointwise
            terms.extend(costs)
    for term in terms:
        # Product-contract (add the logs over) every plate but ``items``, which becomes
        # the last dim (packed tensors drop it when it has size 1: the value is then a
        # scalar, broadcast below). Enumerated dims are already summed out.
        plates = frozenset(d for d in term._pyro_dims if d != items_symbol)
        term = ring.product(term, plates) if plates else term
        value = packed.unpack(term, model_trace.symbol_to_dim).reshape(-1)
        total = total.to(value.dtype) + value
    return total


def enumerate_posterior(model: Callable, *args, **kwargs) -> EnumPosterior:
    """Posterior marginals and pointwise log-likelihood from one trace of ``model``.

    ``model`` must declare its truth units in a plate named ``"items"`` (dim -2)
    and mark its discrete latents for parallel enumeration.
    """
    with local_params():
        model_trace, guide_trace = _trace(model, args, kwargs)
        dists = _compute_marginals(model_trace, guide_trace)
        marginals = {}
        for name, d in dists.items():
            if isinstance(d, pyro.distributions.Bernoulli):
                p1 = d.probs
                marginals[name] = torch.stack([1 - p1, p1], dim=-1)
            else:
                marginals[name] = d.probs
        log_likelihood = _pointwise(model_trace, guide_trace, _items_size(model_trace))
    return EnumPosterior(marginals=marginals, log_likelihood=log_likelihood)


def _items_size(model_trace) -> int:
    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name == ITEMS:
                return frame.size
    raise ValueError(f"the noise model declares no plate named {ITEMS!r}")


def marginal_log_likelihood(model: Callable, *args, **kwargs) -> Tensor:
    """``log p(o)`` with every enumerated latent summed out, differentiable.

    The negative of :meth:`TraceEnum_ELBO.differentiable_loss` with an empty guide:
    its gradient in any parameter equals the gradient of EM's expected
    complete-data log-likelihood at the current posterior (Fisher's identity).
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    with local_params():
        return -elbo.differentiable_loss(model, _empty_guide, *args, **kwargs)
