r"""DPO (Rafailov et al., 2023) and the Bradley-Terry likelihood it induces.

With the implicit log-ratio
:math:`r(y) = \log\pi_\theta(y \mid x) - \log\pi_{\mathrm{ref}}(y \mid x)`
(log-probabilities summed over the response tokens) and
:math:`h = r(A) - r(B)`:

.. math::

    L_{\mathrm{DPO}}(A \succ B) = -\log\sigma(\beta h).

Since :math:`\sigma(\beta h) + \sigma(-\beta h) = 1`, the loss is exactly
likelihood-style: the induced model is Bradley-Terry on the implicit reward,

.. math::

    p(A \succ^* B) = \sigma(s), \qquad s = \beta h,

and the RE-DPO policy step is the soft-label logistic loss
:math:`-[w\log\sigma(\beta h) + (1-w)\log\sigma(-\beta h)]` (the "nll" and
"mixture" variants are the same function).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from repo.likelihoods.base import PreferenceLikelihood, check_positive
from repo.likelihoods.stats import PairLogps

__all__ = ["DPOLikelihood"]


class DPOLikelihood(PreferenceLikelihood):
    r"""DPO: :math:`L(A \succ B) = -\log\sigma(\beta h)`, induced logit :math:`s = \beta h`.

    Here :math:`h = r(A) - r(B)`, the difference of implicit log-ratios.

    :param beta: inverse temperature of the implicit reward (> 0); TRL's ``beta``.

    Default policy-loss variant: ``"nll"``. DPO is likelihood-style, so the
    induced negative log-likelihood and the w-mixture of the loss are the same
    function; ``"nll"`` computes it with one log-sigmoid pair on the closed-form
    logit.
    """

    name = "dpo"
    needs_reference = True
    default_variant = "nll"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_positive("beta", beta)

    @property
    def likelihood_style(self) -> bool:
        return True

    def loss(self, stats: PairLogps) -> Tensor:
        return -F.logsigmoid(self.logits(stats))

    def logits(self, stats: PairLogps) -> Tensor:
        self.check_stats(stats)
        return self.beta * (stats.log_ratio_a - stats.log_ratio_b)

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        r"""TRL's rewards: :math:`\beta\,r(A)`, :math:`\beta\,r(B)` (detached)."""
        self.check_stats(stats)
        return (self.beta * stats.log_ratio_a).detach(), (self.beta * stats.log_ratio_b).detach()

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta}
