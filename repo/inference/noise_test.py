r"""A likelihood-ratio test of label noise: do the labels show that any of them is wrong?

RE-PO reweights the policy step by the posterior :math:`w` that each label is correct.
When the labels carry no evidence of noise, that reweighting can only cost: a policy
still learning scores many correct labels as unlikely, and :math:`w < 1` holds back
exactly the labels it has not learned yet. The trainer therefore trains on the labels
as given (:math:`w = 1`, the base loss) until this test rejects "no label is wrong"
(:class:`~repo.inference.online.OnlineEM`, ``noise_test``).

The scorer's logits :math:`c_i` are read through a Platt scale :math:`a` in
:math:`[a_{\min}, a_{\max}]` (:class:`~repo.scorers.CalibratedLogits`), under both
hypotheses:

* :math:`H_0`, perfect annotators: every label equals its unit's truth,
  :math:`o_{ij} = z_i`. A unit whose labels all say :math:`y_i` has likelihood
  :math:`\sigma(a c_i (2 y_i - 1))`; a unit whose labels disagree has likelihood 0.

  .. math:: \ell_0 = \max_a \sum_i \log\sigma(a\,c_i\,(2 y_i - 1)),

  a logistic regression without intercept (:func:`~repo.scorers.calibration_scale`).
* :math:`H_1`, the noise model with its parameters :math:`\phi`:
  :math:`\ell_1 = \max_{\phi, a} \sum_i \log p(o_i \mid a c_i, \phi)`, fitted by EM
  (the caller's fit, :func:`likelihood_ratio_test` reads it).

:math:`H_0` is the boundary of :math:`H_1` where every annotator's reliability is 1,
so :math:`\Lambda = 2(\ell_1 - \ell_0) \ge 0`, and under :math:`H_0` it is
asymptotically chi-bar-squared (Self and Liang, 1987, JASA 82:605): with :math:`d`
annotators each on its boundary,

.. math:: P(\Lambda > x) = \sum_{k=1}^{d} \binom{d}{k} 2^{-d}\, P(\chi^2_k > x).

With one annotator that is :math:`\tfrac12 P(\chi^2_1 > x)`. Disagreeing labels on one
unit make :math:`\ell_0 = -\infty`: the test rejects at once (several annotators per
item who disagree prove noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, astuple, dataclass

import torch
from torch import Tensor

from repo.inference.enumeration import enumerate_posterior
from repo.noise.base import NoiseModel
from repo.noise.layout import LabelData
from repo.scorers import CalibratedLogits, calibration_scale

__all__ = [
    "NoiseTest",
    "chi_bar_squared_sf",
    "disagreeing_units",
    "likelihood_ratio_test",
    "perfect_labels_log_likelihood",
]


@dataclass(frozen=True)
class NoiseTest:
    """The outcome of :func:`likelihood_ratio_test`.

    :param statistic: :math:`\\Lambda = 2(\\ell_1 - \\ell_0)` (``inf`` when a unit's
        labels disagree).
    :param df: :math:`d`, the annotators with labels (reliabilities on the boundary).
    :param p_value: :math:`P(\\Lambda > \\text{statistic})` under :math:`H_0`.
    :param level: the level the test was taken at.
    :param items: the truth units it was computed from.
    :param rejected: ``p_value < level``: the labels show noise.
    """

    statistic: float
    df: int
    p_value: float
    level: float
    items: int
    rejected: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        """The fields by name (for JSON)."""
        return asdict(self)

    def to_tensor(self) -> Tensor:
        """The fields in order as one float64 tensor (for a checkpoint's state)."""
        return torch.tensor([float(v) for v in astuple(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: Tensor) -> NoiseTest:
        """The inverse of :meth:`to_tensor`."""
        statistic, df, p_value, level, items, rejected = values.tolist()
        return cls(statistic, int(df), p_value, level, int(items), bool(rejected))


def chi_bar_squared_sf(x: float, df: int) -> float:
    r""":math:`P(\Lambda > x)` for :math:`\Lambda` the equal-weight chi-bar-squared
    mixture of :math:`d =` ``df`` boundary parameters (module docstring).

    :math:`P(\chi^2_k > x) = Q(k/2, x/2)`, the regularised upper incomplete gamma
    function; the binomial weights are taken in log space, so thousands of annotators
    neither overflow :math:`\binom{d}{k}` nor underflow :math:`2^{-d}`."""
    if x == math.inf:
        return 0.0
    if x <= 0:
        return 1.0
    k = torch.arange(1, df + 1, dtype=torch.float64)
    log_weight = (
        math.lgamma(df + 1) - torch.lgamma(k + 1) - torch.lgamma(df - k + 1) - df * math.log(2)
    )
    tail = torch.special.gammaincc(k / 2, torch.full_like(k, x / 2))
    return float((log_weight.exp() * tail).sum())


def disagreeing_units(data: LabelData) -> Tensor:
    """``(U,)`` whether the labels of each unit disagree (noise, whatever the scores)."""
    labels = torch.where(data.mask, data.label, float("nan"))
    low = torch.nan_to_num(labels, nan=1.0).amin(-1)
    high = torch.nan_to_num(labels, nan=0.0).amax(-1)
    return low < high


def perfect_labels_log_likelihood(
    logits: Tensor, data: LabelData, bounds: tuple[float, float]
) -> tuple[float, float]:
    r""":math:`(\ell_0, \hat a)`: the log-likelihood of the labels under perfect
    annotators at the best scale in ``bounds``, and that scale (module docstring).

    :param logits: ``(U,)`` the scorer's unscaled logits :math:`c_i` of ``data``'s units.
    :param data: the labels; a unit whose labels disagree gives :math:`-\infty`.
    """
    if bool(disagreeing_units(data).any()):
        return -math.inf, math.nan
    c = logits.detach().double().reshape(-1)
    y = torch.where(data.mask, data.label, 0.0).amax(-1).double()  # the units' label
    scale = calibration_scale(c, y, bounds=bounds)
    return float(torch.nn.functional.logsigmoid(scale * c * (2 * y - 1)).sum()), scale


def likelihood_ratio_test(
    noise: NoiseModel, scorer: CalibratedLogits, data: LabelData, *, level: float
) -> NoiseTest:
    r"""Test "no label is wrong" against ``noise`` fitted with ``scorer`` (its scale
    learned) on ``data`` (module docstring).

    ``noise`` and ``scorer`` hold the alternative's maximum-likelihood fit (EM, from
    several starts where the likelihood has ridges); the null's scale is fitted here
    within the scorer's bounds. A fit that ends below the null (EM stopped short)
    counts as :math:`\Lambda = 0`.
    """
    with torch.no_grad():
        posterior = enumerate_posterior(noise.e_step_model(), scorer(data), data)
        ll1 = float(posterior.log_likelihood.sum())
        c = scorer.base(data)
        ll0, _ = perfect_labels_log_likelihood(c, data, (scorer.min_scale, scorer.max_scale))
    statistic = math.inf if ll0 == -math.inf else max(2.0 * (ll1 - ll0), 0.0)
    df = max(int(torch.unique(data.annotator[data.mask]).numel()), 1)
    p_value = chi_bar_squared_sf(statistic, df)
    return NoiseTest(statistic, df, p_value, float(level), data.num_units, p_value < level)
