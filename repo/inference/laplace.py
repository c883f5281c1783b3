"""Laplace approximation at a point estimate: EM standard errors and intervals.

At the EM estimate (the maximum of ``l(theta) = log p(o | theta) [+ log p(theta)]``,
latents summed out) the observed information is ``I = -d^2 l / du du^T`` in the
unconstrained coordinates ``u = T^{-1}(theta)`` of the parameters (logit for a
probability). The gradient vanishes at the maximum in any coordinates, so
``I`` is the Hessian of the marginal log-likelihood itself (Louis' identity
gives the same matrix from the complete-data information minus the missing
information; here it is computed directly by automatic differentiation through
the enumerated likelihood). The Laplace posterior is::

    u ~ Normal(u_hat, I^{-1}),   theta = T(u)

so intervals respect the parameter's support. Draws from it go through the same
summaries, ArviZ conversion and PSIS-LOO as NUTS draws (one "chain").

Parameters may live on any plate (their declarations,
:class:`~repo.noise.base.Parameter`): the unconstrained vector ``u`` is every
entry of every declared point parameter. The Hessian is assembled from
Hessian-vector products (double backward through
:func:`~repo.inference.enumeration.marginal_log_likelihood`). When every parameter
is per annotator and annotators do not interact (per-label truth, or the Boltzmann
model), ``I`` is block-diagonal with one ``P x P`` block per annotator (``P``
parameters each) and ``P`` products give every block; otherwise the full matrix
takes one product per entry, up to :data:`MAX_FULL_HESSIAN` entries, beyond which
the cross-index terms are dropped (one block per plate index: an approximation,
``info["cross_annotator_terms_dropped"]``). Directions with (almost) no curvature
(an estimate on the boundary, an annotator with no labels and no prior, the
unidentified scale of GLAD's maximum-likelihood estimate) have no proper Laplace
posterior: their curvature is floored at :data:`MIN_CURVATURE` (a wide, finite
approximation) and the indices that load on them are listed per plate in
``info["improper"]`` (the annotators also in ``info["improper_annotators"]``).

The hierarchical model under EM is marginal empirical Bayes: ``x_k = logit eta_k``
is integrated out on a grid at the estimated ``(mu, sigma)``. Its draws come from
the grid posterior ``q(x_k)`` itself; ``(mu, sigma)`` are plug-in values (their
uncertainty is not propagated, and they get no draws).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from pyro.distributions.transforms import biject_to
from torch import Tensor

from repo.inference.draws import PosteriorDraws
from repo.inference.enumeration import enumerate_posterior, local_params, marginal_log_likelihood
from repo.noise.base import ANNOTATORS, NoiseModel
from repo.noise.hierarchical import HierarchicalFlip
from repo.noise.layout import LabelData


def _hessian_vector(flat_grad: Tensor, leaves: list[Tensor], v: Tensor) -> tuple[Tensor, ...]:
    """``H v`` as the gradient of the scalar ``g . v`` (the same product; torch's
    ``grad_outputs`` path would import sympy, a noticeable start-up cost)."""
    return torch.autograd.grad((flat_grad * v).sum(), leaves, retain_graph=True)


MAX_FULL_HESSIAN = 300
"""Largest number of parameters for which the full (coupled) Hessian is formed."""


@dataclass(frozen=True)
class Layout:
    """Where each declared point parameter sits in the flat unconstrained vector.

    :param names: the parameters, in order.
    :param offsets: the first flat position of each.
    :param plates: each one's plate (None: global).
    :param sizes: each one's number of entries.
    """

    names: list[str]
    offsets: list[int]
    plates: list[str | None]
    sizes: list[int]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def groups(self) -> list[tuple[str | None, Tensor]]:
        """Per plate, the ``(n, m)`` flat positions of its ``m`` parameters at each of
        its ``n`` indices (global parameters: one row): the blocks of a block-diagonal
        information."""
        out = []
        for plate in dict.fromkeys(self.plates):
            members = [g for g, p in enumerate(self.plates) if p == plate]
            n = self.sizes[members[0]]
            columns = [self.offsets[g] + torch.arange(n) for g in members]
            index = torch.stack(columns, -1) if plate is not None else torch.cat(columns)[None]
            out.append((plate, index))
        return out


def parameter_layout(model: NoiseModel) -> Layout:
    """The :class:`Layout` of the model's declared point parameters."""
    names = model.point_parameters()
    sizes = [getattr(model, n + "_unconstrained").numel() for n in names]
    offsets = [sum(sizes[:g]) for g in range(len(names))]
    return Layout(names, offsets, [model.plate_of(n) for n in names], sizes)


