"""Hierarchical flip: reliabilities partially pooled around a population.

The symmetric flip with each annotator's reliability drawn from a population::

    x_k  ~ Normal(mu, sigma),   eta_k = sigmoid(x_k)
    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij ~ Bernoulli(z_i eta_k + (1 - z_i)(1 - eta_k))

Annotators with few labels borrow strength from the others. Maximising jointly over
``(x_k, mu, sigma)`` is degenerate (the likelihood grows without bound as
``sigma -> 0`` with every ``x_k = mu``), so EM here is *marginal* empirical Bayes:
``x_k`` is integrated out and only ``(mu, sigma)`` are point estimates. EM is
variational (mean field ``q(z) q(x)``), each factor exact given the other:

* ``q(z)``: enumeration with ``x_k`` held at ``E_q[x_k]`` (for a flip channel the
  ratio ``exp E[log eta] / exp E[log(1 - eta)] = exp E[x]``, so this is exact);
* ``q(x_k) ∝ eta^W_k (1 - eta)^(n_k - W_k) Normal(x; mu, sigma)`` with
  ``W_k = sum_j w_j``, by adaptive Gauss-Hermite quadrature around its mode;
* ``mu = mean_k E[x_k]``, ``sigma^2 = mean_k E[(x_k - mu)^2]``.

The objective, which never decreases, is the evidence lower bound
``sum_i (E_q log p(z_i | s_i) + H(q(z_i))) + sum_k log Z_k`` with ``Z_k`` the
quadrature normaliser of ``q(x_k)``. The reported ``eta_k`` is ``E_q[sigmoid(x_k)]``.
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

    def sufficient_statistics(self, data, marginals):
        q1 = marginals["z"][..., 1]
        w = data.label * q1 + (1 - data.label) * (1 - q1)
        return {"n": data.label_counts(), "correct": data.per_annotator_sum(w)}

    def _quadrature(self, correct: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nodes ``x (K, Q)``, normalised posterior weights ``(K, Q)`` and ``log Z (K,)``
        of ``q(x_k) ∝ sigmoid(x)^W (1 - sigmoid(x))^(n - W) Normal(x; mu, sigma)``."""
        mu, sigma = self.mu.detach(), self.sigma.detach()
        x = torch.full_like(correct, float(mu))
        for _ in range(50):  # Newton for the mode of a strictly concave function
            p = torch.sigmoid(x)
            grad = correct - n * p - (x - mu) / sigma**2
            hess = -n * p * (1 - p) - 1 / sigma**2
            step = (grad / hess).clamp(-2.0, 2.0)
            x = x - step
            if float(step.abs().max()) < 1e-10:
                break
        p = torch.sigmoid(x)
        scale = (n * p * (1 - p) + 1 / sigma**2).rsqrt()
        nodes = x.unsqueeze(-1) + np.sqrt(2.0) * scale.unsqueeze(-1) * self.nodes
        log_f = (
            correct.unsqueeze(-1) * _log_sigmoid(nodes)
            + (n - correct).unsqueeze(-1) * _log_sigmoid(-nodes)
            + dist.Normal(mu, sigma).log_prob(nodes)
        )
        log_terms = log_f + self.nodes**2 + self.log_weights
        log_z = torch.logsumexp(log_terms, -1) + torch.log(np.sqrt(2.0) * scale)
        weights = torch.softmax(log_terms, -1)
        return nodes, weights, log_z

    def m_step(self, stats):
        nodes, weights, _ = self._quadrature(stats["correct"], stats["n"])
        mean = (weights * nodes).sum(-1)
        second = (weights * nodes**2).sum(-1)
        self.post_loc = mean
        self.post_eta = (weights * torch.sigmoid(nodes)).sum(-1)
        mu = mean.mean()
        sigma = (second - 2 * mu * mean + mu**2).mean().clamp_min(MIN_SIGMA**2).sqrt()
        return {"mu": mu, "sigma": sigma}

    def objective(self, logits, data, posterior):
        q1 = posterior.marginals["z"][..., 1].reshape(-1).clamp(1e-300, 1)
        q0 = (1 - q1).clamp(1e-300, 1)
        prior_term = q1 * _log_sigmoid(logits) + q0 * _log_sigmoid(-logits)
        entropy = -(q1 * q1.log() + q0 * q0.log())
        stats = self.sufficient_statistics(data, posterior.marginals)
        _, _, log_z = self._quadrature(stats["correct"], stats["n"])
        return (prior_term + entropy).sum() + log_z.sum()

    def implied_eta(self, logits, data):
        return self.post_eta[data.annotator]

    def annotator_parameters(self):
        return {"eta": self.post_eta.clone(), "logit_eta_mean": self.post_loc.clone()}

    def population_parameters(self):
        return {"mu": self.mu.detach(), "sigma": self.sigma.detach()}
