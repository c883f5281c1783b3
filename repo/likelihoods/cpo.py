r"""CPO (Xu et al., 2024) and its induced likelihood.

Reference-free, on summed log-probabilities :math:`\ell_y = \log\pi_\theta(y \mid x)`,
with :math:`\Delta = \ell_A - \ell_B`: a DPO-like preference term without
reference plus a behaviour-cloning negative log-likelihood (NLL, "SFT") term on
the preferred response, weighted by :math:`\lambda` (``nll_weight``; TRL's
``cpo_alpha``, 1 in the CPO paper):

.. math::

    L_{\mathrm{CPO}}(A \succ B) = -\log\sigma(\beta\Delta) - \lambda\,\ell_A .

Induced logit: the preference terms give :math:`\beta\Delta` (they are
likelihood-style) and the one-sided NLL term enters as a difference,

.. math::

    s = L(B \succ A) - L(A \succ B) = (\beta + \lambda)\,\Delta
    \quad (= (\beta + 1)(\ell_A - \ell_B) \text{ for } \lambda = 1).

With ``nll_length_normalized=True`` the NLL term is the per-token mean
:math:`-\lambda\,\ell_A/|A|` (as TRL computes it) and
:math:`s = \beta\Delta + \lambda(\ell_A/|A| - \ell_B/|B|)`; the
:math:`(\beta + 1)\Delta` form then no longer holds.

CPO is likelihood-style only when :math:`\lambda = 0`. The EM derivation's
"nll" policy step is the soft-label logistic loss on :math:`s`: the literal
RE-CPO has no one-sided SFT term left. With ``keep_sft_term=True`` the "nll"
step adds it back, weighted by the posterior:

.. math::

    -\big[w\log\sigma(s) + (1 - w)\log\sigma(-s)\big]
    + \lambda\big[w\,(-\ell_A) + (1 - w)\,(-\ell_B)\big].

The "mixture" step needs no option: since the preference term is
likelihood-style,

.. math::

    w L(A \succ B) + (1 - w) L(B \succ A)
    = -\big[w\log\sigma(\beta\Delta) + (1 - w)\log\sigma(-\beta\Delta)\big]
    + \lambda\big[w\,(-\ell_A) + (1 - w)\,(-\ell_B)\big],

i.e. soft-label CPO preference loss plus the w-weighted SFT term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from repo.likelihoods.base import PreferenceLikelihood, check_positive
from repo.likelihoods.stats import PairLogps

__all__ = ["CPOLikelihood"]


class CPOLikelihood(PreferenceLikelihood):
    r"""CPO: :math:`L(A \succ B) = -\log\sigma(\beta\Delta) - \lambda\ell_A`.

    Induced logit :math:`s = (\beta + \lambda)\Delta`, :math:`\Delta = \ell_A - \ell_B`.

    :param beta: preference-term inverse temperature (> 0).
    :param nll_weight: :math:`\lambda >= 0`, weight of CPO's NLL (behaviour-cloning)
        term on the preferred response (TRL's ``cpo_alpha``; default 1 as in CPO).
        Not to be confused with the ``"nll"`` policy-loss variant.
    :param keep_sft_term: in the ``"nll"`` variant, add the SFT term weighted by the
        posterior, :math:`\lambda[w(-\ell_A) + (1-w)(-\ell_B)]` (default ``False``: the
        literal EM step). No effect on ``"mixture"``, which contains it already.
    :param nll_length_normalized: use the mean-token NLL :math:`-\ell_y/|y|` (TRL)
        instead of the summed one (CPO paper, RE-PO paper; default ``False``).

    Default policy-loss variant: ``"nll"``, the literal EM step (the paper's RE-CPO): the
    soft-label logistic loss on :math:`s = (\beta + \lambda)\Delta`, without the SFT
    term. Until the noise test finds evidence of noise (``[em] noise_test``) the policy
    step is CPO's own loss on the labels as given, SFT term included
    (:func:`repo.train.objective.plain_loss`), so on labels without evident noise RE-CPO
    trains exactly as CPO. ``"mixture"`` keeps CPO's shape instead: the SFT term
    weighted by :math:`w`, which clones the response the E-step believes. Measured on
    one annotator's labels (``docs/experiments/noise-sweep.md``, "Where the data identify
    eta"), it is the SFT term that costs accuracy once the posterior is on: at 8,192
    rule pairs and flip rate 0.2, RE-CPO with ``"mixture"`` is 0.147 below CPO, with
    the w-weighted SFT term added to ``"nll"`` (``keep_sft_term``) still below, with
    ``"nll"`` 0.135 above; with ``eta`` held at the truth the mixture is still below, so
    it is the step, not the estimate of ``eta``.

    Default E-step temperature: 50. The induced logit sums log-probs over tokens, so it
    is tens of nats from the first step, set largely by the responses' lengths. The
    learned scale (the default for a loss that is not likelihood-style) then starts at
    :math:`1/50`, the temperature the noise sweep used. That is the best of the E-step
    settings measured in ``docs/experiments/estep-defaults.md``; started at 1 the
    scale does not come down before the first E-steps have pulled :math:`\eta` toward
    1/2. Even so, RE-CPO with the "mixture" step was below CPO there in most settings.
    """

    name = "cpo"
    needs_reference = False
    default_variant = "nll"
    default_temperature = 50.0

    def __init__(
        self,
        beta: float = 0.1,
        nll_weight: float = 1.0,
        keep_sft_term: bool = False,
        nll_length_normalized: bool = False,
    ) -> None:
        self.beta = check_positive("beta", beta)
        if isinstance(nll_weight, bool) or not isinstance(nll_weight, int | float):
            raise ValueError(f"nll_weight must be a real number, got {nll_weight!r}")
        if not math.isfinite(nll_weight) or nll_weight < 0:
            raise ValueError(f"nll_weight must be finite and >= 0, got {nll_weight!r}")
        self.nll_weight = float(nll_weight)
        self.keep_sft_term = bool(keep_sft_term)
        self.nll_length_normalized = bool(nll_length_normalized)

    @property
    def likelihood_style(self) -> bool:
        return self.nll_weight == 0.0

    @property
    def default_held_out(self) -> bool:
        r"""Held-out labels by default with one annotator while the SFT term is on:
        the induced logit carries the summed log-probabilities of the two responses,
        tens of nats on a pair the policy has learned, so the held-out fit reads
        ``eta`` off sure scores, as it does for IPO; trained on every label, the later
        passes' E-steps read scores of labels the policy has fitted, flipped ones
        included, and ``eta`` drifts up (8,192 pairs, four epochs, flip rate 0.2:
        ``eta`` 0.047 and 0.060 off training on every label, 0.012 from held-out labels,
        on seeds 20 to 29 and 30 to 37; ``docs/experiments/held-out-labels.md``). At
        flip rate 0.4 CPO's policy is right on about 60% of pairs, and its held-out
        scores do not identify ``eta`` (profile interval about [0.5, 1] in all 18 runs;
        ``reliability.json`` warns). With ``nll_weight = 0`` the loss is
        likelihood-style and, as for DPO, only :math:`(2\eta - 1) a` is identified."""
        return not self.likelihood_style

    def cross_fit_scorer(self, passes: int = 1) -> str:
        r"""DPO while the SFT term is on. Trained on noisy labels, the SFT term clones
        the flipped labels' responses as well: CPO's own policy is right on about 60% of
        pairs at flip rate 0.4 after four epochs over 8,192 pairs (DPO's on 94%), and
        scorers trained by CPO on half the items leave ``eta`` on the one-annotator
        ridge (0.897 and 0.525 against a realised 0.60 at two seeds; 0.082 off at 0.2).
        Without its SFT term (``nll_weight = 0``) the scorers' ``eta`` was 0.027 off at
        one of those seeds and RE-CPO right on 0.81 of held-out pairs. DPO's scorers put
        ``eta`` within 0.004 ± 0.002 over ten seeds, and RE-CPO 0.347 ± 0.016 above CPO
        (``docs/math.md`` section 13). Its own scores rank the pairs no better in one
        pass, so a single pass is cross-fitted by DPO's scorers too
        (:func:`~repo.train.build.auto_cross_fit`). With ``nll_weight = 0`` CPO is
        likelihood-style and scores by itself."""
        return self.name if self.likelihood_style else "dpo"

    def _sft_logps(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        """The log-probabilities the NLL term reads (summed, or per-token means)."""
        if self.nll_length_normalized:
            return stats.policy_mean_a, stats.policy_mean_b
        return stats.policy_a, stats.policy_b

    def loss(self, stats: PairLogps) -> Tensor:
        sft_a, _ = self._sft_logps(stats)
        return (
            -F.logsigmoid(self.beta * (stats.policy_a - stats.policy_b)) - self.nll_weight * sft_a
        )

    def logits(self, stats: PairLogps) -> Tensor:
        sft_a, sft_b = self._sft_logps(stats)
        return self.beta * (stats.policy_a - stats.policy_b) + self.nll_weight * (sft_a - sft_b)

    def auxiliary_loss(self, stats: PairLogps, w: Tensor) -> Tensor | None:
        r"""With ``keep_sft_term``: :math:`\lambda[w(-\ell_A) + (1 - w)(-\ell_B)]`; else ``None``.

        The SFT term weighted by the posterior (see the module docstring).
        """
        if not (self.keep_sft_term and self.nll_weight > 0):
            return None
        w_t = torch.as_tensor(w, dtype=stats.policy_a.dtype, device=stats.policy_a.device).detach()
        sft_a, sft_b = self._sft_logps(stats)
        return -self.nll_weight * (w_t * sft_a + (1.0 - w_t) * sft_b)

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        r"""TRL's rewards: :math:`\beta\,\ell_A`, :math:`\beta\,\ell_B` (summed; detached)."""
        return (self.beta * stats.policy_a).detach(), (self.beta * stats.policy_b).detach()

    def hparams(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "nll_weight": self.nll_weight,
            "keep_sft_term": self.keep_sft_term,
            "nll_length_normalized": self.nll_length_normalized,
        }
