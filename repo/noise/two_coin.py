"""Class-conditional flip (two-coin): a reliability for each true class.

Annotator ``k`` reports the truth with probability ``eta_a_k`` when A is truly
better and ``eta_b_k`` when B is::

    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij ~ Bernoulli(z_i eta_a_k + (1 - z_i)(1 - eta_b_k))

``eta_a != eta_b`` is a bias towards one position (or one class, for binary
labels). The model reads the A/B order, so it needs an order the annotator saw or
one chosen independently of the label. M-step (closed form, weighted by the
posterior ``q_i = p(z_i = 1 | o)``)::

    eta_a_k = sum_j q_i o_j / sum_j q_i,   eta_b_k = sum_j (1 - q_i)(1 - o_j) / sum_j (1 - q_i)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from repo.noise.base import NoiseModel, Sizes, beta_map
from repo.noise.channel import AnnotatorLabels
from repo.noise.layout import LabelData


class TwoCoin(NoiseModel):
    """Per-annotator ``eta_a`` (truth A) and ``eta_b`` (truth B)."""

    reads_position = True
    name = "two-coin"

    def __init__(
        self, num_annotators: int, eta_init: float = 0.9, prior: dist.Beta | None = None
    ) -> None:
        super().__init__(num_annotators, prior)
        self._probability("eta_a", eta_init)
        self._probability("eta_b", eta_init)

    @classmethod
    def build(cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None):
        """Both reliabilities start at ``eta_init``."""
        return cls(sizes.annotators, eta_init=eta_init, prior=prior)

    def model(self, logits: Tensor, data: LabelData) -> None:
        # logit p(o = 1 | z, k): -logit eta_b_k when z = 0, logit eta_a_k when z = 1
        channel = torch.stack([-torch.logit(self.eta_b), torch.logit(self.eta_a)])
        with pyro.plate("items", data.num_units, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=logits), infer={"enumerate": "parallel"})
            pyro.sample("o", AnnotatorLabels(channel, z, data), obs=data.label)

    def sufficient_statistics(self, data, marginals, logits):
        q1, o = self.label_posterior(data, marginals), data.label
        truth_a = data.per_annotator_sum(q1)
        correct_a = data.per_annotator_sum(q1 * o)
        correct_b = data.per_annotator_sum((1 - q1) * (1 - o))
        n = data.label_counts()
        return {
            "n": n,
            "truth_a": truth_a,
            "correct_a": correct_a,
            "truth_b": n - truth_a,
            "correct_b": correct_b,
        }

    def m_step(self, stats):
        return {
            "eta_a": beta_map(stats["correct_a"], stats["truth_a"], self.prior),
            "eta_b": beta_map(stats["correct_b"], stats["truth_b"], self.prior),
        }

    def implied_eta(self, logits, data):
        p = torch.sigmoid(logits).unsqueeze(-1)
        k = data.annotator
        return p * self.eta_a.detach()[k] + (1 - p) * self.eta_b.detach()[k]
