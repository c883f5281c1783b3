r"""Baseline preference losses with reference model, as induced likelihoods.

All three read the implicit log-ratio margin
:math:`h = r(A) - r(B)`, :math:`r(y) = \log\pi_\theta(y \mid x) - \log\pi_{\mathrm{ref}}(y \mid x)`
(summed over response tokens), and write :math:`L_{\mathrm{DPO}}(A \succ B) = -\log\sigma(\beta h)`.

- **Hinge** (SLiC-HF, Zhao et al., 2023; TRL's ``loss_type="hinge"``):

  .. math:: L(A \succ B) = \max(0,\ 1 - \beta h),

  induced logit :math:`s = \max(0, 1 + \beta h) - \max(0, 1 - \beta h)`, i.e.
  :math:`2\beta h` for :math:`|\beta h| \le 1` and
  :math:`\beta h + \operatorname{sign}(\beta h)` beyond.

- **cDPO** (label-smoothed / conservative DPO, Mitchell 2023; TRL's
  ``label_smoothing``), with assumed flip rate :math:`\varepsilon \in [0, 1/2]`:

  .. math::

      L(A \succ B) = (1 - \varepsilon)\,L_{\mathrm{DPO}}(A \succ B)
                     + \varepsilon\,L_{\mathrm{DPO}}(B \succ A),

  induced logit :math:`s = (1 - 2\varepsilon)\,\beta h`.

- **rDPO** (Chowdhury et al., 2024; TRL's ``loss_type="robust"``), with known flip
  rate :math:`\varepsilon \in [0, 1/2)`:

  .. math::

      L(A \succ B) = \frac{(1 - \varepsilon)\,L_{\mathrm{DPO}}(A \succ B)
                           - \varepsilon\,L_{\mathrm{DPO}}(B \succ A)}{1 - 2\varepsilon},

  an unbiased estimate of the clean-label DPO loss; it equals
  :math:`L_{\mathrm{DPO}}(A \succ B) - \tfrac{\varepsilon}{1 - 2\varepsilon}\beta h` and is
  unbounded below for :math:`\varepsilon > 0`. Induced logit
  :math:`s = \beta h / (1 - 2\varepsilon)`: DPO's Bradley-Terry model with the sharper
  temperature :math:`\beta / (1 - 2\varepsilon)`.

The classes compute ``logits`` by the generic construction
:math:`L(B \succ A) - L(A \succ B)`; the closed forms above are for reference
(and are checked in the tests). All default to the ``"mixture"`` policy-loss
variant: at :math:`w = 1` it is the baseline's own loss, whereas the "nll"
variant at :math:`w = 1` is :math:`-\log\sigma(s)` - for cDPO and rDPO, plain DPO
with a rescaled :math:`\beta`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from repo.likelihoods.base import PreferenceLikelihood, check_in_range, check_positive
from repo.likelihoods.stats import PairLogps

__all__ = ["HingeLikelihood", "CDPOLikelihood", "RDPOLikelihood"]


class _RewardMarginLoss(PreferenceLikelihood):
    """Shared plumbing: needs reference log-probs, ``beta``, DPO-style rewards."""

    needs_reference = True
    default_variant = "mixture"

    def __init__(self, beta: float) -> None:
        self.beta = check_positive("beta", beta)

    def _scaled_margin(self, stats: PairLogps) -> Tensor:
        r""":math:`\beta h = \beta\,[r(A) - r(B)]`."""
        self.check_stats(stats)
        return self.beta * (stats.log_ratio_a - stats.log_ratio_b)

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        r"""TRL's rewards: :math:`\beta\,r(A)`, :math:`\beta\,r(B)` (detached)."""
        self.check_stats(stats)
        return (self.beta * stats.log_ratio_a).detach(), (self.beta * stats.log_ratio_b).detach()


class HingeLikelihood(_RewardMarginLoss):
    r"""SLiC hinge: :math:`L(A \succ B) = \max(0, 1 - \beta h)`.

    :param beta: inverse margin scale (> 0); the hinge is inactive once
        :math:`h \ge 1/\beta`.

    Default variant ``"mixture"`` (the hinge itself at :math:`w = 1`).
    """

    name = "hinge"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta)

    def loss(self, stats: PairLogps) -> Tensor:
        return F.relu(1.0 - self._scaled_margin(stats))

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta}


class CDPOLikelihood(_RewardMarginLoss):
    r"""cDPO (label-smoothed DPO):
    :math:`(1 - \varepsilon) L_{\mathrm{DPO}}(A \succ B) + \varepsilon L_{\mathrm{DPO}}(B \succ A)`.

    :param beta: DPO's inverse temperature (> 0).
    :param epsilon: label-smoothing rate, in ``[0, 0.5]`` (default 0.1); 0 is DPO.

    Default variant ``"mixture"`` (cDPO itself at :math:`w = 1`; in general DPO
    with soft label :math:`\varepsilon + (1 - 2\varepsilon) w`).
    """

    name = "cdpo"

    def __init__(self, beta: float = 0.1, epsilon: float = 0.1) -> None:
        super().__init__(beta)
        self.epsilon = check_in_range("epsilon", epsilon, 0.0, 0.5, high_inclusive=True)

    def loss(self, stats: PairLogps) -> Tensor:
        m = self._scaled_margin(stats)
        eps = self.epsilon
        return -(1.0 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "epsilon": self.epsilon}


class RDPOLikelihood(_RewardMarginLoss):
    r"""rDPO (robust DPO with known flip rate):
    :math:`[(1 - \varepsilon) L_{\mathrm{DPO}}(A \succ B) - \varepsilon L_{\mathrm{DPO}}(B \succ A)]
    / (1 - 2\varepsilon)`.

    :param beta: DPO's inverse temperature (> 0).
    :param epsilon: known label-flip rate, in ``[0, 0.5)`` (default 0.1); 0 is DPO.

    Default variant ``"mixture"`` (rDPO itself at :math:`w = 1`; "nll" would be
    plain soft-label DPO with :math:`\beta / (1 - 2\varepsilon)`, since that is
    rDPO's induced logit: the noise correction would be lost).
    """

    name = "rdpo"

    def __init__(self, beta: float = 0.1, epsilon: float = 0.1) -> None:
        super().__init__(beta)
        self.epsilon = check_in_range("epsilon", epsilon, 0.0, 0.5, high_inclusive=False)

    def loss(self, stats: PairLogps) -> Tensor:
        m = self._scaled_margin(stats)
        eps = self.epsilon
        return (-(1.0 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1.0 - 2.0 * eps)

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "epsilon": self.epsilon}
