"""Hierarchical flip: reliabilities partially pooled around a population.

The symmetric flip with each annotator's reliability drawn from a population::

    x_k  ~ Normal(mu, sigma),   eta_k = sigmoid(x_k)
    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij ~ Bernoulli(z_i eta_k + (1 - z_i)(1 - eta_k))

Annotators with few labels borrow strength from the others. Maximising jointly over
``(x_k, mu, sigma)`` is degenerate (the likelihood grows without bound as
``sigma -> 0`` with every ``x_k = mu``), so EM here is *marginal* empirical Bayes:
``x_k`` is integrated out and only ``(mu, sigma)`` are point estimates.

The integral over ``x_k`` is a quadrature on a fixed grid ``x_1 < ... < x_G``
with the population discretised on it, ``pi_g ∝ Normal(x_g; mu, sigma)``
normalised over the grid (for ``sigma`` well above the spacing this is the
trapezoid rule, accurate far beyond its textbook order for smooth integrands
that vanish at the ends; for small ``sigma`` it stays a proper distribution, so
the evidence cannot be inflated by a population narrower than the grid)::

    Z_k(mu, sigma) = int prod_j l_j(x) Normal(x; mu, sigma) dx
                  ~= sum_g pi_g exp(ll_k(x_g)),

with ``ll_k(x_g) = sum_j log l_j(x_g)`` over annotator ``k``'s labels:

* per-label truth: ``l_j(x) = p_j sigmoid(x) + (1 - p_j) sigmoid(-x)`` with
  ``p_j = p(z_j = o_j | s_j)``, ``z`` summed out exactly, so EM climbs the exact
  marginal log-likelihood ``sum_k log Z_k``;
* shared truth (annotators coupled through ``z_i``): mean field ``q(z) q(x)``,
  ``l_j(x) = sigmoid(x)^w_j sigmoid(-x)^(1 - w_j)`` with ``w_j = p(z_i = o_j)``
  under ``q(z)``, and ``q(z)`` from enumeration at ``x_k = E_q[x_k]`` (for a flip
  channel ``E[log sigmoid(x)] - E[log sigmoid(-x)] = E[x]``, so that update is
  exact); the objective is the evidence bound
  ``sum_i (E_q log p(z_i | s_i) + H(q(z_i))) + sum_k log Z_k``.

The grid values ``ll_k(x_g)`` are sums over labels, so mini-batches and ranks can
add them up, and they do not depend on ``(mu, sigma)``: the M-step maximises
``sum_k log Z_k(mu, sigma)`` itself (Newton on ``(mu, log sigma)``), so with fixed
scores one M-step reaches the marginal maximum-likelihood estimate. The posterior
``q(x_k)`` is read off the grid; the reported ``eta_k`` is ``E_q[sigmoid(x_k)]``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor
from torch.nn.functional import logsigmoid

from repo.noise.base import ANNOTATORS, NoiseModel, Sizes, logit
from repo.noise.channel import AnnotatorLabels
from repo.noise.layout import LabelData

MIN_SIGMA = 0.05
"""The population sd is kept above this, about the grid spacing (the EB estimate
can be 0: annotators that do not differ)."""

LABEL_CHUNK = 1 << 14
"""Labels evaluated at once on the grid (memory ``LABEL_CHUNK x G``)."""


def normal_log_density(x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """``log Normal(x; mu, sigma)``."""
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)


class HierarchicalFlip(NoiseModel):
    """Symmetric flip with ``logit eta_k ~ Normal(mu, sigma)``; see module docstring.

    :param grid_size: quadrature points ``G`` on ``[-grid_bound, grid_bound]``.
    :param grid_bound: the grid's half-width in logit space (10: eta in
        ``[4.5e-5, 1 - 4.5e-5]``).
    """

    name = "hierarchical"

    def __init__(
        self,
        num_annotators: int,
        mu_init: float = 2.0,
        sigma_init: float = 1.0,
        grid_size: int = 401,
        grid_bound: float = 10.0,
    ) -> None:
        super().__init__(num_annotators, None)
        f64 = torch.float64
        self.parameter("mu", mu_init, None)
        self.parameter("sigma", sigma_init, None, constraints.positive)
        self.declare("logit_eta", ANNOTATORS, reliability=True, point=False)
        grid = torch.linspace(-grid_bound, grid_bound, grid_size, dtype=f64)
        self.register_buffer("grid", grid, persistent=False)
        k = num_annotators
        self.register_buffer("post_loc", torch.full((k,), mu_init, dtype=f64))
        self.register_buffer("post_scale", torch.full((k,), sigma_init, dtype=f64))
        self.register_buffer("post_eta", torch.sigmoid(self.post_loc).clone())

    @classmethod
    def build(cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None):
        """The population location starts at ``mu = logit eta_init``; the population is
        the reliabilities' prior, so a Beta prior is an error."""
        if prior is not None:
            raise ValueError(
                "the hierarchical model has no reliability probability for a Beta prior: "
                "the population Normal(mu, sigma) is the prior of logit eta"
            )
        return cls(sizes.annotators, mu_init=logit(eta_init))

    def priors(self):
        f64 = torch.float64
        return {
            "mu": dist.Normal(torch.tensor(1.5, dtype=f64), torch.tensor(1.5, dtype=f64)),
            "sigma": dist.HalfNormal(torch.tensor(1.5, dtype=f64)),
        }

    def log_prior(self) -> Tensor:  # marginal empirical Bayes: no prior on (mu, sigma)
        return torch.zeros((), dtype=torch.float64)

    def model(self, logits: Tensor, data: LabelData) -> None:
        mu, sigma = self.mu, self.sigma
        with pyro.plate("annotators", self.num_annotators, dim=-1):
            logit_eta = pyro.sample("logit_eta", dist.Normal(mu, sigma))
        channel = torch.stack([-logit_eta, logit_eta])  # logit p(o = 1 | z, k), z = 0, 1
        with pyro.plate("items", data.num_units, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=logits), infer={"enumerate": "parallel"})
            pyro.sample("o", AnnotatorLabels(channel, z, data), obs=data.label)

    def e_step_model(self):
        return poutine.condition(self.model, data={"logit_eta": self.post_loc})

    # -- the likelihood on the grid -----------------------------------------
    def grid_log_likelihood(
        self, logits: Tensor, data: LabelData, marginals: dict[str, Tensor] | None = None
    ) -> Tensor:
        """``ll_k(x_g)`` ``(K, G)``: each annotator's log-likelihood on the grid.

        Per-label truth: exact, ``z`` summed out label by label (differentiable in
        ``logits``). Shared truth: the expected complete-data log-likelihood under
        ``q(z)`` (``marginals["z"]``), ``W_k log sigmoid(x) + (n_k - W_k) log sigmoid(-x)``.
        """
        up, down = logsigmoid(self.grid), logsigmoid(-self.grid)
        if data.shared_truth:
            q1 = self.label_posterior(data, marginals)
            w = data.label * q1 + (1 - data.label) * (1 - q1)
            correct = data.per_annotator_sum(w).unsqueeze(-1)
            wrong = data.label_counts().unsqueeze(-1) - correct
            return correct * up + wrong * down
        k = data.annotator[:, 0]
        signed = torch.where(data.label[:, 0] > 0.5, logits, -logits).unsqueeze(-1)
        out = torch.zeros(self.num_annotators, self.grid.shape[0], dtype=logits.dtype)
        for start in range(0, k.shape[0], LABEL_CHUNK):
            part = slice(start, start + LABEL_CHUNK)
            value = torch.logaddexp(logsigmoid(signed[part]) + up, logsigmoid(-signed[part]) + down)
            out = out.index_add(0, k[part], value)
        return out

    def log_population(self, mu: Tensor, sigma: Tensor) -> Tensor:
        """``log pi_g``: the population ``Normal(mu, sigma)`` discretised on the grid."""
        return torch.log_softmax(normal_log_density(self.grid, mu, sigma), -1)

    def log_evidence(self, log_lik: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """``log Z_k(mu, sigma) = log sum_g pi_g exp(ll_k(x_g))`` ``(K,)``."""
        return torch.logsumexp(log_lik + self.log_population(mu, sigma), -1)

    # -- EM -----------------------------------------------------------------
    def sufficient_statistics(self, data, marginals, logits):
        """``n`` and the grid log-likelihood ``ll_k(x_g)``: sums over labels."""
        log_lik = self.grid_log_likelihood(logits.detach(), data, marginals)
        return {"n": data.label_counts(), "log_lik": log_lik}

    def m_step(self, stats):
        """``(mu, sigma)`` maximising ``sum_k log Z_k`` (damped Newton on
        ``(mu, log(sigma - MIN_SIGMA))``), and the posterior ``q(x_k)`` they imply."""
        log_lik = stats["log_lik"]
        excess = (self.sigma.detach() - MIN_SIGMA).clamp_min(1e-8)
        theta = torch.stack([self.mu.detach(), excess.log()])  # sigma = MIN_SIGMA + e^t

        def objective(t: Tensor) -> Tensor:
            return self.log_evidence(log_lik, t[0], MIN_SIGMA + t[1].exp()).sum()

        value = objective(theta)
        for _ in range(100):
            grad = torch.autograd.functional.jacobian(objective, theta)
            hess = torch.autograd.functional.hessian(objective, theta)
            # Newton where the Hessian is negative definite, else gradient ascent.
            eig = torch.linalg.eigvalsh(hess)
            if bool((eig < 0).all()):
                step = -torch.linalg.solve(hess, grad)
            else:
                step = grad / (grad.abs().max().clamp_min(1.0))
            step = step / step.abs().max().clamp_min(1.0)  # at most 1 per coordinate
            for _ in range(30):  # backtracking: the objective must not fall
                candidate = objective(theta + step)
                if candidate >= value:
                    break
                step = step / 2
            else:
                break
            theta, gain = theta + step, float(candidate - value)
            value = candidate
            if gain <= 1e-13 * abs(float(value)) or float(step.abs().max()) < 1e-10:
                break
        mu, sigma = theta[0], MIN_SIGMA + theta[1].exp()
        self._set_posterior(log_lik, mu, sigma)
        return {"mu": mu, "sigma": sigma}

    def _set_posterior(self, log_lik: Tensor, mu: Tensor, sigma: Tensor) -> None:
        weights = torch.softmax(log_lik + self.log_population(mu, sigma), -1)
        mean = weights @ self.grid
        self.post_loc = mean
        self.post_scale = (weights @ self.grid**2 - mean**2).clamp_min(0).sqrt()
        self.post_eta = weights @ torch.sigmoid(self.grid)

    def objective(self, logits, data, posterior):
        """Per-label truth: the exact marginal log-likelihood ``sum_k log Z_k``.
        Shared truth: the evidence lower bound of the module docstring."""
        log_lik = self.grid_log_likelihood(logits, data, posterior.marginals)
        log_z = self.log_evidence(log_lik, self.mu, self.sigma).sum()
        if not data.shared_truth:
            return log_z
        q1 = posterior.marginals["z"][..., 1].reshape(-1).clamp(1e-300, 1)
        q0 = (1 - q1).clamp(1e-300, 1)
        prior_term = q1 * logsigmoid(logits) + q0 * logsigmoid(-logits)
        entropy = -(q1 * q1.log() + q0 * q0.log())
        return (prior_term + entropy).sum() + log_z

    def marginal_log_likelihood(self, logits, data):
        if data.shared_truth:
            return super().marginal_log_likelihood(logits, data)
        log_lik = self.grid_log_likelihood(logits, data)
        return self.log_evidence(log_lik, self.mu, self.sigma).sum()

    def implied_eta(self, logits, data):
        return self.post_eta[data.annotator]

    def annotator_parameters(self):
        return {
            "eta": self.post_eta.clone(),
            "logit_eta_mean": self.post_loc.clone(),
            "logit_eta_sd": self.post_scale.clone(),
        }
