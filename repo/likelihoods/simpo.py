r"""SimPO (Meng et al., 2024) and its induced likelihood.

Reference-free, on mean token log-probabilities. With
:math:`D = \beta\big(\log\pi_\theta(A)/|A| - \log\pi_\theta(B)/|B|\big)` and target
margin :math:`\gamma \ge 0`:

.. math::

    L_{\mathrm{SimPO}}(A \succ B) = -\log\sigma(D - \gamma).

Induced model (:math:`\sigma` the logistic function):

.. math::

    p(A \succ^* B) = \frac{\sigma(D - \gamma)}{\sigma(D - \gamma) + \sigma(-D - \gamma)},
    \qquad s = \log\sigma(D - \gamma) - \log\sigma(-D - \gamma).

At :math:`\gamma = 0` the denominator is 1: SimPO is then likelihood-style and
:math:`s = D` (Bradley-Terry on the length-normalised log-probability). For
:math:`\gamma > 0` it is not; :math:`s` is odd in :math:`D`, with slope
:math:`2\sigma(\gamma)` at :math:`D = 0` and :math:`s \approx D \pm \gamma` for
:math:`|D| \gg \gamma`.

``gamma`` here is the margin inside the sigmoid, TRL's ``simpo_gamma``; the
SimPO paper's code states it as ``gamma_beta_ratio`` :math:`= \gamma/\beta`.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from repo.likelihoods.base import PreferenceLikelihood, check_positive
from repo.likelihoods.stats import PairLogps

__all__ = ["SimPOLikelihood"]


class SimPOLikelihood(PreferenceLikelihood):
    r"""SimPO: :math:`L(A \succ B) = -\log\sigma(D - \gamma)` on mean token log-probs.

    :param beta: reward scale on the mean token log-probability (> 0); the SimPO
        paper uses 2.0 to 2.5.
    :param gamma: target reward margin (>= 0, absolute, inside the sigmoid;
        default 0.5, TRL's ``simpo_gamma`` default).

    Default policy-loss variant: ``"nll"``, the soft-label loss on the induced logit
    :math:`s`, which with an exact E-step is the gradient of the labels' marginal
    likelihood (EM's own step). It moves every pair towards the response its labels
    favour, at every :math:`s` (``docs/math.md`` section 5). The ``"mixture"``,
    :math:`w L(A \succ B) + (1 - w) L(B \succ A)`, keeps SimPO's margin but is
    stationary at :math:`w = \sigma(D + \gamma) / (\sigma(D + \gamma) + \sigma(\gamma - D))`
    rather than at :math:`\sigma(s)`: where the policy prefers the other response
    and a label's log-odds :math:`\mathrm{logit}\,\eta < 2\gamma`, the posterior lies
    beyond that point and the step trains the policy towards its own belief, away
    from the label (with LoRA at flip rate 0.4, ten seeds: 0.276 below SimPO;
    ``"nll"``: level). Until the noise test rejects, RE-SimPO trains on SimPO's own
    loss either way. At :math:`\gamma = 0` the two coincide.
    """

    name = "simpo"
    needs_reference = False
    default_variant = "nll"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5) -> None:
        self.beta = check_positive("beta", beta)
        if isinstance(gamma, bool) or not isinstance(gamma, int | float):
            raise ValueError(f"gamma must be a real number, got {gamma!r}")
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be finite and >= 0, got {gamma!r}")
        self.gamma = float(gamma)

    @property
    def likelihood_style(self) -> bool:
        return self.gamma == 0.0

    @property
    def default_out_of_sample(self) -> bool:
        r"""True: SimPO is the Bradley-Terry log-likelihood of the margin :math:`D`
        shifted by :math:`\gamma`, so at preference probability :math:`p` its minimiser
        puts the induced logit at :math:`\mathrm{logit}(p)` up to a factor (1.3 to 1.6
        at :math:`\gamma = 0.5`, 1 at :math:`\gamma = 0`), which the first-visit fit's
        Platt scale absorbs. At 8,192 pairs with one annotator it puts ``eta`` within
        0.01 of the realised share after one pass and four, where the online update is
        0.02 to 0.06 off (``docs/experiments/estep-defaults.md``)."""
        return True

    @property
    def default_cross_fit(self) -> bool:
        r"""False: with its exact step reading the policy (first-visit ``eta``, no
        learned scale) RE-SimPO is level with SimPO, and cross-fitted it was not better
        where the issue measures it: in the full fine-tune at 8,192 pairs after four
        epochs at flip rate 0.4 it fell below SimPO, -0.004 ± 0.002 over five seeds
        (reading the policy +0.002 ± 0.003), and with LoRA its ``eta`` sat on the
        one-annotator ridge at two seeds of ten (0.049 ± 0.060 off, against 0.026 ±
        0.020), though its accuracy rose (+0.044 ± 0.035 over SimPO against +0.005 ±
        0.029; ``[em] cross_fit = true`` gives it). ``docs/experiments/noise-sweep.md``,
        "Cross-fitted scores"."""
        return False

    def _margin(self, stats: PairLogps) -> Tensor:
        r""":math:`D = \beta` times the difference of mean token log-probabilities."""
        return self.beta * (stats.policy_mean_a - stats.policy_mean_b)

    def loss(self, stats: PairLogps) -> Tensor:
        return -F.logsigmoid(self._margin(stats) - self.gamma)

    def logits(self, stats: PairLogps) -> Tensor:
        d = self._margin(stats)
        return F.logsigmoid(d - self.gamma) - F.logsigmoid(-d - self.gamma)

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        r"""TRL's rewards: :math:`\beta \log\pi_\theta(y)/|y|` for A and B (detached)."""
        return (
            (self.beta * stats.policy_mean_a).detach(),
            (self.beta * stats.policy_mean_b).detach(),
        )

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "gamma": self.gamma}
