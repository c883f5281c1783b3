"""Scorers: the preference logits ``s_i = logit p(A >* B | x_i)`` of truth units.

A scorer is any :class:`~pyro.nn.PyroModule` mapping a :class:`LabelData` to one
logit per truth unit. The noise models only see these logits, which is what makes
the noise layer testable in seconds with fixed numbers and reusable with a policy.

* :class:`FixedLogits`: numbers given (a reward model's, a frozen policy's).
* :class:`ClassPrior`: one learned logit for every unit, ``s_i = logit pi``: pure
  crowd aggregation, identifiable only when units share truth across labels.
* :class:`BradleyTerry`: learned object scores ``u``, ``s_i = u_{a_i} - u_{b_i}``
  (Crowd-BT when paired with a flip model), centred for identifiability, with a
  ``Normal(0, prior_scale)`` prior so that an object that always wins stays finite.
  Its M-step maximises the expected complete-data log-likelihood in ``u``, a
  Bradley-Terry fit to the soft outcomes ``p(z_i = 1 | o)`` (L-BFGS; concave).
* :class:`CalibratedLogits`: given logits times one learned scale, ``s_i = a c_i``
  (``a > 0``): a calibration of a scorer whose confidence is off (a policy early in
  training, or one that has memorised), fitted by EM jointly with the noise model.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.nn.functional import logsigmoid

from repo.noise.layout import LabelData


class Scorer(PyroModule):
    """Base class: ``forward(data) -> logits (I,)``, float64."""

    #: whether the logits differ between units (a class prior's do not).
    per_unit: bool = True

    def forward(self, data: LabelData) -> Tensor:
        raise NotImplementedError

    def log_prior(self) -> Tensor:
        return torch.zeros((), dtype=torch.float64)

    def sufficient_statistics(self, data: LabelData, truth: Tensor) -> dict[str, Tensor] | None:
        """Statistics for a closed-form update from ``p(z_i = 1 | o)``; None if none."""
        return None

    def m_step(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


class FixedLogits(Scorer):
    """Logits given as numbers, one per global unit index."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        logits = torch.as_tensor(logits, dtype=torch.float64)
        if logits.dim() != 1:
            raise ValueError(f"logits must be 1-D, got shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            bad = int(torch.nonzero(~torch.isfinite(logits))[0])
            raise ValueError(f"logit {bad} is not finite ({float(logits[bad])})")
        self.register_buffer("logits", logits)

    def forward(self, data: LabelData) -> Tensor:
        return self.logits[data.unit]


class ClassPrior(Scorer):
    """``s_i = logit pi`` for every unit; ``pi`` = the share of units whose truth is A.

    Closed-form M-step: ``pi = mean_i p(z_i = 1 | o)``.
    """

    per_unit = False

    def __init__(self, pi_init: float = 0.5) -> None:
        super().__init__()
        self.logit_pi = PyroParam(torch.logit(torch.tensor(pi_init, dtype=torch.float64)))

    def forward(self, data: LabelData) -> Tensor:
        return self.logit_pi.expand(data.num_units)

    def sufficient_statistics(self, data, truth):
        return {
            "truth_a": truth.sum(),
            "units": torch.tensor(float(truth.numel()), dtype=truth.dtype),
        }

    def m_step(self, stats):
        pi = (stats["truth_a"] / stats["units"]).clamp(1e-6, 1 - 1e-6)
        return {"logit_pi": torch.logit(pi)}


class BradleyTerry(Scorer):
    """Object scores ``u`` with ``s_i = u_{a_i} - u_{b_i}`` (``u`` centred).

    :param object_a: ``(U,)`` object shown as A in each unit.
    :param object_b: ``(U,)`` object shown as B.
    :param num_objects: number of objects.
    :param prior_scale: sd of the Normal prior on the centred scores.
    """

    def __init__(
        self, object_a: Tensor, object_b: Tensor, num_objects: int, prior_scale: float = 5.0
    ) -> None:
        super().__init__()
        self.register_buffer("object_a", torch.as_tensor(object_a, dtype=torch.long))
        self.register_buffer("object_b", torch.as_tensor(object_b, dtype=torch.long))
        self.prior_scale = prior_scale
        self.scores = PyroParam(torch.zeros(num_objects, dtype=torch.float64))

    def centred(self) -> Tensor:
        """``u - mean(u)``: the identified scores."""
        return self.scores - self.scores.mean()

    def forward(self, data: LabelData) -> Tensor:
        u = self.centred()
        return u[self.object_a[data.unit]] - u[self.object_b[data.unit]]

    def log_prior(self) -> Tensor:
        return self._log_prior(self.centred())

    def _log_prior(self, centred: Tensor) -> Tensor:
        scale = torch.tensor(self.prior_scale, dtype=torch.float64)
        return dist.Normal(torch.zeros((), dtype=torch.float64), scale).log_prob(centred).sum()

    def sufficient_statistics(self, data, truth):
        """The soft outcome ``q_i = p(z_i = 1 | o)`` of every unit, by unit."""
        return {"unit": data.unit, "truth": truth}

    def m_step(self, stats):
        """``argmax_u sum_i [q_i log sigmoid(s_i) + (1 - q_i) log sigmoid(-s_i)] + log p(u)``,
        ``s_i = u_{a_i} - u_{b_i}``: a concave problem, solved by L-BFGS."""
        a, b = self.object_a[stats["unit"]], self.object_b[stats["unit"]]
        q = stats["truth"].detach()
        u = self.scores.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [u],
            max_iter=100,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            centred = u - u.mean()
            s = centred[a] - centred[b]
            value = (q * logsigmoid(s) + (1 - q) * logsigmoid(-s)).sum()
            loss = -(value + self._log_prior(centred)) / q.numel()
            loss.backward()
            return loss

        optimizer.step(closure)
        u = u.detach()
        return {"scores": u - u.mean()}


MIN_SCALE, MAX_SCALE = 1e-2, 1e2
"""The default bounds of a learned logit scale (:class:`CalibratedLogits`)."""


class CalibratedLogits(Scorer):
    r"""Fixed logits :math:`c_i` times a learned scale: :math:`s_i = a\,c_i`, :math:`a > 0`.

    The scale is a one-parameter (Platt, no intercept) calibration of the scorer that
    made the :math:`c_i`: the noise model reads :math:`p(z_i = 1) = \sigma(a c_i)`.
    Its M-step maximises the expected complete-data log-likelihood in :math:`a`,

    .. math::

        \hat a = \arg\max_a \sum_i q_i \log\sigma(a c_i) + (1 - q_i)\log\sigma(-a c_i),
        \qquad q_i = p(z_i = 1 \mid o, s, \phi),

    a logistic regression of the posterior truths on :math:`c` without intercept:
    concave, its derivative :math:`g(a) = \sum_i (q_i - \sigma(a c_i)) c_i` decreasing
    in :math:`a`, solved by Newton's method inside a bisection bracket on
    ``[min_scale, max_scale]`` (the bounds keep :math:`a` finite when the soft outcomes
    are separable by the sign of :math:`c`).

    What identifies :math:`a` apart from a reliability :math:`\eta`: the labels'
    agreement with :math:`\mathrm{sign}(c)` rises from 1/2 at :math:`c = 0` towards
    :math:`\eta` as :math:`|c|` grows, at a rate set by :math:`a`. When every
    :math:`|c_i|` is small only the product :math:`(2\eta - 1) a` is identified.

    :param logits: ``(U,)`` the given logits by global unit index.
    :param scale: the starting scale.
    :param min_scale: the smallest scale allowed (> 0).
    :param max_scale: the largest scale allowed.
    """

    def __init__(
        self,
        logits: Tensor,
        scale: float = 1.0,
        *,
        min_scale: float = MIN_SCALE,
        max_scale: float = MAX_SCALE,
    ) -> None:
        super().__init__()
        if not 0 < min_scale <= scale <= max_scale:
            raise ValueError(
                f"need 0 < min_scale <= scale <= max_scale, got {min_scale}, {scale}, {max_scale}"
            )
        self.base = FixedLogits(logits)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.scale = PyroParam(
            torch.tensor(float(scale), dtype=torch.float64),
            constraint=constraints.interval(self.min_scale, self.max_scale),
        )

    def forward(self, data: LabelData) -> Tensor:
        return self.scale * self.base(data)

    def sufficient_statistics(self, data, truth):
        """The given logit and the soft outcome ``q_i = p(z_i = 1 | o)`` of every unit."""
        return {"logits": self.base(data), "truth": truth}

    def m_step(self, stats):
        r""":math:`\hat a` of the class docstring from the statistics of any set of units."""
        scale = calibration_scale(
            stats["logits"],
            stats["truth"],
            start=float(self.scale.detach()),
            bounds=(self.min_scale, self.max_scale),
        )
        return {"scale": torch.tensor(scale, dtype=torch.float64)}


def calibration_scale(
    logits: Tensor,
    truth: Tensor,
    *,
    start: float = 1.0,
    bounds: tuple[float, float] = (MIN_SCALE, MAX_SCALE),
    tol: float = 1e-10,
    max_iter: int = 100,
) -> float:
    r"""The scale :math:`a` in ``bounds`` maximising
    :math:`\sum_i q_i\log\sigma(a c_i) + (1 - q_i)\log\sigma(-a c_i)`
    (see :class:`CalibratedLogits`): safeguarded Newton on the decreasing derivative.

    :param logits: ``(n,)`` the given logits :math:`c_i`.
    :param truth: ``(n,)`` soft outcomes :math:`q_i \in [0, 1]`.
    :param start: the first Newton iterate (clamped into ``bounds``).
    """
    c = logits.detach().double().reshape(-1)
    q = truth.detach().double().reshape(-1)
    lo, hi = float(bounds[0]), float(bounds[1])

    def derivative(a: float) -> tuple[float, float]:
        p = torch.sigmoid(a * c)
        return float(((q - p) * c).sum()), float((p * (1 - p) * c * c).sum())

    if derivative(lo)[0] <= 0:
        return lo
    if derivative(hi)[0] >= 0:
        return hi
    a = min(max(start, lo), hi)
    for _ in range(max_iter):
        g, h = derivative(a)
        if g > 0:
            lo = a
        else:
            hi = a
        step = a + g / h if h > 0 else math.nan
        new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(new - a) <= tol * max(1.0, a):
            return new
        a = new
    return a
