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

The Hessian is assembled from Hessian-vector products (double backward through
:func:`~repo.inference.enumeration.marginal_log_likelihood`). Under per-label truth
(and for the Boltzmann model) annotators do not interact, so ``I`` is
block-diagonal with one ``P x P`` block per annotator (``P`` parameters each) and
``P`` products give every block; under shared truth the full matrix takes ``K P``.
Directions with (almost) no curvature (an estimate on the boundary, an annotator
with no labels and no prior) have no proper Laplace posterior: their curvature is
floored at :data:`MIN_CURVATURE` (a wide, finite approximation) and their
annotators are listed in ``info["improper_annotators"]``.

The hierarchical model under EM is marginal empirical Bayes: ``x_k = logit eta_k``
is integrated out on a grid at the estimated ``(mu, sigma)``. Its draws come from
the grid posterior ``q(x_k)`` itself; ``(mu, sigma)`` are plug-in values (their
uncertainty is not propagated, and they get no draws).
"""

from __future__ import annotations

import time

import torch
from pyro.distributions.transforms import biject_to
from torch import Tensor

from repo.inference.draws import PosteriorDraws
from repo.inference.enumeration import enumerate_posterior, local_params, marginal_log_likelihood
from repo.noise.base import NoiseModel
from repo.noise.hierarchical import HierarchicalFlip
from repo.noise.layout import LabelData


def _hessian_vector(flat_grad: Tensor, leaves: list[Tensor], v: Tensor) -> tuple[Tensor, ...]:
    """``H v`` as the gradient of the scalar ``g . v`` (the same product; torch's
    ``grad_outputs`` path would import sympy, a noticeable start-up cost)."""
    return torch.autograd.grad((flat_grad * v).sum(), leaves, retain_graph=True)


def _unconstrained(model: NoiseModel) -> list[tuple[str, Tensor]]:
    """The model's point parameters: ``(name, unconstrained leaf tensor)``."""
    return [(name, getattr(model, name + "_unconstrained")) for name in model._pyro_params]


MAX_FULL_HESSIAN = 300
"""Largest number of parameters for which the full (coupled) Hessian is formed."""


def block_diagonal(model: NoiseModel, data: LabelData) -> bool:
    """Whether the information is taken block-diagonal per annotator: exact when
    annotators do not share latents, an approximation beyond MAX_FULL_HESSIAN."""
    exact = not data.shared_truth or not model.has_truth
    return exact or len(model._pyro_params) * data.num_annotators > MAX_FULL_HESSIAN


def observed_information(
    model: NoiseModel, logits: Tensor, data: LabelData, *, include_prior: bool = True
) -> tuple[list[str], Tensor]:
    """``-d^2 l / du du^T`` at the model's current parameters.

    :returns: the parameter names (each a ``(K,)`` block, in this order) and the
        ``(P K, P K)`` information matrix (block-diagonal per annotator under
        per-label truth, with zeros between annotators).

    Under shared truth with more than :data:`MAX_FULL_HESSIAN` parameters the
    cross-annotator terms are dropped (the per-annotator blocks are still exact).
    """
    params = _unconstrained(model)
    names = [n for n, _ in params]
    leaves = [p for _, p in params]
    sizes = [p.numel() for p in leaves]
    k = data.num_annotators
    if any(s != k for s in sizes):
        raise ValueError(f"expected per-annotator parameters of size {k}, got {sizes}")
    with local_params(), torch.enable_grad():
        value = marginal_log_likelihood(model.model, logits.detach(), data)
        if include_prior:
            value = value + model.log_prior()
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        total = flat_grad.numel()
        hessian = torch.zeros(total, total, dtype=torch.float64)
        if block_diagonal(model, data):  # one product per parameter group gives every block
            group = torch.arange(total) // k
            annotator = torch.arange(total) % k
            for g in range(len(leaves)):
                v = (group == g).to(torch.float64)
                hv = _hessian_vector(flat_grad, leaves, v)
                column = torch.cat([h.reshape(-1) for h in hv])
                rows = torch.arange(total)
                hessian[rows, g * k + annotator] = column
        else:
            for j in range(total):
                v = torch.zeros(total, dtype=torch.float64)
                v[j] = 1.0
                hv = _hessian_vector(flat_grad, leaves, v)
                hessian[:, j] = torch.cat([h.reshape(-1) for h in hv])
    hessian = 0.5 * (hessian + hessian.T)
    return names, -hessian.detach()


MIN_CURVATURE = 1e-2
"""Eigenvalues of the information below this are raised to it (an sd of 10 on the
unconstrained scale): a direction the data do not inform (an estimate on the
boundary, an annotator with no labels and no prior) gets a wide, finite Laplace
posterior instead of none."""


