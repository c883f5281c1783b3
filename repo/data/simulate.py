"""Synthetic annotator pools with known truth, for validation and benchmarks.

Items ``i`` get true scores ``s_i ~ Normal(0, logit_scale^2)`` (the logit that A
is better). The true preference is ``z ~ Bernoulli(sigmoid(s_i))``, drawn once per
item (shared truth) or once per label (per-label truth, the paper's model). Each
label's annotator is drawn (distinct annotators within an item) with probabilities
``annotator_weights``, and the label from the chosen noise process:

* ``symmetric``: ``o = z`` with probability ``eta_k``, else ``1 - z``;
* ``two-coin``: ``p(o = 1 | z = 1) = eta_a_k``, ``p(o = 0 | z = 0) = eta_b_k``;
* ``spammer``: honest with probability ``theta_k`` (``o = z``), else
  ``o ~ Bernoulli(bias_k)``;
* ``hierarchical``: ``logit eta_k ~ Normal(mu, sigma)``, then symmetric;
* ``boltzmann``: ``o ~ Bernoulli(sigmoid(tau_k s_i))`` (truth: ``s_i > 0``).

A/B is independent of the label by construction (truth A with probability
``sigmoid(s)``), as the noise models require. ``adversarial_fraction`` turns that
share of annotators adversarial (``eta -> 1 - eta``); ``spammer_fraction`` makes
that share answer at random (``eta = 0.5``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MODELS = ("symmetric", "two-coin", "spammer", "hierarchical", "boltzmann")


@dataclass
class SimulatedLabels:
    """Labels with their ground truth.

    :param annotator: ``(N,)`` annotator index.
    :param item: ``(N,)`` item index.
    :param label: ``(N,)`` 1 when the annotator said A.
    :param scores: ``(I,)`` true logit that A is better.
    :param truth: ``(N,)`` the true preference behind each label (shared within an
        item under shared truth).
    :param eta: ``(K,)`` each annotator's probability of a correct label.
    :param params: the generating model's own parameters by name.
    """

    annotator: np.ndarray
    item: np.ndarray
    label: np.ndarray
    scores: np.ndarray
    truth: np.ndarray
    eta: np.ndarray
    params: dict[str, np.ndarray] = field(default_factory=dict)
    shared_truth: bool = True

    @property
    def correct(self) -> np.ndarray:
        """Whether each label equals its truth."""
        return self.label == self.truth

    @property
    def item_truth(self) -> np.ndarray:
        """``(I,)`` the true preference of each item (shared truth only)."""
        out = np.zeros(self.scores.shape[0], dtype=np.int64)
        out[self.item] = self.truth
        return out

    def frame(self) -> pd.DataFrame:
        """One row a label: annotator, item, label (1: A) and the item's true score."""
        return pd.DataFrame(
            {
                "annotator": self.annotator,
                "item": self.item,
                "label": self.label,
                "score": self.scores[self.item],
            }
        )


def _assign_annotators(
    rng: np.random.Generator, num_items: int, per_item: int, weights: np.ndarray
) -> np.ndarray:
    """``(num_items, per_item)`` distinct annotators per item, drawn by ``weights``."""
    k = weights.shape[0]
    if per_item > k:
        raise ValueError(f"labels_per_item={per_item} exceeds num_annotators={k}")
    if per_item == 1:
        return rng.choice(k, size=(num_items, 1), p=weights)
    # Gumbel top-k: weighted sampling without replacement, vectorised over items.
    keys = np.log(weights)[None, :] + rng.gumbel(size=(num_items, k))
    return np.argpartition(-keys, per_item - 1, axis=1)[:, :per_item]