def block_diagonal(model: NoiseModel, data: LabelData) -> bool:
    """Whether the information is taken block-diagonal per plate index (each
    annotator's parameters one block, each item's one block, the global ones one):
    exact when every parameter is per annotator and annotators do not share latents;
    an approximation (cross-index terms dropped) beyond MAX_FULL_HESSIAN."""
    layout = parameter_layout(model)
    per_annotator = all(p == ANNOTATORS for p in layout.plates)
    exact = per_annotator and (not data.shared_truth or not model.has_truth)
    return exact or layout.total > MAX_FULL_HESSIAN


def observed_information(
    model: NoiseModel, logits: Tensor, data: LabelData, *, include_prior: bool = True
) -> tuple[list[str], Tensor]:
    """``-d^2 l / du du^T`` at the model's current parameters.

    :returns: the parameter names (in this order, each a flat block of its
        entries) and the ``(P, P)`` information matrix over all ``P`` entries; under
        :func:`block_diagonal`, zero between different plate indices.

    Block-diagonal information takes one Hessian-vector product per parameter (the
    product with the parameter's indicator gives, at each index, the column of that
    index: exact when indices do not interact); the full one takes ``P``.
    """
    layout = parameter_layout(model)
    leaves = [getattr(model, n + "_unconstrained") for n in layout.names]
    total = layout.total
    with local_params(), torch.enable_grad():
        value = marginal_log_likelihood(model.model, logits.detach(), data)
        if include_prior:
            value = value + model.log_prior()
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        hessian = torch.zeros(total, total, dtype=torch.float64)
        if block_diagonal(model, data):
            for _, index in layout.groups():
                for column in range(index.shape[1]):
                    v = torch.zeros(total, dtype=torch.float64)
                    v[index[:, column]] = 1.0
                    hv = torch.cat([h.reshape(-1) for h in _hessian_vector(flat_grad, leaves, v)])
                    rows = index  # the same index's entries of every parameter of the plate
                    hessian[rows, index[:, column : column + 1]] = hv[rows]
        else:
            for j in range(total):
                v = torch.zeros(total, dtype=torch.float64)
                v[j] = 1.0
                hv = _hessian_vector(flat_grad, leaves, v)
                hessian[:, j] = torch.cat([h.reshape(-1) for h in hv])
    hessian = 0.5 * (hessian + hessian.T)
    return layout.names, -hessian.detach()


MIN_CURVATURE = 1e-2
"""Eigenvalues of the information below this are raised to it (an sd of 10 on the
unconstrained scale): a direction the data do not inform (an estimate on the
boundary, an annotator with no labels and no prior) gets a wide, finite Laplace
posterior instead of none."""

IMPROPER_LOADING = 0.1
"""An entry whose weight in a floored eigenvector exceeds this is listed as improper."""


