"""Hierarchical flip: reliabilities partially pooled around a population.

The symmetric flip with each annotator's reliability drawn from a population::

    x_k  ~ Normal(mu, sigma),   eta_k = sigmoid(x_k)
    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij ~ Bernoulli(z_i eta_k + (1 - z_i)(1 - eta_k))

Annotators with few labels borrow strength from the others. Maximising jointly over
``(x_k, mu, sigma)`` is degenerate (the likelihood grows without bound as
``sigma -> 0`` with every ``x_k = mu``), so EM here is *marginal* empirical Bayes:
``x_k`` is integrated out by adaptive Gauss-Hermite quadrature and only
``(mu, sigma)`` are point estimates. The E-step over ``x_k`` is

    q(x_k) ∝ Normal(x_k; mu, sigma) prod_j l_j(x_k)

* per-label truth: ``l_j(x) = p_j sigmoid(x) + (1 - p_j) sigmoid(-x)`` with
  ``p_j = p(z_j = o_j | s_j)``: ``z`` summed out exactly, so EM climbs the exact
  marginal likelihood ``sum_k log Z_k`` (``Z_k`` the normaliser of ``q(x_k)``);
* shared truth (annotators coupled through ``z_i``): mean field ``q(z) q(x)``,
  ``l_j(x) = sigmoid(x)^w_j sigmoid(-x)^(1 - w_j)``, with ``q(z)`` from enumeration
  at ``x_k = E_q[x_k]`` (for a flip channel ``exp E[log eta] / exp E[log(1 - eta)]
  = exp E[x]``, so that update is exact too); the objective is the evidence bound
  ``sum_i (E_q log p(z_i | s_i) + H(q(z_i))) + sum_k log Z_k``.

M-step: ``mu = mean_k E[x_k]``, ``sigma^2 = mean_k E[(x_k - mu)^2]``. Neither
objective ever decreases. The reported ``eta_k`` is ``E_q[sigmoid(x_k)]``.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch import Tensor

from repo.noise.base import NoiseModel, agree_logits
from repo.noise.layout import LabelData

MIN_SIGMA = 1e-3


def _log_sigmoid(x: Tensor) -> Tensor:
    return torch.nn.functional.logsigmoid(x)


class HierarchicalFlip(NoiseModel):
    """Symmetric flip with ``logit eta_k ~ Normal(mu, sigma)``; see module docstring."""

    name = "hierarchical"

    def __init__(
        self,
        num_annotators: int,
        mu_init: float = 2.0,
        sigma_init: float = 1.0,
        num_nodes: int = 24,
    ) -> None:
        super().__init__(num_annotators, None)
        f64 = torch.float64
        self.mu = PyroParam(torch.tensor(mu_init, dtype=f64))
        self.sigma = PyroParam(torch.tensor(sigma_init, dtype=f64), constraint=constraints.positive)
        nodes, weights = np.polynomial.hermite.hermgauss(num_nodes)
        self.register_buffer("nodes", torch.tensor(nodes, dtype=f64), persistent=False)
        self.register_buffer(
            "log_weights", torch.tensor(np.log(weights), dtype=f64), persistent=False
        )
        self.register_buffer("post_loc", torch.full((num_annotators,), mu_init, dtype=f64))
        self.register_buffer("post_eta", torch.sigmoid(self.post_loc).clone())

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
        with pyro.plate("items", data.num_units, dim=-2):
            z = pyro.sample(
                "z",
                dist.Bernoulli(logits=logits.unsqueeze(-1)),
                infer={"enumerate": "parallel"},
            )
            with pyro.plate("slots", data.num_slots, dim=-1), poutine.mask(mask=data.mask):
                label_logits = agree_logits(z, logit_eta[..., data.annotator])
                pyro.sample("o", dist.Bernoulli(logits=label_logits), obs=data.label)

    def e_step_model(self):
        return poutine.condition(self.model, data={"logit_eta": self.post_loc})

    def _label_log_lik(self, x: Tensor, data: LabelData, logits: Tensor) -> Tensor:
        """Per-label truth: ``log(p_j sigmoid(x) + (1 - p_j) sigmoid(-x))`` summed per
        annotator, with ``p_j = p(z_j = o_j | s_j)``; ``x`` is ``(K,)`` or ``(K, Q)``."""
        k = data.annotator[:, 0]
        signed = torch.where(data.label[:, 0] > 0.5, logits, -logits)
        lp, lq = _log_sigmoid(signed), _log_sigmoid(-signed)
        xk = x[k]
        if xk.dim() == 2:
            lp, lq = lp.unsqueeze(-1), lq.unsqueeze(-1)
        value = torch.logaddexp(lp + _log_sigmoid(xk), lq + _log_sigmoid(-xk))
        out = torch.zeros(x.shape, dtype=value.dtype)
        return out.index_add_(0, k, value)

    def _label_derivatives(self, x: Tensor, data: LabelData, logits: Tensor):
        """First and second derivatives in ``x_k`` of :meth:`_label_log_lik`."""
        k = data.annotator[:, 0]
        signed = torch.where(data.label[:, 0] > 0.5, logits, -logits)
        p = torch.sigmoid(signed)
        e = torch.sigmoid(x[k])
        f = (1 - p) + (2 * p - 1) * e
        df = (2 * p - 1) * e * (1 - e)
        d2f = df * (1 - 2 * e)
        g = df / f
        h = d2f / f - g**2
        zero = torch.zeros(x.shape, dtype=x.dtype)
        return zero.index_add(0, k, g), zero.index_add(0, k, h)

    def sufficient_statistics(self, data, marginals, logits):
        """The log-likelihood of each annotator's labels at quadrature nodes.

        Per-label truth: exact (``z`` summed out label by label). Shared truth: the
        expected complete-data log-likelihood ``W log sigmoid(x) + (n - W) log
        sigmoid(-x)`` under ``q(z)`` (mean field). Nodes: Gauss-Hermite around the
        mode of ``q(x_k)`` at the current ``(mu, sigma)``, scaled by its curvature.
        """
        mu, sigma = self.mu.detach(), self.sigma.detach()
        n = data.label_counts()
        exact = not data.shared_truth
        if not exact:
            q1 = marginals["z"][..., 1]
            w = data.label * q1 + (1 - data.label) * (1 - q1)
            correct = data.per_annotator_sum(w)
        x = self.post_loc.clone()
        for _ in range(50):  # Newton for the mode of a strictly concave function
            if exact:
                grad, hess = self._label_derivatives(x, data, logits)
            else:
                p = torch.sigmoid(x)
                grad, hess = correct - n * p, -n * p * (1 - p)
            grad = grad - (x - mu) / sigma**2
            hess = hess - 1 / sigma**2
            step = (grad / hess).clamp(-2.0, 2.0)
            x = x - step
            if float(step.abs().max()) < 1e-9:
                break
        if exact:
            _, hess = self._label_derivatives(x, data, logits)
        else:
            p = torch.sigmoid(x)
            hess = -n * p * (1 - p)
        scale = (-hess + 1 / sigma**2).clamp_min(1e-12).rsqrt()
        nodes = x.unsqueeze(-1) + np.sqrt(2.0) * scale.unsqueeze(-1) * self.nodes
        if exact:
            log_lik = self._label_log_lik(nodes, data, logits)
        else:
            log_lik = correct.unsqueeze(-1) * _log_sigmoid(nodes) + (n - correct).unsqueeze(
                -1
            ) * _log_sigmoid(-nodes)
        return {"n": n, "nodes": nodes, "scale": scale, "log_lik": log_lik}

    def _quadrature(self, stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Normalised weights of ``q(x_k)`` at the nodes ``(K, Q)`` and ``log Z_k``."""
        nodes = stats["nodes"]
        prior = dist.Normal(self.mu.detach(), self.sigma.detach()).log_prob(nodes)
        log_terms = stats["log_lik"] + prior + self.nodes**2 + self.log_weights
        log_z = torch.logsumexp(log_terms, -1) + torch.log(np.sqrt(2.0) * stats["scale"])
        return torch.softmax(log_terms, -1), log_z

    def m_step(self, stats):
        weights, _ = self._quadrature(stats)
        nodes = stats["nodes"]
        mean = (weights * nodes).sum(-1)
        second = (weights * nodes**2).sum(-1)
        self.post_loc = mean
        self.post_eta = (weights * torch.sigmoid(nodes)).sum(-1)
        mu = mean.mean()
        sigma = (second - 2 * mu * mean + mu**2).mean().clamp_min(MIN_SIGMA**2).sqrt()
        return {"mu": mu, "sigma": sigma}

    def objective(self, logits, data, posterior):
        """Per-label truth: the exact marginal log-likelihood ``sum_k log Z_k``.
        Shared truth: the evidence lower bound of the module docstring."""
        stats = self.sufficient_statistics(data, posterior.marginals, logits)
        _, log_z = self._quadrature(stats)
        if not data.shared_truth:
            return log_z.sum()
        q1 = posterior.marginals["z"][..., 1].reshape(-1).clamp(1e-300, 1)
        q0 = (1 - q1).clamp(1e-300, 1)
        prior_term = q1 * _log_sigmoid(logits) + q0 * _log_sigmoid(-logits)
        entropy = -(q1 * q1.log() + q0 * q0.log())
        return (prior_term + entropy).sum() + log_z.sum()

    def implied_eta(self, logits, data):
        return self.post_eta[data.annotator]

    def annotator_parameters(self):
        return {"eta": self.post_eta.clone(), "logit_eta_mean": self.post_loc.clone()}

    def population_parameters(self):
        return {"mu": self.mu.detach(), "sigma": self.sigma.detach()}
