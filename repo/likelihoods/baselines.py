r"""Baseline preference losses with reference model, as induced likelihoods.

All four read the implicit log-ratio margin
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

- **Hölder-DPO** (Fujisawa, Adachi and Osborne, NeurIPS 2025), with exponent
  :math:`\gamma > 0` and :math:`p = \sigma(\beta h)`:

  .. math:: L(A \succ B) = -(1 + \gamma)\,p^{\gamma} + \gamma\,p^{1 + \gamma},

  bounded (in :math:`[-1, 0]`) and redescending: the gradient is DPO's times
  :math:`\gamma(1 + \gamma)\,p^{\gamma}(1 - p)`, which vanishes on a pair the model
  confidently contradicts. Induced logit :math:`s = f(1 - p) - f(p)` with
  :math:`f(p) = -(1 + \gamma)p^{\gamma} + \gamma p^{1 + \gamma}`; :math:`|s| < 1`.

The classes compute ``logits`` by the generic construction
:math:`L(B \succ A) - L(A \succ B)`; the closed forms above are for reference
(and are checked in the tests). All default to the ``"mixture"`` policy-loss
variant: at :math:`w = 1` it is the baseline's own loss, whereas the "nll"
variant at :math:`w = 1` is :math:`-\log\sigma(s)` - for cDPO and rDPO, plain DPO
with a rescaled :math:`\beta`.

References: Mitchell, "A note on DPO with noisy preferences & relationship to IPO"
(2023); Chowdhury, Kini and Natarajan, "Provably Robust DPO: Aligning Language Models
with Noisy Feedback", ICML 2024; Fujisawa, Adachi and Osborne, "Scalable Valuation of
Human Feedback through Provably Robust Model Alignment", NeurIPS 2025
(arXiv:2505.17859).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from repo.likelihoods.base import PreferenceLikelihood, check_in_range, check_positive
from repo.likelihoods.stats import PairLogps

__all__ = ["HingeLikelihood", "CDPOLikelihood", "RDPOLikelihood", "HolderDPOLikelihood"]


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


class HolderDPOLikelihood(_RewardMarginLoss):
    r"""Hölder-DPO (Fujisawa, Adachi and Osborne, NeurIPS 2025): a redescending DPO.

    With :math:`m = \beta h` the DPO margin and :math:`p = \sigma(m)` the
    Bradley-Terry probability of the observed label,

    .. math:: L(A \succ B) = -(1 + \gamma)\,p^{\gamma} + \gamma\,p^{1 + \gamma},

    the per-pair loss of the authors' reference implementation
    (``github.com/ma921/HolderDPO``, method ``"holder_dpo"``, there averaged over the
    batch), from the Hölder divergence with exponent :math:`\gamma`. It is
    :math:`\gamma` times the density-power score
    :math:`-(1 + 1/\gamma)\,p^{\gamma} + \int p^{1 + \gamma}` (Basu et al., Biometrika
    1998) with the model's integral replaced by its value at the observed pair.
    Its gradient is DPO's reweighted,

    .. math::

        \frac{\partial L}{\partial m} = -\gamma(1 + \gamma)\,p^{\gamma}(1 - p)^2
            = \gamma(1 + \gamma)\,p^{\gamma}(1 - p)\,
              \frac{\partial L_{\mathrm{DPO}}}{\partial m},

    so a pair the model confidently contradicts (:math:`m \to -\infty`, an outlying
    or mislabelled pair) has influence :math:`\sim \gamma(1 + \gamma)e^{\gamma m} \to 0`
    (redescending), where DPO's :math:`|\partial L_{\mathrm{DPO}}/\partial m|` tends
    to 1. As :math:`\gamma \to 0`,
    :math:`(L + 1)/\gamma \to L_{\mathrm{DPO}} - (1 - p)`: the weight no longer
    vanishes on outlying pairs, but the limit is not DPO itself (its gradient is
    DPO's times :math:`1 - p`). At :math:`\gamma = 1`, :math:`L = (1 - p)^2 - 1`, the
    Brier score. For pairs whose label says "A" with probability :math:`\pi`, the
    expected loss is minimised at :math:`\mathrm{logit}\,p = \mathrm{logit}\,\pi / (2 - \gamma)`
    (for :math:`\gamma < 2`): calibrated at :math:`\gamma = 1` only.

    :param beta: DPO's inverse temperature (> 0).
    :param gamma: the Hölder exponent (> 0; default 1.0, the Brier case - this
        package's choice, not a value from the paper); larger values discard
        contradicted pairs sooner.

    With :math:`f` the loss above as a function of :math:`p`, the induced logit
    :math:`s = f(1 - p) - f(p)` has the sign of :math:`h` and :math:`|s| < 1` (the
    loss is bounded). Default variant ``"mixture"`` (Hölder-DPO itself at
    :math:`w = 1`). Derivation and checks: ``docs/math.md``, section 4.
    """

    name = "holder_dpo"

    def __init__(self, beta: float = 0.1, gamma: float = 1.0) -> None:
        super().__init__(beta)
        self.gamma = check_positive("gamma", gamma)

    def _score(self, margin: Tensor) -> Tensor:
        r""":math:`f(\sigma(m))`, with the powers of :math:`p` taken as
        :math:`\exp(k \log\sigma(m))` (finite for every margin)."""
        g = self.gamma
        log_p = F.logsigmoid(margin)
        return -(1.0 + g) * torch.exp(g * log_p) + g * torch.exp((1.0 + g) * log_p)

    def loss(self, stats: PairLogps) -> Tensor:
        return self._score(self._scaled_margin(stats))

    def logits(self, stats: PairLogps) -> Tensor:
        r""":math:`s = f(\sigma(-m)) - f(\sigma(m))` (one margin, two scores)."""
        m = self._scaled_margin(stats)
        return self._score(-m) - self._score(m)

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "gamma": self.gamma}