def _floored_inverse(block: Tensor) -> tuple[Tensor, Tensor]:
    """``block^{-1}`` (batched over leading dims) with eigenvalues floored at
    MIN_CURVATURE; per entry (last dim), whether it loads on a floored direction."""
    block = torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
    values, vectors = torch.linalg.eigh(block)
    floored = values < MIN_CURVATURE
    loading = (vectors.abs() * floored.unsqueeze(-2).to(vectors.dtype)).amax(-1)
    values = values.clamp_min(MIN_CURVATURE)
    inverse = (vectors / values.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return inverse, loading > IMPROPER_LOADING


@dataclass
class LaplaceCovariance:
    """``I^{-1}`` of the Laplace posterior: dense, or per plate-index blocks.

    :param blocks: ``(positions (n, m), covariance (n, m, m))`` per plate, or None.
    :param dense: the full covariance, or None.
    :param improper: per flat entry, whether its curvature was floored.
    """

    blocks: list[tuple[Tensor, Tensor]] | None
    dense: Tensor | None
    improper: Tensor

    def variances(self, total: int) -> Tensor:
        """The marginal variance of every flat entry."""
        if self.dense is not None:
            return torch.diagonal(self.dense).clone()
        out = torch.empty(total, dtype=torch.float64)
        for index, cov in self.blocks:
            out[index] = torch.diagonal(cov, dim1=-2, dim2=-1)
        return out

    def sample(self, centre: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
        """``num_draws`` draws of ``Normal(centre, I^{-1})``, ``(draws, P)``."""
        total = centre.numel()
        normal = torch.randn(num_draws, total, generator=generator, dtype=torch.float64)
        if self.dense is not None:
            eye = torch.eye(total, dtype=torch.float64)
            return centre + normal @ torch.linalg.cholesky(self.dense + 1e-12 * eye).T
        u = centre.expand(num_draws, total).clone()
        for index, cov in self.blocks:  # the Cholesky factor block by block
            eye = torch.eye(cov.shape[-1], dtype=torch.float64)
            chol = torch.linalg.cholesky(cov + 1e-12 * eye)  # (n, m, m)
            z = normal[:, index]  # (draws, n, m)
            u[:, index] = centre[index] + torch.einsum("nab,dnb->dna", chol, z)
        return u


def laplace_covariance(information: Tensor, layout: Layout, blocked: bool) -> LaplaceCovariance:
    """The floored inverse of ``information``: dense, or per plate-index block."""
    if not blocked:
        cov, improper = _floored_inverse(information)
        return LaplaceCovariance(None, cov, improper)
    improper = torch.zeros(layout.total, dtype=torch.bool)
    blocks = []
    for _, index in layout.groups():
        cov, flags = _floored_inverse(information[index.unsqueeze(-1), index.unsqueeze(-2)])
        improper[index] = flags
        blocks.append((index, cov))
    return LaplaceCovariance(blocks, None, improper)


def improper_indices(layout: Layout, improper: Tensor) -> dict[str, list[int]]:
    """Per plate (``"global"`` for global parameters), the indices whose Laplace
    posterior is improper (a floored curvature in any of their parameters)."""
    out: dict[str, set[int]] = {}
    for offset, plate, size in zip(layout.offsets, layout.plates, layout.sizes, strict=True):
        flags = improper[offset : offset + size]
        key = "global" if plate is None else plate
        out.setdefault(key, set()).update(torch.nonzero(flags).reshape(-1).tolist())
    return {plate: sorted(indices) for plate, indices in out.items()}


def laplace_variances(model: NoiseModel, logits: Tensor, data: LabelData) -> dict[str, Tensor]:
    """Marginal variances of the unconstrained parameters under the Laplace
    approximation at the model's current point (1 where it is improper), each of
    its parameter's shape; the hierarchical model's ``logit_eta`` takes its grid
    posterior's variance.

    Used to start NUTS's diagonal inverse mass matrix near the posterior's scales,
    so the values are kept in ``[1e-6, 1]``: an estimate on the boundary of the
    parameter space (``eta = 1 - EPS``) has no curvature and would otherwise give an
    unbounded scale; 1 is the scale NUTS starts from without a preconditioner.
    """
    if isinstance(model, HierarchicalFlip):
        return {"logit_eta": (model.post_scale**2).clamp(1e-6, 1.0)}
    layout = parameter_layout(model)
    _, information = observed_information(model, logits, data)
    cov = laplace_covariance(information, layout, block_diagonal(model, data))
    variances = cov.variances(layout.total)
    variances[cov.improper] = 1.0
    return {
        name: variances[offset : offset + size].reshape(getattr(model, name).shape).clamp(1e-6, 1.0)
        for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True)
    }


def laplace_draws(
    model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    *,
    method: str = "em",
    num_draws: int = 2000,
    seed: int = 0,
    include_prior: bool = True,
) -> PosteriorDraws:
    """Draws from the Laplace posterior at the model's current (fitted) parameters.

    :param method: the label of the point estimate (``"em"`` or ``"map"``).
    :param include_prior: the information of the log posterior (MAP) rather than of
        the log-likelihood (maximum likelihood).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, HierarchicalFlip):
        return _empirical_bayes_draws(model, logits, data, method, num_draws, generator, start)
    layout = parameter_layout(model)
    _, information = observed_information(model, logits, data, include_prior=include_prior)
    blocked = block_diagonal(model, data)
    cov = laplace_covariance(information, layout, blocked)
    names = layout.names
    centre = torch.cat([getattr(model, n + "_unconstrained").detach().reshape(-1) for n in names])
    u = cov.sample(centre, num_draws, generator)
    sd = cov.variances(layout.total).sqrt()
    samples, point, unconstrained_sd = {}, {}, {}
    for name, offset, size in zip(names, layout.offsets, layout.sizes, strict=True):
        constraint, _ = model._pyro_params[name]
        shape = tuple(getattr(model, name).shape)
        block = u[:, offset : offset + size].reshape(num_draws, *shape)
        samples[name] = biject_to(constraint)(block).numpy()[None]
        point[name] = getattr(model, name).detach().numpy().copy()
        unconstrained_sd[name] = sd[offset : offset + size].reshape(shape).numpy().tolist()
    improper = improper_indices(layout, cov.improper)
    exact = (
        not blocked
        or all(p == ANNOTATORS for p in layout.plates)
        and (not data.shared_truth or not model.has_truth)
    )
    return PosteriorDraws(
        method=method,
        samples=samples,
        point=point,
        seconds={"total": time.perf_counter() - start},
        info={
            "approximation": "laplace",
            "unconstrained_sd": unconstrained_sd,
            "improper_annotators": improper.get(ANNOTATORS, []),
            "improper": improper,
            "num_draws": num_draws,
            "hessian": "block-diagonal" if blocked else "full",
            "cross_annotator_terms_dropped": not exact,
        },
    )


def _empirical_bayes_draws(
    model: HierarchicalFlip,
    logits: Tensor,
    data: LabelData,
    method: str,
    num_draws: int,
    generator: torch.Generator,
    start: float,
) -> PosteriorDraws:
    """Hierarchical model: ``x_k`` drawn from its grid posterior ``q(x_k)``
    (a grid point by its weight, then uniform within the grid cell)."""
    with torch.no_grad():
        posterior = enumerate_posterior(model.e_step_model(), logits, data)
        log_lik = model.grid_log_likelihood(logits, data, posterior.marginals)
        mu, sigma = model.mu.detach(), model.sigma.detach()
        weights = torch.softmax(log_lik + model.log_population(mu, sigma), -1)  # (K, G)
        index = torch.multinomial(weights, num_draws, replacement=True, generator=generator)
        spacing = float(model.grid[1] - model.grid[0])
        jitter = torch.rand(index.shape, generator=generator, dtype=torch.float64) - 0.5
        x = (model.grid[index] + spacing * jitter).T  # (draws, K)
    return PosteriorDraws(
        method=method,
        samples={"logit_eta": x.numpy()[None]},
        point={"logit_eta": model.post_loc.numpy().copy()},
        seconds={"total": time.perf_counter() - start},
        info={
            "approximation": "empirical Bayes (grid posterior of logit eta_k at the "
            "estimated mu and sigma, which are plug-in values)",
            "num_draws": num_draws,
            "improper_annotators": [],
        },
    )
