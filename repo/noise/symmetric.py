"""Symmetric flip (one-coin): the paper's noise model.

Each annotator ``k`` reports the true preference with probability ``eta_k`` and the
reverse otherwise, whatever the truth::

    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij ~ Bernoulli(z_i eta_k + (1 - z_i)(1 - eta_k)),   k = k_ij

The E-step gives ``w_ij = p(z_i = o_ij | o)``; per-label truth reduces it to the
paper's closed form ``p eta / (p eta + (1 - p)(1 - eta))`` with ``p = sigmoid(s)``
for ``o = 1``. The M-step is ``eta_k = sum_j w_j / n_k`` over annotator ``k``'s
labels (the mode ``(sum w + a - 1) / (n_k + a + b - 2)`` under a Beta(a, b) prior).
The model is invariant to swapping A and B.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from repo.inference.profile import EtaProfile, eta_profile
from repo.noise.base import NoiseModel, Sizes, beta_map
from repo.noise.channel import AnnotatorLabels
from repo.noise.layout import LabelData


class SymmetricFlip(NoiseModel):
    """One reliability ``eta_k`` per annotator (one global eta when ``K = 1``)."""

    name = "symmetric"

    def __init__(
        self, num_annotators: int, eta_init: float = 0.9, prior: dist.Beta | None = None
    ) -> None:
        super().__init__(num_annotators, prior)
        self._probability("eta", eta_init)

    @classmethod
    def build(cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None):
        """Every ``eta_k`` starts at ``eta_init``."""
        return cls(sizes.annotators, eta_init=eta_init, prior=prior)

    def model(self, logits: Tensor, data: LabelData) -> None:
        logit_eta = torch.logit(self.eta)
        channel = torch.stack([-logit_eta, logit_eta])  # logit p(o = 1 | z, k), z = 0, 1
        with pyro.plate("items", data.num_units, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=logits), infer={"enumerate": "parallel"})
            pyro.sample("o", AnnotatorLabels(channel, z, data), obs=data.label)

    def eta_profile(
        self, logits: Tensor, data: LabelData, *, grid: int = 201, scales: int = 121
    ) -> EtaProfile | None:
        """With one annotator and one label per truth unit (the case of
        :mod:`repo.inference.profile`), the profile likelihood of ``eta`` at the scored
        units' logits; else ``None``."""
        if self.num_annotators != 1 or data.shared_truth or data.num_slots != 1:
            return None
        unit_logits = logits[data.unit]
        seen = ~torch.isnan(unit_logits)
        if not bool(seen.any()):
            return None
        return eta_profile(unit_logits[seen], data.label[seen, 0], grid=grid, scales=scales)

    def sufficient_statistics(self, data, marginals, logits):
        q1 = self.label_posterior(data, marginals)
        w = data.label * q1 + (1 - data.label) * (1 - q1)
        return {"n": data.label_counts(), "correct": data.per_annotator_sum(w)}

    def m_step(self, stats):
        return {"eta": beta_map(stats["correct"], stats["n"], self.prior)}

    def implied_eta(self, logits, data):
        return self.eta.detach()[data.annotator]
