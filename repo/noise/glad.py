"""GLAD: annotator ability times item difficulty (Whitehill et al., 2009).

Each label is correct with a probability that grows with the annotator's ability
``alpha_k`` and the item's ease ``beta_i > 0`` (its difficulty is ``1 / beta_i``)::

    z_i  ~ Bernoulli(sigmoid(s_i))
    o_ij = z_i with probability sigmoid(alpha_k beta_i), else 1 - z_i

so ``logit p(o_ij = 1 | z_i) = (2 z_i - 1) alpha_k beta_i``. ``alpha_k = 0`` is an
annotator who guesses, ``alpha_k < 0`` one who labels adversarially; ``beta_i -> 0``
an item nobody can label, ``beta_i -> inf`` one everybody with ``alpha_k > 0``
labels right. The item parameters live on the ``items`` plate, one per truth unit
key (``data.unit``): under shared truth the items, under per-label truth each
label.

Priors (the defaults of crowd-kit's GLAD, the benchmark's anchor)::

    alpha_k ~ Normal(1, 1),   log beta_i ~ Normal(1, 1)

and MAP is the mode in ``(alpha, log beta)`` (:meth:`GLAD.log_prior`).

The likelihood depends on ``alpha`` and ``beta`` only through their products, so
the maximum-likelihood estimate (``estimate="ml"``) is not unique (``alpha c``,
``beta / c`` fit alike) and its Laplace approximation is improper in that
direction; the posterior mode (``"map"``, Whitehill's EM) and full Bayes are
identified by the priors. No closed-form M-step: EM takes L-BFGS steps on the
marginal likelihood (written out in :meth:`GLAD.marginal_log_likelihood`; the
E-step and everything else read the Pyro program). The reported ``eta_k`` is ``sigmoid(alpha_k
beta_i)`` averaged over the annotator's labels.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.nn.functional import logsigmoid

from repo.noise.base import (
    ANNOTATORS,
    ITEMS,
    NoiseModel,
    Sizes,
    agree_logits,
    label_likelihood,
    logit,
)
from repo.noise.layout import LabelData


class GLAD(NoiseModel):
    """Per-annotator ability ``alpha`` and per-item ease ``beta``; see the module docstring.

    :param num_items: the size of the ``items`` plate (``max(data.unit) + 1``).
    """

    name = "glad"

    def __init__(
        self,
        num_annotators: int,
        num_items: int,
        alpha_init: float = 1.0,
        beta_init: float = 1.0,
        prior_loc: float = 1.0,
        prior_scale: float = 1.0,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        super().__init__(num_annotators, None, plate_sizes={ITEMS: num_items})
        self.prior_loc, self.prior_scale = prior_loc, prior_scale
        self.parameter("alpha", alpha_init, ANNOTATORS, constraints.real, reliability=True)
        self.parameter("beta", beta_init, ITEMS, constraints.positive)

    @classmethod
    def build(cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None):
        """``alpha_k = logit eta_init`` and ``beta_i = 1``: every label correct with
        probability ``eta_init`` at the start."""
        if prior is not None:
            raise ValueError(
                "the glad model has no reliability probability for a Beta prior (alpha is "
                "real-valued, beta positive; their priors are Normal(1, 1) and "
                "LogNormal(1, 1))"
            )
        if sizes.items is None:
            raise ValueError("the glad model needs the number of items (Sizes.items)")
        return cls(sizes.annotators, sizes.items, alpha_init=logit(eta_init))

    def priors(self):
        f64 = torch.float64
        loc = torch.tensor(self.prior_loc, dtype=f64)
        scale = torch.tensor(self.prior_scale, dtype=f64)
        k, i = self.plate_sizes[ANNOTATORS], self.plate_sizes[ITEMS]
        return {
            "alpha": dist.Normal(loc, scale).expand([k]).to_event(1),
            "beta": dist.LogNormal(loc, scale).expand([i]).to_event(1),
        }

    def log_prior(self) -> Tensor:
        """The log prior density of ``(alpha, log beta)``: MAP is the mode in the
        coordinates EM, the Laplace approximation and NUTS work in (the LogNormal
        density of ``beta`` plus the log-Jacobian ``log beta``), as crowd-kit's GLAD
        and Whitehill et al. have it."""
        total = super().log_prior()
        if self._estimate == "map":
            total = total + torch.log(self.beta).sum()
        return total

    def logit_correct(self, alpha: Tensor, beta: Tensor, data: LabelData) -> Tensor:
        """``alpha_k beta_i`` for every label slot ``(..., I, S)``."""
        return alpha[..., data.annotator] * beta[..., data.unit].unsqueeze(-1)

    def model(self, logits: Tensor, data: LabelData) -> None:
        alpha, beta = self.alpha, self.beta  # read before the plates (sample sites)
        correct = self.logit_correct(alpha, beta, data)
        with pyro.plate("items", data.num_units, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=logits), infer={"enumerate": "parallel"})
            label_logits = agree_logits(z.unsqueeze(-1), correct)
            pyro.sample("o", label_likelihood(label_logits, data), obs=data.label)

    def marginal_log_likelihood(self, logits: Tensor, data: LabelData) -> Tensor:
        """``sum_i log sum_z p(z | s_i) prod_j p(o_ij | z)`` written out (the value
        Pyro's enumeration gives, without tracing the program): what EM's L-BFGS
        M-step climbs, once per function evaluation."""
        correct = self.logit_correct(self.alpha, self.beta, data)
        signed = (2 * data.label - 1) * correct  # logit p(o = 1 | z = 1) times (2 o - 1)
        mask = data.mask.to(signed.dtype)
        if_one = (logsigmoid(signed) * mask).sum(-1) + logsigmoid(logits)
        if_zero = (logsigmoid(-signed) * mask).sum(-1) + logsigmoid(-logits)
        return torch.logaddexp(if_one, if_zero).sum()

    def implied_eta(self, logits, data):
        return torch.sigmoid(self.logit_correct(self.alpha.detach(), self.beta.detach(), data))
