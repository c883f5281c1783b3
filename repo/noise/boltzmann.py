"""Boltzmann-rational annotator: labels follow the scores, sharpened or flattened.

No discrete latent: annotator ``k`` says A with probability ``sigmoid(tau_k s_i)``::

    o_ij ~ Bernoulli(logits = tau_k s_i)

``tau_k = 1`` is an annotator calibrated like the scorer, ``tau_k > 1`` more
decisive, ``0`` random, ``< 0`` adversarial. It is the comparison point for the
flip models: a label's chance of agreeing with the better response is
``sigmoid(tau_k |s_i|)``. It needs per-item scores (a fixed scorer): with a learned
class prior the scores carry no information, and with learned Bradley-Terry scores
the scale of ``s`` and ``tau`` cannot be told apart. No closed-form M-step: EM takes
gradient steps on the (here exact) log-likelihood.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

from repo.noise.base import ANNOTATORS, NoiseModel, Sizes, label_likelihood
from repo.noise.layout import LabelData


class Boltzmann(NoiseModel):
    """Per-annotator rationality ``tau_k`` (real-valued)."""

    has_truth = False
    name = "boltzmann"

    def __init__(self, num_annotators: int, tau_init: float = 1.0, tau_prior_scale: float = 3.0):
        super().__init__(num_annotators, None)
        self.tau_prior_scale = tau_prior_scale
        self.parameter("tau", float(tau_init), ANNOTATORS, constraints.real, reliability=True)

    @classmethod
    def build(cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None):
        """``tau`` starts at 1 (calibrated like the scorer); there is no Beta prior."""
        if prior is not None:
            raise ValueError(
                "the boltzmann model has no reliability probability for a Beta prior "
                "(tau is real-valued; its prior is Normal(1, tau_prior_scale))"
            )
        return cls(sizes.annotators)

    def priors(self):
        scale = torch.tensor(self.tau_prior_scale, dtype=torch.float64)
        normal = dist.Normal(torch.ones((), dtype=torch.float64), scale)
        return {"tau": normal.expand([self.num_annotators]).to_event(1)}

    def model(self, logits: Tensor, data: LabelData) -> None:
        tau = self.tau
        with pyro.plate("items", data.num_units, dim=-1):
            label_logits = tau[data.annotator] * logits.unsqueeze(-1)
            pyro.sample("o", label_likelihood(label_logits, data), obs=data.label)

    def implied_eta(self, logits, data):
        return torch.sigmoid(self.tau.detach()[data.annotator] * logits.abs().unsqueeze(-1))
