r"""The profile likelihood of one annotator's reliability under a calibrated scorer.

With one annotator (or labels that never share an item) the labels and the scorer's
logits are all there is, and the scorer's calibration and :math:`\eta` compete to
explain the same thing: how often the labels agree with :math:`\mathrm{sign}(c)`.
This module measures how well the data separate them.

The model (the symmetric flip with one annotator, the scorer read through the Platt
scale of :class:`~repo.scorers.CalibratedLogits`): with
:math:`t_i = c_i (2 o_i - 1)` the logit towards label :math:`o_i`,

.. math::

    p(o_i \mid c_i, \eta, a) = (1 - \eta) + (2\eta - 1)\,\sigma(a t_i),
    \qquad \ell(\eta, a) = \sum_i \log p(o_i \mid c_i, \eta, a),

and the profile log-likelihood :math:`\ell_p(\eta) = \max_{a > 0} \ell(\eta, a)` on
:math:`\eta \in [1/2, 1]` (the other half is the label switch, ``docs/math.md``
section 7). The likelihood-ratio interval at level :math:`1 - \alpha` is
:math:`\{\eta : 2(\ell_p(\hat\eta) - \ell_p(\eta)) \le \chi^2_{1, 1-\alpha}\}`.

Why it is wide when the scorer is weak: with any monotone calibration in place of
:math:`\sigma(a\,\cdot)` the profile is flat on :math:`[\eta_{\min}, 1]`, where
:math:`\eta_{\min}` is the largest agreement rate the scorer reaches
(``docs/math.md`` section 9): every :math:`\eta` in that range explains the labels
exactly as well, with a less confident truth. The Platt family pins a point on that
range only through its shape; when every :math:`|a c_i|` is small only
:math:`(2\eta - 1) a` is identified and the interval spans most of :math:`[1/2, 1]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from repo.scorers import MAX_SCALE, MIN_SCALE

__all__ = ["EtaProfile", "eta_profile"]

CHI2_1_95 = 3.841458820694124  # the 0.95 quantile of chi-square with 1 degree of freedom
TINY = 1e-300  # the smallest probability of a label (float64 underflows below it)


@dataclass(frozen=True)
class EtaProfile:
    """The profile log-likelihood of one annotator's ``eta`` (module docstring).

    :param eta: ``(G,)`` the grid on ``[1/2, 1]``.
    :param log_likelihood: ``(G,)`` :math:`\\ell_p(\\eta)` on the grid.
    :param scale: ``(G,)`` the maximising scale :math:`a` at each grid point.
    :param estimate: the maximum-likelihood ``eta`` (grid point of the maximum).
    :param scale_estimate: :math:`\\hat a` at the estimate.
    :param interval: ``(low, high)`` the likelihood-ratio interval.
    :param level: its coverage level.
    :param num_labels: labels it was computed from.
    """

    eta: Tensor
    log_likelihood: Tensor
    scale: Tensor
    estimate: float
    scale_estimate: float
    interval: tuple[float, float]
    level: float
    num_labels: int

    @property
    def width(self) -> float:
        """``high - low`` of the interval."""
        return self.interval[1] - self.interval[0]

    def to_dict(self) -> dict[str, float | int | list[float]]:
        """A JSON-ready summary (no grid)."""
        return {
            "estimate": self.estimate,
            "scale": self.scale_estimate,
            "interval": [self.interval[0], self.interval[1]],
            "level": self.level,
            "num_labels": self.num_labels,
        }


def eta_profile(
    logits: Tensor,
    labels: Tensor,
    *,
    grid: int = 501,
    scales: int = 241,
    level: float = 0.95,
    max_values: int = 20_000_000,
) -> EtaProfile:
    """The profile log-likelihood of ``eta`` for one annotator's labels at given logits.

    :param logits: ``(n,)`` the scorer's logits :math:`c_i` that A is better.
    :param labels: ``(n,)`` the labels :math:`o_i \\in \\{0, 1\\}` (1: A preferred).
    :param grid: grid points for ``eta`` on ``[1/2, 1]``.
    :param scales: grid points for ``log a`` on ``[log MIN_SCALE, log MAX_SCALE]`` in
        units of the logits' root mean square (``a * rms(c)`` spans that range), so the
        bounds never bind: scores of tens of nats at chance can be read as saying nothing
        (``a -> 0``), not only as labels near chance (held at ``a >= MIN_SCALE`` such
        scores put the interval at [0.5, 0.68] for labels 80% right). The best grid
        point is refined by one parabolic step in ``log a``.
    :param level: coverage of the likelihood-ratio interval (0.95 only: the
        chi-square quantile is the 0.95 one).
    :param max_values: the largest ``eta x scale x label`` block evaluated at once.
    """
    if level != 0.95:
        raise ValueError(f"only level = 0.95 is supported, got {level}")
    c = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    o = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    if c.shape != o.shape or c.numel() == 0:
        raise ValueError(f"need as many logits as labels (> 0), got {c.numel()} and {o.numel()}")
    if not bool(((o == 0) | (o == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("logits must be finite (drop the items never scored)")
    t = c * (2 * o - 1)
    eta = torch.linspace(0.5, 1.0, grid, dtype=torch.float64)
    rms = float(c.pow(2).mean().sqrt())
    unit = rms if rms > 0 else 1.0
    log_a = torch.linspace(
        math.log(MIN_SCALE / unit),
        math.log(MAX_SCALE / unit),
        scales,
        dtype=torch.float64,
    )
    # sigma(a t) for every scale: (S, n)
    p = torch.sigmoid(log_a.exp()[:, None] * t[None, :])
    chunk = max(1, max_values // max(1, scales * t.numel()))
    table = torch.empty(grid, scales, dtype=torch.float64)
    for start in range(0, grid, chunk):
        e = eta[start : start + chunk, None, None]
        # log((1 - eta) + (2 eta - 1) sigma(a t)), summed over labels; floored at
        # TINY, which only eta = 1 against a label it calls impossible reaches
        both = torch.log(((1 - e) + (2 * e - 1) * p).clamp_min_(TINY))
        table[start : start + chunk] = both.sum(-1)
    best = table.argmax(-1)
    profile, scale = _parabolic(table, best, log_a)
    top = int(profile.argmax())
    inside = (2 * (profile[top] - profile) <= CHI2_1_95).nonzero().reshape(-1)
    interval = (float(eta[inside.min()]), float(eta[inside.max()]))
    return EtaProfile(
        eta=eta,
        log_likelihood=profile,
        scale=scale,
        estimate=float(eta[top]),
        scale_estimate=float(scale[top]),
        interval=interval,
        level=level,
        num_labels=int(t.numel()),
    )


def _parabolic(table: Tensor, best: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The maximum over each row of ``table`` (values at ``x``), refined by the
    parabola through the best grid point and its neighbours; ``(value, exp(argmax))``."""
    rows = torch.arange(table.shape[0])
    i = best.clamp(1, table.shape[1] - 2)
    y0, y1, y2 = table[rows, i - 1], table[rows, i], table[rows, i + 1]
    h = x[1] - x[0]
    curvature = y0 - 2 * y1 + y2
    interior = (best == i) & (curvature < 0)
    shift = torch.where(interior, 0.5 * (y0 - y2) / curvature.where(interior, -1.0), 0.0)
    value = torch.where(interior, y1 - 0.25 * (y0 - y2) * shift, table[rows, best])
    where = torch.where(interior, x[i] + shift * h, x[best])
    return value, where.exp()
