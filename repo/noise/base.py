"""The base class of annotator noise models.

A noise model is a Pyro program for the observed labels ``o`` given a scorer's
preference logits ``s`` (one per truth unit)::

    z_i  ~ Bernoulli(logits = s_i)                  # true preference, enumerated
    o_ij ~ p(o_ij | z_i, parameters)                # the noise process

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

**Conventions the base class carries** (in the manner of Pyro's
``contrib.forecast.ForecastingModel``):

* *Declared parameters.* Every parameter is created by :meth:`NoiseModel.parameter`,
  which declares the plate it lives on (:class:`Parameter`): ``None`` (one value,
  global), :data:`ANNOTATORS` (``(K,)``), :data:`ITEMS` (``(I,)``, indexed by
  ``data.unit``, the truth unit's global key) or any other plate the model names
  in ``plate_sizes``; and whether it is a *reliability* (a measure of the
  annotator's accuracy, listed beside ``eta``; a Beta ``prior`` applies to the
  reliabilities that are probabilities). Random effects of the program that
  inference samples (the hierarchical model's ``logit_eta``) are declared with
  :meth:`NoiseModel.declare`. Inference, summaries and ArviZ read the
  declarations, never the names: ArviZ dims are named after the plates.
* *The reported reliability.* ``eta``, the probability that an annotator's label is
  correct, is always :meth:`NoiseModel.implied_eta` averaged over the annotator's
  labels; ``eta`` is therefore not a free parameter name: a parameter called
  ``eta`` must be declared a reliability, and it is then reported as ``eta``.
* *One constructor contract.* :meth:`NoiseModel.build` makes a model from the sizes
  of the data (:class:`Sizes`: annotators, items, units), a starting reliability
  and an optional Beta prior; the registry, ``fit_noise`` and the trainer use it.
* *Explicit estimates.* Priors (:meth:`NoiseModel.priors`) are declared for full
  Bayes; whether a point estimate uses them is chosen (:meth:`NoiseModel.estimating`:
  ``"ml"`` or ``"map"``; ``fit_em(estimate=...)``), never inferred from their
  existence. Left unchosen, a model constructed with a Beta ``prior`` is estimated
  under it (MAP), any other by maximum likelihood. :meth:`NoiseModel.bayesian`
  refuses a parameter without a prior.

Point parameters are :class:`~pyro.nn.PyroParam` (EM, MAP) and become
:class:`~pyro.nn.PyroSample` (full Bayes) through :meth:`NoiseModel.bayesian`,
on the same class.

Two optional hooks make EM faster where the model is conjugate:
:meth:`sufficient_statistics` (additive over labels, so mini-batches and ranks can
sum them) and :meth:`m_step` (the closed-form maximiser given the statistics).
Without them EM takes gradient steps on the enumerated marginal likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import Tensor

from repo.inference.enumeration import EnumPosterior, marginal_log_likelihood
from repo.inference.profile import EtaProfile
from repo.noise.layout import LabelData

EPS = 1e-6
"""Probability parameters are kept inside ``[EPS, 1 - EPS]``."""

ANNOTATORS = "annotators"
"""The plate of per-annotator parameters (size ``K``)."""

ITEMS = "items"
"""The plate of per-item parameters: one value per truth unit key (``data.unit``)."""

REPORTED = "eta"
"""The name under which every model reports its reliability (:meth:`NoiseModel.implied_eta`)."""

ESTIMATES = ("ml", "map")
"""Point estimates: maximum likelihood, or the posterior mode under :meth:`NoiseModel.priors`."""


@dataclass(frozen=True)
class Parameter:
    """The declaration of one parameter of a noise model.

    :param name: the attribute and Pyro site name.
    :param plate: ``None`` (a single global value), :data:`ANNOTATORS`, :data:`ITEMS`
        or another plate in the model's ``plate_sizes``; the value's shape is
        ``(size,)`` of that plate (``()`` when global).
    :param reliability: whether it measures an annotator's accuracy (a Beta ``prior``
        applies to reliabilities that are probabilities).
    :param point: whether it is a point parameter (PyroParam) under EM; ``False``
        for a random effect of the program that EM integrates out.
    """

    name: str
    plate: str | None
    reliability: bool = False
    point: bool = True


@dataclass(frozen=True)
class Sizes:
    """The sizes a model may need, from the data (:meth:`NoiseModel.build`'s input).

    :param annotators: ``K``.
    :param items: the number of item keys: ``max(data.unit) + 1`` (per-item
        parameters are indexed by ``data.unit``; under shared truth the items, under
        per-label truth the labels).
    :param units: truth units of the layout (``data.num_units``).
    """

    annotators: int
    items: int | None = None
    units: int | None = None

    @classmethod
    def of(cls, data: LabelData) -> Sizes:
        """The sizes of a label layout."""
        items = int(data.unit.max()) + 1 if data.num_units else 0
        return cls(annotators=data.num_annotators, items=items, units=data.num_units)


def dim_name(plate: str) -> str:
    """The ArviZ dim of a plate: ``annotators`` -> ``annotator``, ``items`` -> ``item``,
    any other plate its own name."""
    return {ANNOTATORS: "annotator", ITEMS: "item"}.get(plate, plate)


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


def _is_probability(constraint) -> bool:
    base = getattr(constraint, "base_constraint", constraint)
    lower = getattr(base, "lower_bound", None)
    upper = getattr(base, "upper_bound", None)
    return lower is not None and upper is not None and lower >= 0 and upper <= 1


class NoiseModel(PyroModule):
    """A Pyro model of labels given preference logits; see the module docstring.

    :param num_annotators: ``K``.
    :param prior: an optional ``Beta(a, b)`` prior on the model's reliability
        probabilities: the prior of MAP and of full Bayes; a model given one is
        estimated under it unless told otherwise (:meth:`estimating`).
    :param plate_sizes: sizes of further plates the model's parameters live on
        (e.g. ``{"items": I}``); ``"annotators"`` is ``K``.
    """

    #: whether the model reads the A/B position (bias towards A or B).
    reads_position: bool = False
    #: whether the model has a latent true preference ``z`` (all but Boltzmann).
    has_truth: bool = True
    #: the name the CLI and result files use.
    name: str = ""

    def __init__(
        self,
        num_annotators: int,
        prior: dist.Beta | None = None,
        plate_sizes: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if num_annotators < 1:
            raise ValueError(f"num_annotators must be >= 1, got {num_annotators}")
        self.num_annotators = num_annotators
        self.prior = prior
        self.plate_sizes = {ANNOTATORS: num_annotators, **(plate_sizes or {})}
        self.declarations: dict[str, Parameter] = {}
        self._estimate = "ml" if prior is None else "map"

    # -- the constructor contract ----------------------------------------------
    @classmethod
    def build(
        cls, sizes: Sizes, *, eta_init: float = 0.9, prior: dist.Beta | None = None
    ) -> NoiseModel:
        """The model for data of these ``sizes``, started near reliability ``eta_init``,
        with an optional Beta ``prior`` on its reliability probabilities.

        The one contract by which the registry, ``fit_noise`` and the trainer make a
        model. The default calls ``cls(K)`` or ``cls(K, prior=prior)``; a model that
        needs more sizes or starts its parameters from ``eta_init`` overrides it.
        """
        return cls(sizes.annotators) if prior is None else cls(sizes.annotators, prior=prior)

    # -- declaring parameters ------------------------------------------------
    def parameter(
        self,
        name: str,
        init: float | Tensor,
        plate: str | None = ANNOTATORS,
        constraint: constraints.Constraint = constraints.real,
        *,
        reliability: bool = False,
    ) -> None:
        """Create the point parameter ``name`` (a PyroParam of the plate's shape, float64,
        every entry started at ``init``) and declare it (:class:`Parameter`)."""
        shape = () if plate is None else (self._plate_size(plate, name),)
        value = torch.as_tensor(init, dtype=torch.float64).expand(shape).clone()
        self.declare(name, plate, reliability=reliability)
        setattr(self, name, PyroParam(value, constraint=constraint))

    def declare(
        self, name: str, plate: str | None, *, reliability: bool = False, point: bool = True
    ) -> None:
        """Declare a parameter or a random effect of the program (``point=False``)."""
        if name == REPORTED and not reliability:
            raise ValueError(
                f"{type(self).__name__}: a parameter named {REPORTED!r} must be declared "
                f"reliability=True: {REPORTED!r} is the reported probability that a label "
                "is correct (implied_eta); name the parameter otherwise"
            )
        if plate is not None:
            self._plate_size(plate, name)
        self.declarations[name] = Parameter(name, plate, reliability, point)

    def _probability(self, name: str, init: float | Tensor, reliability: bool = True) -> None:
        """Declare a per-annotator probability ``(K,)`` kept in ``[EPS, 1 - EPS]``."""
        interval = constraints.interval(EPS, 1 - EPS)
        self.parameter(name, init, ANNOTATORS, interval, reliability=reliability)

    def _plate_size(self, plate: str, name: str) -> int:
        if plate not in self.plate_sizes:
            raise ValueError(
                f"{type(self).__name__}: parameter {name!r} is on plate {plate!r}, whose "
                f"size the model does not know (plate_sizes: {sorted(self.plate_sizes)})"
            )
        return self.plate_sizes[plate]

    def declaration(self, name: str) -> Parameter:
        """The declaration of site ``name``; a clear error for an undeclared one."""
        if name not in self.declarations:
            raise ValueError(
                f"{type(self).__name__}: parameter {name!r} is not declared; create it "
                "with self.parameter(name, init, plate, constraint) (or self.declare for a "
                "random effect of the program)"
            )
        return self.declarations[name]

    def point_parameters(self) -> list[str]:
        """The declared point parameters (PyroParams), checked against the module."""
        for name in self._pyro_params:
            self.declaration(name)
        return [n for n, p in self.declarations.items() if p.point and n in self._pyro_params]

    def plate_of(self, name: str) -> str | None:
        """The plate of site ``name`` (``None``: global)."""
        return self.declaration(name).plate

    @property
    def reliability_names(self) -> tuple[str, ...]:
        """The declared reliability probabilities (those a Beta ``prior`` applies to)."""
        return tuple(
            name
            for name, p in self.declarations.items()
            if p.reliability
            and name in self._pyro_params
            and _is_probability(self._pyro_params[name][0])
        )

    def priors(self) -> dict[str, dist.Distribution]:
        """Priors of the point parameters: used by MAP and by :meth:`bayesian`. The
        default: ``prior`` on every reliability probability."""
        if self.prior is None:
            return {}
        out = {}
        for name in self.reliability_names:
            shape = tuple(getattr(self, name).shape)
            out[name] = self.prior.expand(shape).to_event(len(shape))
        return out

    @contextmanager
    def estimating(self, estimate: str) -> Iterator[None]:
        """Within this block the point estimate is ``estimate``: ``"ml"`` (the Beta
        ``prior`` hidden from closed-form M-steps and :meth:`log_prior` zero) or
        ``"map"`` (both as declared)."""
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        saved = self._estimate, self.prior
        self._estimate = estimate
        if estimate == "ml":
            self.prior = None
        try:
            yield
        finally:
            self._estimate, self.prior = saved

    def log_prior(self) -> Tensor:
        """``sum log p(param)`` of the point parameters under :meth:`priors` (zero for a
        maximum-likelihood estimate, :meth:`estimating`)."""
        total = torch.zeros((), dtype=torch.float64)
        if self._estimate == "ml":
            return total
        for name, prior in self.priors().items():
            total = total + prior.log_prob(getattr(self, name)).sum()
        return total

    def bayesian(self, missing_prior: str = "error") -> NoiseModel:
        """Turn every point parameter into a random variable (PyroSample) under its
        prior. A parameter without one is an error (NUTS and SVI would otherwise hold
        it at its point value, or fail under jit); ``missing_prior="flat"`` gives it
        an improper flat density instead, for a model that is only conditioned on
        given draws (the Laplace approximation's), never sampled."""
        priors = self.priors()
        names = self.point_parameters()
        missing = [n for n in names if n not in priors]
        if missing and missing_prior == "flat":
            for name in missing:
                constraint, _ = self._pyro_params[name]
                shape = tuple(getattr(self, name).shape)
                priors[name] = dist.ImproperUniform(constraint, (), shape)
        elif missing:
            raise ValueError(
                f"{type(self).__name__}: full Bayes needs a prior on every parameter; "
                f"none for {', '.join(missing)} (give prior=Beta(a, b) for reliability "
                "probabilities, or define priors() for the others)"
            )
        for name in names:
            delattr(self, name)
            setattr(self, name, PyroSample(priors[name]))
        return self

    def check_bayesian(self) -> None:
        """Raise ValueError unless every declared parameter is a random variable."""
        left = [n for n in self.point_parameters()]
        if left:
            raise ValueError(
                f"{type(self).__name__}: parameters {', '.join(left)} are point values in "
                "a model given to NUTS or SVI; call bayesian() (every parameter needs a prior)"
            )

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
    def eta_profile(
        self, logits: Tensor, data: LabelData, *, grid: int = 201, scales: int = 121
    ) -> EtaProfile | None:
        """The profile likelihood of the reported reliability at fixed per-item
        ``logits`` (``(I,)``, read at ``data.unit``; NaN: not scored) read through a
        Platt scale (:func:`~repo.inference.profile.eta_profile`), where the model and
        the data are the case it describes; ``None`` (this default) elsewhere.

        A model that returns one has its reported reliability as a parameter named
        ``eta``: the refits start EM at the profile's maximum too
        (:func:`~repo.inference.online.fit_calibrated`), and a run's summary reports
        its interval. ``grid`` and ``scales`` are the profile's grid sizes.
        """
        return None

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
        """The model's own per-annotator values by name, each ``(K,)``: by default its
        declared point parameters on the annotators plate."""
        return self.plate_parameters(ANNOTATORS)

    def population_parameters(self) -> dict[str, Tensor]:
        """Global values (one number each): by default the declared global point
        parameters."""
        return self.plate_parameters(None)

    def plate_parameters(self, plate: str | None) -> dict[str, Tensor]:
        """The declared point parameters on ``plate`` (None: global), detached."""
        return {
            name: getattr(self, name).detach()
            for name in self.point_parameters()
            if self.declarations[name].plate == plate
        }

    def plates(self) -> list[str | None]:
        """The plates of the declared parameters, annotators first, global last."""
        seen = {p.plate for p in self.declarations.values()}
        named = sorted(p for p in seen if p is not None and p != ANNOTATORS)
        return [ANNOTATORS, *named] + ([None] if None in seen else [])


def logit(p: float) -> float:
    """``log(p / (1 - p))`` of a probability strictly inside ``(0, 1)``."""
    return math.log(p / (1 - p))
