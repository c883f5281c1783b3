r"""The preference likelihood induced by a pairwise preference loss.

A preference loss :math:`L(A \succ B)` scores the statement "A is preferred to
B" (low is good). The Boltzmann construction turns any such loss into a
probability model of the *true* preference by normalising
:math:`\exp(-L)` over the two orders of the pair:

.. math::

    p(A \succ^* B \mid x, \theta)
        = \frac{e^{-L(A \succ B)}}{e^{-L(A \succ B)} + e^{-L(B \succ A)}}
        = \sigma(s), \qquad s = L(B \succ A) - L(A \succ B).

:math:`s` is the induced preference logit that the noise models of
:mod:`repo.noise` consume (``z ~ Bernoulli(logits=s)``). A loss is
*likelihood-style* when :math:`e^{-L(A \succ B)} + e^{-L(B \succ A)} = 1`
identically, i.e. :math:`L(A \succ B) = -\log\sigma(s)` is already a negative
log-likelihood (DPO: Bradley-Terry on the implicit reward).

Given the E-step posterior :math:`w = p(z = 1 \mid \text{labels})` that
"A preferred" is the true preference, the policy M-step minimises one of

.. math::

    \text{nll:}\quad & -\big[w \log\sigma(s) + (1 - w)\log\sigma(-s)\big]
        \quad\text{(the EM derivation's soft-label cross-entropy)}, \\
    \text{mixture:}\quad & w\,L(A \succ B) + (1 - w)\,L(B \succ A)
        \quad\text{(keeps the loss's own shape)}.

For a likelihood-style loss the two are the same function. Otherwise they
differ by :math:`\log\big(e^{-L(A \succ B)} + e^{-L(B \succ A)}\big)` (see
:meth:`PreferenceLikelihood.log_normaliser`), which depends on
:math:`\theta`, so their gradients differ too. ``w`` is a fixed soft target:
no gradient flows through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from repo.likelihoods.stats import PairLogps

__all__ = ["PreferenceLikelihood", "InducedLikelihood", "Variant", "VARIANTS"]

Variant = Literal["nll", "mixture", "weighted"]
VARIANTS: tuple[str, ...] = ("nll", "mixture", "weighted")
"""The policy steps: ``"nll"`` and ``"mixture"`` (:meth:`PreferenceLikelihood.policy_loss`,
from the truth's posterior ``q``) and ``"weighted"`` (each label's own loss weighted by
the posterior that it is correct; it needs the labels, so the trainer's objective
computes it: :func:`repo.train.objective.weighted_loss`)."""


def check_positive(name: str, value: float) -> float:
    """Return ``float(value)`` if it is a finite real number > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_in_range(
    name: str, value: float, low: float, high: float, *, high_inclusive: bool
) -> float:
    """Return ``float(value)`` if ``low <= value <= high`` (or ``< high``), else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    ok = (
        math.isfinite(value)
        and low <= value
        and (value <= high if high_inclusive else value < high)
    )
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


class PreferenceLikelihood:
    r"""Base class: a pairwise preference loss and the likelihood it induces.

    Subclasses implement :meth:`loss` (the family's loss of "A preferred") and
    :meth:`rewards`; they may override :meth:`logits` with a closed form (the
    generic :math:`s = L(B \succ A) - L(A \succ B)` costs two loss
    evaluations). Instances hold hyper-parameters only, no trainable
    parameters.

    Class attributes:

    - ``name``: the registry name (:func:`repo.likelihoods.get_likelihood`);
    - ``needs_reference``: whether :class:`PairLogps` must carry reference log-probs;
    - ``default_variant``: the policy-loss variant used when none is given;
    - ``default_temperature``: the E-step temperature ``T`` used when ``[em]
      temperature`` is left at 0 (the E-step reads :math:`s / T`, or starts its
      learned scale at :math:`1/T`).

    :attr:`default_calibrate` says whether the E-step learns the scale of the
    induced logits by default (``[em] calibrate = "auto"``), and
    :attr:`default_out_of_sample` whether one annotator's parameters learn from first
    visits only (``[em] out_of_sample = "auto"``), and :attr:`default_held_out` whether
    they learn from held-out labels (``[em] held_out = "auto"``).
    """

    name: str = "preference"
    needs_reference: bool = False
    default_variant: str = "mixture"
    default_temperature: float = 1.0
    several_pass_folds: int = 2
    r"""The folds ``[em] cross_fit_folds = "auto"`` splits the items in over several
    passes where the cross-fitted scorers train by this loss
    (:func:`~repo.train.build.auto_cross_fit_folds`; one pass takes four whatever the
    loss). With :math:`K` folds each scorer trains on a share :math:`1 - 1/K` of the
    labels, for that share of the run's steps, at :math:`K - 1` runs' compute in all: a
    scorer nearer the policy, but one that also learns more of the flipped labels where
    the loss keeps widening the margins it has fitted. Two by default (DPO's scorers,
    LoRA, four passes, 8 marker words: ``eta`` 0.182 off with four folds, 0.031 with
    two; ``docs/math.md`` section 13)."""

    # ------------------------------------------------------------------ the family
    def loss(self, stats: PairLogps) -> Tensor:
        r"""The family's loss :math:`L(A \succ B)` per pair, shape ``(B,)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement loss()")

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        """Implicit rewards of A and B as TRL reports them (detached, for metrics)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement rewards()")

    @property
    def likelihood_style(self) -> bool:
        r"""True when :math:`e^{-L(A \succ B)} + e^{-L(B \succ A)} = 1` identically."""
        return False

    @property
    def default_calibrate(self) -> bool:
        r"""Whether the E-step learns the scale :math:`a` of the induced logits by
        default: when the loss is not likelihood-style. Then :math:`\sigma(s)` is the
        normalised Boltzmann weight of a surrogate, whose scale is set by the loss's
        hyper-parameters rather than by how often the policy is right (IPO's
        :math:`s = 2h/\beta` is 20 times its margin at :math:`\beta = 0.1`), and an
        E-step that reads it at face value takes early, confidently wrong scores for
        evidence of unreliable labels (``docs/experiments/estep-defaults.md``)."""
        return not self.likelihood_style

    @property
    def default_out_of_sample(self) -> bool:
        r"""Whether one annotator's parameters learn from first visits only by default
        (``[em] out_of_sample = "auto"``): when the family's induced logit is the
        log-odds of the preference up to a scale. The first-visit fit reads
        :math:`\sigma(a c)` as the probability of the truth (a Platt model), which is
        right when the loss's minimiser at preference probability :math:`p` puts
        :math:`s` at :math:`\mathrm{logit}(p)` up to a factor: exactly for a
        likelihood-style loss (DPO's Bradley-Terry log-odds, the default here), nearly
        for SimPO (which says so). IPO's minimiser is linear in :math:`p`, bounded where
        the log-odds are not, and CPO's logit carries its SFT term's log-probabilities:
        at 8,192 pairs and four epochs the first-visit fit put RE-CPO's ``eta`` 0.16 off
        at flip rate 0.2, and RE-IPO's 0.042 off at 0.4, where one run of ten fell to
        0.70 held-out accuracy (``docs/experiments/estep-defaults.md``)."""
        return self.likelihood_style

    @property
    def default_held_out(self) -> bool:
        r"""Whether one annotator's parameters learn from held-out labels by default
        (``[em] held_out = "auto"``; ``docs/math.md`` section 12): when a policy trained
        by the loss scores pairs it has learned far from 0 whatever the label noise, so
        that the held-out scores' Platt fit reads ``eta`` off the pairs it is sure of.
        Not by default: a likelihood-style loss fits :math:`\sigma(s)` to the labels'
        own odds (:math:`s \to \mathrm{logit}(\eta)` on a learned rule), and there
        only :math:`(2\eta - 1) a` is identified (RE-DPO at 8,192 pairs, flip rate 0.4:
        ``eta`` 0.079 off from held-out labels, 0.018 from first visits)."""
        return False

    @property
    def default_cross_fit(self) -> bool:
        r"""Whether one annotator's E-step reads cross-fitted scores by default (``[em]
        cross_fit = "auto"``, over several passes at :data:`~repo.train.build.MIN_CROSS_FIT`
        items or more, or one where :meth:`cross_fit_scorer` is another loss or the
        policy step is the mixture;
        ``docs/math.md`` section 13): when scorers trained by the loss
        on half the items learn enough of the task for their scores to identify
        ``eta``. By default yes (DPO and IPO; with LoRA at 8,192 pairs, flip rate 0.4:
        RE-IPO +0.062 ± 0.029 over IPO, ``eta`` within 0.017, where reading the policy
        lost 0.113); SimPO says no."""
        return True

    def cross_fit_scorer(self, passes: int = 1) -> str:
        r"""The loss family the cross-fitted scorers of a run of ``passes`` passes train
        with (``[em] cross_fit``, ``docs/math.md`` section 13); ``[em]
        cross_fit_scorer`` overrides it. A scorer only ranks the pairs of its fold,
        which it never saw, read at a Platt scale fitted to its scores, so it needs the
        task learned from noisy labels, not the run's own loss. By default the family
        itself."""
        return self.name

    # ------------------------------------------------------------------ induced model
    def logits(self, stats: PairLogps) -> Tensor:
        r"""Induced preference logit :math:`s = L(B \succ A) - L(A \succ B)`, shape ``(B,)``.

        :math:`\sigma(s) = p(A \succ^* B)`. Generic: two loss evaluations.
        """
        self.check_stats(stats)
        return self.loss(stats.swap()) - self.loss(stats)

    def log_normaliser(self, stats: PairLogps) -> Tensor:
        r""":math:`\log(e^{-L(A \succ B)} + e^{-L(B \succ A)})`; zero iff likelihood-style."""
        self.check_stats(stats)
        return torch.logaddexp(-self.loss(stats), -self.loss(stats.swap()))

    def policy_loss(
        self, stats: PairLogps, w: Tensor | float, variant: str | None = None
    ) -> Tensor:
        r"""Per-pair policy M-step loss given the posterior ``w`` that "A preferred" is true.

        :param stats: the pair statistics.
        :param w: posterior probability in ``[0, 1]`` (tensor broadcastable to ``(B,)``,
            or a float); treated as a constant (detached).
        :param variant: ``"nll"`` (induced negative log-likelihood,
            :math:`-[w\log\sigma(s) + (1-w)\log\sigma(-s)]`) or ``"mixture"``
            (:math:`w L(A \succ B) + (1-w) L(B \succ A)`); ``None`` uses
            ``self.default_variant``.
        :return: tensor of shape ``(B,)``; reduce (mean) in the caller.
        """
        variant = self.resolve_variant(variant)
        if variant == "weighted":
            raise ValueError(
                "the 'weighted' step weights each label's own loss, so it needs the labels: "
                "repo.train.objective.weighted_loss"
            )
        self.check_stats(stats)
        ref = stats.policy_a
        w_t = torch.as_tensor(w, dtype=ref.dtype, device=ref.device).detach()
        if variant == "nll":
            s = self.logits(stats)
            out = -(w_t * F.logsigmoid(s) + (1.0 - w_t) * F.logsigmoid(-s))
            auxiliary = self.auxiliary_loss(stats, w_t)
            return out if auxiliary is None else out + auxiliary
        return w_t * self.loss(stats) + (1.0 - w_t) * self.loss(stats.swap())

    def auxiliary_loss(self, stats: PairLogps, w: Tensor) -> Tensor | None:
        r"""Per-pair terms of the ``"nll"`` policy step outside the induced likelihood.

        The ``"nll"`` step is the induced negative log-likelihood plus this term;
        ``None`` (the default) when there is none. CPO returns its w-weighted SFT
        term here when ``keep_sft_term`` is set. A trainer that takes the induced
        part as the gradient of the noise model's marginal likelihood adds this
        term on its own.
        """
        return None

    # ------------------------------------------------------------------ helpers
    def resolve_variant(self, variant: str | None) -> str:
        """``variant`` checked against :data:`VARIANTS`, or the default when ``None``."""
        if variant is None:
            return self.default_variant
        if variant not in VARIANTS:
            raise ValueError(f"unknown policy-loss variant {variant!r}; expected one of {VARIANTS}")
        return variant

    def check_stats(self, stats: PairLogps) -> None:
        """Raise ``ValueError`` when the family needs reference log-probs that are missing."""
        if self.needs_reference and not stats.has_reference:
            raise ValueError(
                f"{type(self).__name__} needs reference-model log-probabilities "
                "(PairLogps.reference_a / reference_b), got None"
            )

    def hparams(self) -> dict[str, Any]:
        """Hyper-parameters, for configs and run records."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class InducedLikelihood(PreferenceLikelihood):
    r"""The likelihood induced by a user-supplied pairwise loss.

    ``fn(stats)`` returns :math:`L(A \succ B)` per pair (shape ``(B,)``); the
    induced logit is the generic :math:`L(B \succ A) - L(A \succ B)`, obtained by
    calling ``fn`` on :meth:`PairLogps.swap`. Nothing else is needed for a new
    loss to be used with the noise models and EM.

    :param fn: the loss of "A preferred", a function of :class:`PairLogps`.
    :param needs_reference: whether ``fn`` reads the reference log-probs.
    :param likelihood_style: declare that :math:`e^{-L(A \succ B)} + e^{-L(B \succ A)} = 1`
        (check it numerically with :meth:`log_normaliser`).
    :param default_variant: ``"nll"`` or ``"mixture"``; ``None`` picks ``"nll"`` for a
        likelihood-style loss (the two coincide) and ``"mixture"`` otherwise (keeps
        the loss's shape, which its hyper-parameters were tuned for).
    :param default_temperature: the E-step temperature ``[em] temperature = 0`` means
        (the learned scale starts at its inverse).
    :param default_out_of_sample: whether one annotator's reliability learns from
        first visits by default (:attr:`PreferenceLikelihood.default_out_of_sample`);
        ``None``: when the loss is likelihood-style.
    :param default_held_out: whether one annotator's reliability learns from held-out
        labels by default (:attr:`PreferenceLikelihood.default_held_out`).
    :param rewards_fn: ``stats -> (reward_A, reward_B)`` for metrics; by default the
        implicit log-ratios :math:`r = \log\pi_\theta - \log\pi_{\mathrm{ref}}` when
        reference log-probs are present, else the summed policy log-probs.
    :param name: a name for records.
    :param cross_fit_scorer: the loss family cross-fitted scorers would train with
        (:meth:`PreferenceLikelihood.cross_fit_scorer`, in any number of passes);
        ``""``: the loss itself.
    """

    def __init__(
        self,
        fn: Callable[[PairLogps], Tensor],
        *,
        needs_reference: bool = False,
        likelihood_style: bool = False,
        default_variant: str | None = None,
        default_temperature: float = 1.0,
        default_out_of_sample: bool | None = None,
        default_held_out: bool = False,
        rewards_fn: Callable[[PairLogps], tuple[Tensor, Tensor]] | None = None,
        name: str = "induced",
        cross_fit_scorer: str = "",
    ) -> None:
        if not callable(fn):
            raise ValueError(f"InducedLikelihood: fn must be callable, got {fn!r}")
        self.fn = fn
        self.needs_reference = bool(needs_reference)
        self._likelihood_style = bool(likelihood_style)
        if default_variant is None:
            default_variant = "nll" if likelihood_style else "mixture"
        if default_variant not in VARIANTS:
            raise ValueError(
                f"unknown policy-loss variant {default_variant!r}; expected one of {VARIANTS}"
            )
        self.default_variant = default_variant
        self.default_temperature = check_positive("default_temperature", default_temperature)
        self._default_out_of_sample = default_out_of_sample
        self._default_held_out = bool(default_held_out)
        self.rewards_fn = rewards_fn
        self.name = name
        self._cross_fit_scorer = cross_fit_scorer

    @property
    def likelihood_style(self) -> bool:
        return self._likelihood_style

    def cross_fit_scorer(self, passes: int = 1) -> str:
        return self._cross_fit_scorer or self.name

    @property
    def default_out_of_sample(self) -> bool:
        if self._default_out_of_sample is None:
            return self.likelihood_style
        return self._default_out_of_sample

    @property
    def default_held_out(self) -> bool:
        return self._default_held_out

    def loss(self, stats: PairLogps) -> Tensor:
        self.check_stats(stats)
        return self.fn(stats)

    def rewards(self, stats: PairLogps) -> tuple[Tensor, Tensor]:
        if self.rewards_fn is not None:
            ra, rb = self.rewards_fn(stats)
        elif stats.has_reference:
            ra, rb = stats.log_ratio_a, stats.log_ratio_b
        else:
            ra, rb = stats.policy_a, stats.policy_b
        return ra.detach(), rb.detach()

    def hparams(self) -> dict[str, Any]:
        return {"fn": getattr(self.fn, "__name__", repr(self.fn)), "name": self.name}