def simulate_labels(
    *,
    num_items: int,
    num_annotators: int,
    labels_per_item: int = 1,
    model: str = "symmetric",
    shared_truth: bool = True,
    eta_range: tuple[float, float] = (0.55, 0.98),
    logit_scale: float = 3.0,
    adversarial_fraction: float = 0.0,
    spammer_fraction: float = 0.0,
    annotator_weights: np.ndarray | None = None,
    mu: float = 1.5,
    sigma: float = 0.8,
    seed: int = 0,
) -> SimulatedLabels:
    """Simulate labels; see the module docstring. Reproducible given ``seed``."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    rng = np.random.default_rng(seed)
    k = num_annotators
    weights = np.full(k, 1.0 / k) if annotator_weights is None else np.asarray(annotator_weights)
    weights = weights / weights.sum()
    scores = rng.normal(0.0, logit_scale, size=num_items)
    slots = _assign_annotators(rng, num_items, labels_per_item, weights)
    item = np.repeat(np.arange(num_items), labels_per_item)
    annotator = slots.reshape(-1)
    n = item.shape[0]
    p_a = 1.0 / (1.0 + np.exp(-scores))
    if shared_truth:
        truth = (rng.random(num_items) < p_a).astype(np.int64)[item]
    else:
        truth = (rng.random(n) < p_a[item]).astype(np.int64)

    params: dict[str, np.ndarray] = {}
    lo, hi = eta_range
    if model == "hierarchical":
        eta = 1.0 / (1.0 + np.exp(-rng.normal(mu, sigma, size=k)))
        params.update(mu=np.array(mu), sigma=np.array(sigma))
    else:
        eta = rng.uniform(lo, hi, size=k)
    roles = rng.permutation(k)
    num_adv = int(round(adversarial_fraction * k))
    num_spam = int(round(spammer_fraction * k))
    eta[roles[:num_adv]] = 1.0 - eta[roles[:num_adv]]
    eta[roles[num_adv : num_adv + num_spam]] = 0.5

    u = rng.random(n)
    if model in ("symmetric", "hierarchical"):
        label = np.where(u < eta[annotator], truth, 1 - truth)
        params["eta"] = eta
    elif model == "two-coin":
        eta_a = eta
        eta_b = rng.uniform(lo, hi, size=k)
        p1 = np.where(truth == 1, eta_a[annotator], 1.0 - eta_b[annotator])
        label = (u < p1).astype(np.int64)
        pa = p_a[item]
        eta_label = pa * eta_a[annotator] + (1 - pa) * eta_b[annotator]
        eta = np.bincount(annotator, eta_label, k) / np.maximum(np.bincount(annotator, None, k), 1)
        params.update(eta_a=eta_a, eta_b=eta_b)
    elif model == "spammer":
        theta = eta
        bias = rng.uniform(0.2, 0.8, size=k)
        honest = u < theta[annotator]
        spam = (rng.random(n) < bias[annotator]).astype(np.int64)
        label = np.where(honest, truth, spam)
        pa = p_a[item]
        b = bias[annotator]
        eta_label = theta[annotator] + (1 - theta[annotator]) * (pa * b + (1 - pa) * (1 - b))
        eta = np.bincount(annotator, eta_label, k) / np.maximum(np.bincount(annotator, None, k), 1)
        params.update(theta=theta, bias=bias)
    else:  # boltzmann
        tau = rng.uniform(0.3, 3.0, size=k)
        tau[roles[:num_adv]] *= -1
        p1 = 1.0 / (1.0 + np.exp(-tau[annotator] * scores[item]))
        label = (u < p1).astype(np.int64)
        truth = (scores[item] > 0).astype(np.int64)
        agree = 1.0 / (1.0 + np.exp(-tau[annotator] * np.abs(scores[item])))
        eta = np.bincount(annotator, agree, k) / np.maximum(np.bincount(annotator, None, k), 1)
        params.update(tau=tau)
    return SimulatedLabels(
        annotator=annotator.astype(np.int64),
        item=item.astype(np.int64),
        label=label.astype(np.int64),
        scores=scores,
        truth=truth.astype(np.int64),
        eta=eta,
        params=params,
        shared_truth=shared_truth,
    )
