"""Spammer mixture (MACE-like): each label is either honest or spam.

Annotator ``k`` is honest on a label with probability ``theta_k``; an honest label
copies the truth, a spam label says A with the annotator's own bias ``beta_k``::

    z_i  ~ Bernoulli(sigmoid(s_i))
    c_ij ~ Bernoulli(theta_k)                         # 1: honest (enumerated)
    o_ij ~ Bernoulli(c_ij z_i + (1 - c_ij) beta_k)

(Hovy et al., 2013). Both latents are enumerated exactly. With
``q_ij = p(c_ij = 1 | o)`` the M-step is ``theta_k = mean_j q_ij`` and
``beta_k = sum_j (1 - q_ij) o_ij / sum_j (1 - q_ij)``. The probability that a label
is correct is ``theta + (1 - theta) (p beta + (1 - p)(1 - beta))``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from repo.noise.base import NoiseModel, Sizes, beta_map
from repo.noise.layout import LabelData


class Spammer(NoiseModel):
    """Per-annotator honesty ``theta`` and spam bias ``bias`` (towards A)."""

    reads_position = True
    name = "spammer"

    def __init__(
        self,
        num_annotators: int,
        theta_init: float = 0.8,
        bias_init: float = 0.5,
        prior: dist.Beta | None = None,
    ) -> None:
        super().__init__(num_annotators, prior)
        self._probability("theta", theta_init)
        self._probability("bias", bias_init, reliability=False)

    @classmethod
    def build(cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None):
        """The honesty ``theta`` starts at ``eta_init``, the bias at 0.5."""
        return cls(sizes.annotators, theta_init=eta_init, prior=prior)

    def priors(self):
        priors = super().priors()
        if priors:  # full Bayes needs a prior on every parameter; the bias's is flat
            flat = dist.Beta(
                torch.ones((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
            )
            priors["bias"] = flat.expand([self.num_annotators]).to_event(1)
        return priors

    def model(self, logits: Tensor, data: LabelData) -> None:
        theta, bias = self.theta, self.bias
        with pyro.plate("items", data.num_units, dim=-2):
            z = pyro.sample(
                "z",
                dist.Bernoulli(logits=logits.unsqueeze(-1)),
                infer={"enumerate": "parallel"},
            )
            with pyro.plate("slots", data.num_slots, dim=-1), poutine.mask(mask=data.slot_mask):
                k = data.annotator
                c = pyro.sample(
                    "honest", dist.Bernoulli(probs=theta[k]), infer={"enumerate": "parallel"}
                )
                probs = c * z + (1 - c) * bias[k]
                pyro.sample("o", dist.Bernoulli(probs=probs), obs=data.label)

    def sufficient_statistics(self, data, marginals, logits):
        honest = marginals["honest"][..., 1].reshape(data.label.shape)
        spam = 1 - honest
        return {
            "n": data.label_counts(),
            "honest": data.per_annotator_sum(honest),
            "spam": data.per_annotator_sum(spam),
            "spam_a": data.per_annotator_sum(spam * data.label),
        }

    def m_step(self, stats):
        return {
            "theta": beta_map(stats["honest"], stats["n"], self.prior),
            "bias": beta_map(stats["spam_a"], stats["spam"], None),
        }

    def implied_eta(self, logits, data):
        p = torch.sigmoid(logits).unsqueeze(-1)
        k = data.annotator
        theta, bias = self.theta.detach()[k], self.bias.detach()[k]
        return theta + (1 - theta) * (p * bias + (1 - p) * (1 - bias))
