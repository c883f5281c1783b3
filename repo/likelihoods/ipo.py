r"""IPO (Azar et al., 2024) and its induced likelihood.

With :math:`h = r(A) - r(B)`,
:math:`r(y) = \log\pi_\theta(y \mid x) - \log\pi_{\mathrm{ref}}(y \mid x)`
(summed over response tokens, as in the RE-PO paper; TRL's ``loss_type="ipo"``
averages over tokens instead, see ``length_normalized``):

.. math::

    L_{\mathrm{IPO}}(A \succ B) = \Big(h - \frac{1}{2\beta}\Big)^2 .

Induced logit (the squares' :math:`h^2` and constant terms cancel):

.. math::

    s = L(B \succ A) - L(A \succ B)
      = \Big(h + \frac{1}{2\beta}\Big)^2 - \Big(h - \frac{1}{2\beta}\Big)^2
      = \frac{2h}{\beta},

so the induced model is Bradley-Terry with :math:`\beta' = 2/\beta` and the
"nll" RE-IPO step is soft-label DPO with that :math:`\beta'`: IPO's squared
shape is gone. IPO is not likelihood-style
(:math:`e^{-L(A \succ B)} + e^{-L(B \succ A)} \ne 1`).

The "mixture" step keeps the square:

.. math::

    w\Big(h - \frac{1}{2\beta}\Big)^2 + (1 - w)\Big(h + \frac{1}{2\beta}\Big)^2
    = \Big(h - \frac{2w - 1}{2\beta}\Big)^2 + \text{const},

a regression of :math:`h` onto the shrunk target margin :math:`(2w - 1)/(2\beta)`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from repo.likelihoods.base import PreferenceLikelihood, check_positive
from repo.likelihoods.stats import PairLogps

__all__ = ["IPOLikelihood"]


class IPOLikelihood(PreferenceLikelihood):
    r"""IPO: :math:`L(A \succ B) = (h - 1/(2\beta))^2`, induced logit :math:`s = 2h/\beta`.

    :param beta: IPO's regularisation strength (> 0); the target margin is :math:`1/(2\beta)`.
    :param length_normalized: use per-token mean log-ratios
        :math:`r(y) = [\log\pi_\theta(y) - \log\pi_{\mathrm{ref}}(y)] / |y|` as TRL's IPO
        does; default ``False`` (summed, as in the RE-PO paper and the IPO paper).

    Default policy-loss variant: ``"mixture"``. It keeps IPO's bounded squared
    loss, whose minimiser is the finite margin :math:`h^* = (2w - 1)/(2\beta)`:
    a label believed correct pulls towards IPO's own target, a label believed
    flipped towards the reversed target, an uncertain one towards 0. This is
    the regularisation IPO was designed for and its published :math:`\beta`
    was tuned on. The "nll" variant (what the EM derivation gives) is a
    logistic loss on :math:`2h/\beta` whose optimum :math:`h = (\beta/2)\,\mathrm{logit}(w)`
    grows without bound as :math:`w \to 0` or 1 - DPO's over-fitting that IPO
    set out to remove.
    """

    name = "ipo"
    needs_reference = True
    default_variant = "mixture"
    several_pass_folds = 4
    r"""Four folds over several passes as in one: IPO regresses each margin onto the
    finite target :math:`1/(2\beta)`, so a flipped label moves its pair's score by a
    bounded amount however many passes a scorer makes, and a scorer on three quarters
    of the labels is the stronger one. With LoRA, four passes over 8,192 rule pairs at
    flip rate 0.4, four folds against two: RE-IPO +0.076 ± 0.045 above IPO with 8
    marker words (two: -0.005 ± 0.015), and RE-DPO, whose scorers are IPO's there,
    higher at every seed of three tasks (``docs/experiments/one-annotator.md``, "Four
    folds of IPO's scorers over several passes"); fully fine-tuned, four epochs, RE-DPO
    +0.029 ± 0.016 above DPO over ten seeds (two folds: +0.023 ± 0.022) and RE-IPO
    +0.089 ± 0.020 above IPO over ten (two: +0.080 ± 0.023), at a lower held-out log
    loss (``docs/experiments/noise-sweep.md``, "Four folds of IPO's scorers over
    several epochs"). It costs about twice a run's compute: three scorers' runs over
    the data where two folds take one."""

    @property
    def default_held_out(self) -> bool:
        r"""Held-out labels by default with one annotator: the mixture step's target
        margin :math:`(2w - 1)/(2\beta)` puts a learned pair's logit :math:`s = 2h/\beta`
        at tens (100 (2w - 1) at :math:`\beta = 0.1`), so the held-out fit reads ``eta``
        off sure scores (8,192 pairs, four epochs: ``eta`` within 0.009 and 0.011 at
        flip rates 0.4 and 0.2, against 0.041 and 0.049 training on every label;
        ``docs/experiments/held-out-labels.md``). ``"auto"`` holds labels out only when
        that is :data:`repo.train.build.MIN_HELD_OUT` items or more."""
        return True

    def __init__(self, beta: float = 0.1, length_normalized: bool = False) -> None:
        self.beta = check_positive("beta", beta)
        self.length_normalized = bool(length_normalized)

    def _log_ratios(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        self.check_stats(stats)
        ra, rb = stats.log_ratio_a, stats.log_ratio_b
        if self.length_normalized:
            ra, rb = ra / stats.length_a, rb / stats.length_b
        return ra, rb

    def loss(self, stats: PairLogps) -> Tensor:
        ra, rb = self._log_ratios(stats)
        return (ra - rb - 1.0 / (2.0 * self.beta)) ** 2

    def logits(self, stats: PairLogps) -> Tensor:
        ra, rb = self._log_ratios(stats)
        return (2.0 / self.beta) * (ra - rb)

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        r"""TRL's rewards: :math:`\beta\,r(A)`, :math:`\beta\,r(B)` (detached)."""
        ra, rb = self._log_ratios(stats)
        return (self.beta * ra).detach(), (self.beta * rb).detach()

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "length_normalized": self.length_normalized}
