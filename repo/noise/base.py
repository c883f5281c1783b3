"""The base class of annotator noise models.

A noise model is a Pyro program for the observed labels ``o`` given a scorer's
preference logits ``s`` (one per truth unit)::

    z_i  ~ Bernoulli(logits = s_i)                  # true preference, enumerated
    o_ij ~ p(o_ij | z_i, annotator parameters)      # the noise process

Subclasses write :meth:`NoiseModel.model` with the truth units in a plate named
``"items"``. The labels of a unit are independent given its truth; they are
observed either as one vector, :func:`label_likelihood` (an event of ``num_slots``
labels, padding masked; items at dim -1), or, when each label carries a latent of
its own (the spammer's honesty), in a plate ``"slots"`` at dim -1 inside ``"items"``
at dim -2 under ``poutine.mask(mask=data.slot_mask)``. The two read the same on
paper and give the same posterior; the first lets Pyro's contraction work on
``units`` rather than ``units x slots`` terms (about twice as fast). When a
label's law depends on its annotator and the truth alone (the flip models), the
vector is :class:`~repo.noise.channel.AnnotatorLabels`: a ``(truth, annotator)``
table of logits, each label's log-probability one look-up in it. That program is
all EM, MAP, NUTS and SVI need.

Annotator parameters are :class:`~pyro.nn.PyroParam` (point estimates: EM, MAP
under a prior) and become :class:`~pyro.nn.PyroSample` (full Bayes) through
:meth:`NoiseModel.bayesian`, on the same class.

Two optional hooks make EM faster where the model is conjugate:
:meth:`sufficient_statistics` (additive over labels, so mini-batches and ranks can
sum them) and :meth:`m_step` (the closed-form maximiser given the statistics).
Without them EM takes gradient steps on the enumerated marginal likelihood.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import Tensor

from repo.inference.enumeration import EnumPosterior, marginal_log_likelihood
from repo.noise.layout import LabelData

EPS = 1e-6
"""Probability parameters are kept inside ``[EPS, 1 - EPS]``."""


def beta_map(successes: Tensor, trials: Tensor, prior: dist.Beta | None) -> Tensor:
    """Mode of a Bernoulli probability: ``(S + a - 1) / (N + a + b - 2)``.

    With no prior this is the maximum-likelihood ``S / N``. The result is clamped to
    ``[EPS, 1 - EPS]``; annotators with no (soft) trials get 0.5 or the prior mode.
    """
    a = b = torch.ones((), dtype=successes.dtype)
    if prior is not None:
        a = prior.concentration1.to(successes.dtype)
        b = prior.concentration0.to(successes.dtype)
    num = successes + a - 1
    den = trials + a + b - 2
    value = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, 0.5))
    return value.clamp(EPS, 1 - EPS)


def label_likelihood(label_logits: Tensor, data: LabelData) -> dist.Distribution:
    """The labels of each truth unit as one observation: independent
    ``Bernoulli(logits)`` per label slot, padding masked out; batch ``(..., I)``,
    event ``(S,)``."""
    labels = dist.Bernoulli(logits=label_logits)
    if data.slot_mask is not True:
        labels = labels.mask(data.mask)
    return labels.to_event(1)


def agree_logits(z: Tensor, logit_correct: Tensor) -> Tensor:
    """``logit p(o = 1 | z)`` for a channel that reports ``z`` with probability
    ``sigmoid(logit_correct)``: ``(2 z - 1) logit_correct``."""
    return (2 * z - 1) * logit_correct


class NoiseModel(PyroModule):
    """A Pyro model of labels given preference logits; see the module docstring.

    :param num_annotators: ``K``.
    :param prior: an optional ``Beta(a, b)`` prior on the model's reliability
        parameters (:attr:`reliability_names`): MAP under EM, the prior under
        full Bayes.
    """

    #: per-annotator probabilities that ``prior`` applies to.
    reliability_names: tuple[str, ...] = ()
    #: whether the model reads the A/B position (bias towards A or B).
    reads_position: bool = False
    #: whether the model has a latent true preference ``z`` (all but Boltzmann).
    has_truth: bool = True
    #: the name the CLI and result files use.
    name: str = ""

    def __init__(self, num_annotators: int, prior: dist.Beta | None = None) -> None:
        super().__init__()
        if num_annotators < 1:
            raise ValueError(f"num_annotators must be >= 1, got {num_annotators}")
        self.num_annotators = num_annotators
        self.prior = prior

    # -- declaring parameters ------------------------------------------------
    def _probability(self, name: str, init: float | Tensor) -> None:
        """Declare a per-annotator probability ``(K,)`` kept in ``[EPS, 1 - EPS]``."""
        value = torch.as_tensor(init, dtype=torch.float64).expand(self.num_annotators).clone()
        setattr(self, name, PyroParam(value, constraint=constraints.interval(EPS, 1 - EPS)))

    def priors(self) -> dict[str, dist.Distribution]:
        """Priors of the point parameters: used for MAP and by :meth:`bayesian`."""
        if self.prior is None:
            return {}
        k = self.num_annotators
        return {n: self.prior.expand([k]).to_event(1) for n in self.reliability_names}

    def log_prior(self) -> Tensor:
        """``sum log p(param)`` of the point parameters under :meth:`priors`."""
        total = torch.zeros((), dtype=torch.float64)
        for name, prior in self.priors().items():
            total = total + prior.log_prob(getattr(self, name)).sum()
        return total

    def bayesian(self) -> NoiseModel:
        """Turn every parameter with a prior into a random variable (PyroSample)."""
        priors = self.priors()
        if not priors:
            raise ValueError(
                f"{type(self).__name__} has no prior: give one (e.g. prior=Beta(2, 1)) "
                "before asking for full Bayes"
            )
        for name, prior in priors.items():
            delattr(self, name)
            setattr(self, name, PyroSample(prior))
        return self

    # -- the probabilistic program ------------------------------------------
    def model(self, logits: Tensor, data: LabelData) -> None:
        """The Pyro program ``p(z, o | s)``; see the module docstring."""
        raise NotImplementedError

    def forward(self, logits: Tensor, data: LabelData) -> None:
        return self.model(logits, data)

    def e_step_model(self) -> Callable[[Tensor, LabelData], None]:
        """The program whose enumeration gives the E-step (the model itself, unless a
        continuous latent must be held at its current value)."""
        return self.model

    # -- EM hooks -------------------------------------------------------------
    def sufficient_statistics(
        self, data: LabelData, marginals: dict[str, Tensor], logits: Tensor
    ) -> dict[str, Tensor] | None:
        """Statistics of the posterior for the closed-form M-step, or None.

        Per-annotator statistics are sums over labels, so mini-batches and ranks
        can add them up; ``n`` (labels per annotator) is always among them.
        """
        return None

    def m_step(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Closed-form maximiser (MAP under :attr:`prior`) from summed statistics."""
        raise NotImplementedError

    def marginal_log_likelihood(self, logits: Tensor, data: LabelData) -> Tensor:
        """``log p(o | s)`` with every latent summed out, differentiable in the logits
        and the point parameters: what gradient M-steps (and the policy step) climb."""
        return marginal_log_likelihood(self.e_step_model(), logits, data)

    def objective(self, logits: Tensor, data: LabelData, posterior: EnumPosterior) -> Tensor:
        """What EM increases: the marginal log-likelihood plus the log prior."""
        return posterior.log_likelihood.sum() + self.log_prior()

    # -- reading the fit ----------------------------------------------------
    def truth_posterior(self, logits: Tensor, marginals: dict[str, Tensor]) -> Tensor:
        """``p(z_i = 1 | o)`` per truth unit ``(I,)``."""
        if "z" in marginals:
            return marginals["z"][..., 1].reshape(-1)
        return torch.sigmoid(logits)

    def label_posterior(self, data: LabelData, marginals: dict[str, Tensor]) -> Tensor:
        """``p(z_i = 1 | o)`` broadcast to the label slots ``(I, S)``."""
        return marginals["z"][..., 1].reshape(-1, 1).expand_as(data.label)

    def label_correct(
        self, logits: Tensor, data: LabelData, marginals: dict[str, Tensor]
    ) -> Tensor:
        """``w_ij = p(z_i = o_ij | o)``, the posterior that each label is correct."""
        q1 = self.truth_posterior(logits, marginals).unsqueeze(-1)
        return data.label * q1 + (1 - data.label) * (1 - q1)

    def implied_eta(self, logits: Tensor, data: LabelData) -> Tensor:
        """``p(o_ij = z_i)`` before seeing the label ``(I, S)``: the model's reliability."""
        raise NotImplementedError

    def annotator_parameters(self) -> dict[str, Tensor]:
        """The model's own per-annotator parameters by name, each ``(K,)``."""
        return {}

    def population_parameters(self) -> dict[str, Tensor]:
        """Parameters shared by all annotators (hierarchical models)."""
        return {}
