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

The pointwise log-likelihood reuses the joint ``log p(z_i, o_i)`` that the
marginal of ``z`` needs (``logsumexp`` over ``z``), or, for models without one
root latent per unit, contracts the factors to the ``items`` plate.
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
from pyro.ops.contract import _partition_terms, contract_to_tensor
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


def _enumerated_sites(model_trace, guide_trace) -> list[tuple[str, dict]]:
    return [
        (name, site)
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and name not in guide_trace.nodes
        and site["infer"].get("_enumerate_dim") is not None
    ]


class BroadcastLogRing(LogRing):
    """Pyro's :class:`~pyro.ops.rings.LogRing` with a direct ``sumproduct``.

    ``log sum_dims prod_t exp(term_t)`` is the broadcast sum of the log-terms,
    reduced by ``logsumexp`` over ``dims`` (``logaddexp`` of the two halves for one
    dim of size two, a binary latent): the same value as the ring's log-space
    einsum, which exponentiates every operand against a max-shift, multiplies and
    takes the log. Used when one term already spans every dim (the noise models'
    label factor spans the enumerated truth and the plates), so that the sum is no
    larger than that term; otherwise the einsum contracts as before.
    """

    def sumproduct(self, terms, dims):
        all_dims = "".join(sorted(set("".join(term._pyro_dims for term in terms))))
        if not any(len(term._pyro_dims) == len(all_dims) for term in terms):
            return super().sumproduct(terms, dims)
        if len(terms) > 1:  # aligned on the sorted dims and expanded
            terms = packed.broadcast_all(*terms, dims=all_dims)
        order = terms[0]._pyro_dims  # the sorted dims, or the one term's own order
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        positions = [order.index(d) for d in dims if d in order]
        if len(positions) == 1 and total.shape[positions[0]] == 2:  # a binary latent
            result = torch.logaddexp(*total.unbind(positions[0]))  # one exp, not two
        else:
            result = torch.logsumexp(total, dim=positions) if positions else total.clone()
        result._pyro_dims = "".join(d for d in order if d not in dims)
        return result


def _joint_logits(factors, sizes: dict[str, int], site: dict, ordinal: frozenset) -> Tensor:
    """``log p(site = v, o)`` per plate index and value ``v``: every other
    enumerated dim summed out. The ring is told every plate's size: packed tensors
    drop plate dims of size 1 (per-label truth has one label slot per unit), and
    without the sizes such a site could not be broadcast back to its plates."""
    _, log_factors, _, sum_dims, _ = factors
    return contract_to_tensor(
        log_factors,
        sum_dims,
        target_ordinal=ordinal,
        target_dims={site["infer"]["_enumerate_symbol"]},
        ring=BroadcastLogRing(dim_to_size=dict(sizes)),
    )


def _to_distribution(model_trace, site: dict, logits: Tensor):
    """Pyro's ``_compute_marginals`` final step: unpack and normalise."""
    enum_dim = site["infer"]["_enumerate_dim"]
    logits = packed.unpack(logits, model_trace.symbol_to_dim)
    logits = logits.unsqueeze(-1).transpose(-1, enum_dim - 1)
    while logits.shape[0] == 1:
        logits = logits.squeeze(0)
    return _make_dist(site["fn"], logits)


def _connected(factors) -> bool:
    """Whether the enumerated factors form one connected component."""
    _, log_factors, _, sum_dims, _ = factors
    terms = [term for terms in log_factors.values() for term in terms]
    return len(_partition_terms(LogRing(), terms, sum_dims)) <= 1


def _pointwise(model_trace, factors, sizes, root_logits: Tensor | None, num_items: int) -> Tensor:
    """``log p(o_i)`` per truth unit ``i``.

    The enumerated factors contribute ``logsumexp_v log p(root = v, o)`` when a
    root latent in the ``items`` plate connects them all (the joint logits of the
    E-step, reused), else their contraction to the ``items`` plate; observed sites
    outside every enumeration add their log-probabilities. Sites outside the
    ``items`` plate are not pointwise and are left out.
    """
    marginal_costs, log_factors, _, sum_dims, _ = factors
    items_symbol = model_trace.plate_to_symbol[ITEMS]
    items = frozenset({items_symbol})
    ring = BroadcastLogRing(dim_to_size=dict(sizes))
    terms = []  # (term, the plates it lives in)
    if root_logits is not None:
        enum_dims = [d for d in root_logits._pyro_dims if d in sum_dims]
        terms.append((ring.sumproduct([root_logits], set(enum_dims)), items))
    elif log_factors:
        joint = contract_to_tensor(log_factors, sum_dims, target_ordinal=items, ring=ring)
        terms.append((joint, items))
    for ordinal, costs in marginal_costs.items():
        terms.extend((cost, ordinal) for cost in costs)
    total = torch.zeros(num_items, dtype=torch.float64)
    for term, ordinal in terms:
        if items_symbol not in ordinal:
            continue  # a site outside the items plate is not pointwise
        plates = frozenset(d for d in term._pyro_dims if d != items_symbol)
        term = ring.product(term, plates) if plates else term  # product over slots
        # (a plate of size 1 is not among a packed tensor's dims: broadcast)
        value = packed.unpack(term, model_trace.symbol_to_dim).reshape(-1)
        total = total.to(value.dtype) + value
    return total


def enumerate_posterior(model: Callable, *args, **kwargs) -> EnumPosterior:
    """Posterior marginals and pointwise log-likelihood from one trace of ``model``.

    ``model`` must declare its truth units in a plate named ``"items"`` (dim -2)
    and mark its discrete latents for parallel enumeration. The marginals are
    Pyro's ``TraceEnum_ELBO.compute_marginals`` (one contraction per enumerated
    site); the model's factors are computed once and shared by both results.
    """
    with local_params():
        model_trace, guide_trace = _trace(model, args, kwargs)
        factors = _compute_model_factors(model_trace, guide_trace)
        sizes = _plate_sizes(model_trace)
        items = frozenset({model_trace.plate_to_symbol[ITEMS]})
        marginals, root_logits = {}, None
        for name, site in _enumerated_sites(model_trace, guide_trace):
            ordinal = _find_ordinal(model_trace, site)
            logits = _joint_logits(factors, sizes, site, ordinal)
            if ordinal == items and root_logits is None:
                root_logits = logits
            d = _to_distribution(model_trace, site, logits)
            if isinstance(d, pyro.distributions.Bernoulli):
                marginals[name] = torch.stack([1 - d.probs, d.probs], dim=-1)
            else:
                marginals[name] = d.probs
        if root_logits is not None and not _connected(factors):
            root_logits = None
        num_items = _items_size(model_trace)
        log_likelihood = _pointwise(model_trace, factors, sizes, root_logits, num_items)
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
