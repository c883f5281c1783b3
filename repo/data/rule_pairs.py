"""Synthetic preference pairs whose better response follows a rule, labelled by noisy annotators.

For checking that RE-PO does what it says on a model small enough for a CPU test:
every pair has a prompt of random filler words and two responses of random filler
words, one carrying a *good* marker word and the other a *bad* one; the better
response is the one with the good marker. A policy can learn the rule (raise the
marker's probability) and generalise it to new pairs, or memorise the filler of
each training pair, which is how noisy labels hurt.

Labels come from a pool of annotators with known reliabilities ``eta_k``: each
label's annotator is drawn uniformly, and it reports the better response with
probability ``eta_k`` and the worse one otherwise (the symmetric flip, per-label
truth: the paper's model). Rows are in TRL's layout (``prompt``, ``chosen``,
``rejected``, ``annotator``) plus ``clean`` (whether the label is correct), so
they load with :func:`repo.data.loaders.load_preferences`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BAD_WORDS",
    "FILLER_WORDS",
    "GOOD_WORDS",
    "RulePairs",
    "rule_pairs",
    "true_preferences",
]

GOOD_WORDS = (
    "light meet given about with your have that for and the are you is it of on to in by".split()
)
"""Marker words of the better response."""
BAD_WORDS = "pop med wit numb stud comp int pro con com num qu pu su gi sh st te ch de".split()
"""Marker words of the worse response."""
FILLER_WORDS = (
    "water answer because question people simple example number story place river garden "
    "window paper music summer yellow doctor market planet"
).split()


@dataclass
class RulePairs:
    """Labelled rule pairs.

    :param rows: TRL-layout rows: ``prompt``, ``chosen``, ``rejected``, ``annotator``
        (``"a0"``, ``"a1"``, ...) and ``clean`` (the label picked the better response).
    :param eta: ``(K,)`` each annotator's true reliability.
    :param realised_eta: ``(K,)`` each annotator's share of correct labels in ``rows``.
    """

    rows: list[dict]
    eta: np.ndarray
    realised_eta: np.ndarray

    @property
    def flip_rate(self) -> float:
        """Share of labels that picked the worse response."""
        return float(np.mean([not r["clean"] for r in self.rows]))

    def clean_rows(self) -> list[dict]:
        """The same pairs with every label correct (for held-out accuracy)."""
        out = []
        for r in self.rows:
            chosen, rejected = (
                (r["chosen"], r["rejected"]) if r["clean"] else (r["rejected"], r["chosen"])
            )
            out.append({**r, "chosen": chosen, "rejected": rejected, "clean": True})
        return out


def true_preferences(rows: Sequence[dict], labels: Sequence[int]) -> np.ndarray:
    """``(n,)`` 1.0 where response A of a pair is truly the better, 0.0 where B is.

    ``rows`` are rule-pair rows (:class:`RulePairs`) and ``labels`` their labels as
    loaded (1: A preferred; :class:`repo.data.records.PreferenceRecord`), one a row in
    the same order: A is truly better where the label is 1 and clean, or 0 and not.
    """
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows against {len(labels)} labels")
    clean = np.array([bool(r["clean"]) for r in rows])
    return (clean == (np.asarray(labels) == 1)).astype(np.float64)


def _sentence(rng: np.random.Generator, length: int, marker: str | None) -> str:
    words = list(rng.choice(FILLER_WORDS, size=length))
    if marker is not None:
        words.insert(int(rng.integers(0, length + 1)), marker)
    return " ".join(words)


def rule_pairs(
    num_pairs: int,
    annotator_eta: Sequence[float] = (1.0,),
    *,
    seed: int = 0,
    filler: tuple[int, int] = (3, 6),
    markers: int = len(GOOD_WORDS),
) -> RulePairs:
    """``num_pairs`` labelled pairs (one label each); see the module docstring.

    :param annotator_eta: the reliability of each annotator (``K`` of them).
    :param seed: NumPy seed: the same seed gives the same rows.
    :param filler: inclusive range of filler words per response.
    :param markers: how many of :data:`GOOD_WORDS` (and of :data:`BAD_WORDS`) are used:
        fewer markers, more labels per marker.
    """
    if not 1 <= markers <= min(len(GOOD_WORDS), len(BAD_WORDS)):
        raise ValueError(f"markers must lie in 1..{len(GOOD_WORDS)}, got {markers}")
    good, bad = GOOD_WORDS[:markers], BAD_WORDS[:markers]
    eta = np.asarray(annotator_eta, dtype=np.float64)
    if eta.ndim != 1 or eta.size == 0 or np.any((eta < 0) | (eta > 1)):
        raise ValueError(f"annotator_eta must be probabilities, got {annotator_eta!r}")
    rng = np.random.default_rng(seed)
    rows = []
    k = eta.size
    for i in range(num_pairs):
        prompt = f"Question {i}: " + _sentence(rng, 3, None)
        lengths = rng.integers(filler[0], filler[1] + 1, size=2)
        better = _sentence(rng, int(lengths[0]), str(rng.choice(good)))
        worse = _sentence(rng, int(lengths[1]), str(rng.choice(bad)))
        annotator = int(rng.integers(0, k))
        clean = bool(rng.random() < eta[annotator])
        chosen, rejected = (better, worse) if clean else (worse, better)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "annotator": f"a{annotator}",
                "clean": clean,
            }
        )
    counts = np.bincount([int(r["annotator"][1:]) for r in rows], minlength=k)
    correct = np.bincount(
        [int(r["annotator"][1:]) for r in rows], weights=[r["clean"] for r in rows], minlength=k
    )
    return RulePairs(rows=rows, eta=eta, realised_eta=correct / np.maximum(counts, 1))