def _floored_inverse(block: Tensor) -> tuple[Tensor, Tensor]:
    """``block^{-1}`` (batched over leading dims) with eigenvalues floored at
    MIN_CURVATURE; whether any of each block's was."""
    block = torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
    values, vectors = torch.linalg.eigh(block)
    floored = (values < MIN_CURVATURE).any(-1)
    values = values.clamp_min(MIN_CURVATURE)
    return (vectors / values.unsqueeze(-2)) @ vectors.transpose(-1, -2), floored


def _block_index(k: int, groups: int) -> Tensor:
    """``(K, G)`` positions of annotator ``a``'s parameters (group-major layout)."""
    return torch.arange(groups).unsqueeze(0) * k + torch.arange(k).unsqueeze(-1)


def _laplace_covariance(information: Tensor, k: int, groups: int, independent: bool):
    """Covariance ``I^{-1}``, a mask of annotators with a floored curvature, and
    (block-diagonal information) the ``(K, G, G)`` per-annotator blocks, else None."""
    if not independent:
        cov, floored = _floored_inverse(information)
        return cov, torch.full((k,), bool(floored)), None
    idx = _block_index(k, groups)
    blocks, improper = _floored_inverse(information[idx.unsqueeze(-1), idx.unsqueeze(-2)])
    total = information.shape[0]
    cov = torch.zeros((total, total), dtype=torch.float64)
    cov[idx.unsqueeze(-1), idx.unsqueeze(-2)] = blocks
    return cov, improper, blocks


def laplace_variances(model: NoiseModel, logits: Tensor, data: LabelData) -> dict[str, Tensor]:
    """Marginal variances of the unconstrained parameters under the Laplace
    approximation at the model's current point (1 where it is improper); the
    hierarchical model's ``logit_eta`` takes its grid posterior's variance.

    Used to start NUTS's diagonal inverse mass matrix near the posterior's scales,
    so the values are kept in ``[1e-6, 1]``: an estimate on the boundary of the
    parameter space (``eta = 1 - EPS``) has no curvature and would otherwise give an
    unbounded scale; 1 is the scale NUTS starts from without a preconditioner.
    """
    if isinstance(model, HierarchicalFlip):
        return {"logit_eta": (model.post_scale**2).clamp(1e-6, 1.0)}
    names, information = observed_information(model, logits, data)
    k = data.num_annotators
    cov, improper, _ = _laplace_covariance(information, k, len(names), block_diagonal(model, data))
    variances = torch.diagonal(cov).reshape(len(names), k).clone()
    variances[:, improper] = 1.0
    return {name: variances[g].clamp(1e-6, 1.0) for g, name in enumerate(names)}


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
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, HierarchicalFlip):
        return _empirical_bayes_draws(model, logits, data, method, num_draws, generator, start)
    names, information = observed_information(model, logits, data, include_prior=include_prior)
    k, groups = data.num_annotators, len(names)
    independent = block_diagonal(model, data)
    cov, improper, blocks = _laplace_covariance(information, k, groups, independent)
    centre = torch.cat([getattr(model, n + "_unconstrained").detach().reshape(-1) for n in names])
    normal = torch.randn(num_draws, centre.numel(), generator=generator, dtype=torch.float64)
    if blocks is None:
        chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(cov.shape[0], dtype=torch.float64))
        u = centre + normal @ chol.T
    else:  # the Cholesky factor of a block-diagonal matrix, block by block
        chol = torch.linalg.cholesky(blocks + 1e-12 * torch.eye(groups, dtype=torch.float64))
        z = normal.reshape(num_draws, groups, k)
        u = centre + torch.einsum("agh,dha->dga", chol, z).reshape(num_draws, groups * k)
    samples, point = {}, {}
    for g, name in enumerate(names):
        constraint, _ = model._pyro_params[name]
        block = u[:, g * k : (g + 1) * k]
        samples[name] = biject_to(constraint)(block).numpy()[None]
        point[name] = getattr(model, name).detach().numpy().copy()
    sd = torch.sqrt(torch.diagonal(cov)).reshape(groups, k)
    return PosteriorDraws(
        method=method,
        samples=samples,
        point=point,
        seconds={"total": time.perf_counter() - start},
        info={
            "approximation": "laplace",
            "unconstrained_sd": {n: sd[g].numpy().tolist() for g, n in enumerate(names)},
            "improper_annotators": torch.nonzero(improper).reshape(-1).tolist(),
            "num_draws": num_draws,
            "hessian": "block-diagonal" if independent else "full",
            "cross_annotator_terms_dropped": independent and data.shared_truth and model.has_truth,
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
