r"""Induced preference likelihoods, one module per loss family.

A pairwise preference loss :math:`L(A \succ B)` induces the model

.. math:: p(A \succ^* B) = \sigma\big(L(B \succ A) - L(A \succ B)\big)

of the true preference (Boltzmann construction; see :mod:`repo.likelihoods.base`).
Each family maps :class:`PairLogps` (summed response log-probs, lengths, and
reference log-probs where needed) to its loss, its induced logit ``s``, the
RE-PO policy M-step loss given posterior weights ``w``, and TRL-style rewards.

================  ==============================  =================  ===============
name              class                           needs reference    default variant
================  ==============================  =================  ===============
``"dpo"``         :class:`DPOLikelihood`          yes                ``"nll"``
``"ipo"``         :class:`IPOLikelihood`          yes                ``"mixture"``
``"simpo"``       :class:`SimPOLikelihood`        no                 ``"mixture"``
``"cpo"``         :class:`CPOLikelihood`          no                 ``"nll"``
``"hinge"``       :class:`HingeLikelihood`        yes                ``"mixture"``
``"cdpo"``        :class:`CDPOLikelihood`         yes                ``"mixture"``
``"rdpo"``        :class:`RDPOLikelihood`         yes                ``"mixture"``
``"holder_dpo"``  :class:`HolderDPOLikelihood`    yes                ``"mixture"``
================  ==============================  =================  ===============

A new loss needs only a function: ``InducedLikelihood(lambda st: ...)``.
"""

from __future__ import annotations

from typing import Any

from repo.likelihoods.base import VARIANTS, InducedLikelihood, PreferenceLikelihood, Variant
from repo.likelihoods.baselines import (
    CDPOLikelihood,
    HingeLikelihood,
    HolderDPOLikelihood,
    RDPOLikelihood,
)
from repo.likelihoods.cpo import CPOLikelihood
from repo.likelihoods.dpo import DPOLikelihood
from repo.likelihoods.ipo import IPOLikelihood
from repo.likelihoods.simpo import SimPOLikelihood
from repo.likelihoods.stats import PairLogps

__all__ = [
    "PairLogps",
    "PreferenceLikelihood",
    "InducedLikelihood",
    "DPOLikelihood",
    "IPOLikelihood",
    "SimPOLikelihood",
    "CPOLikelihood",
    "HingeLikelihood",
    "CDPOLikelihood",
    "RDPOLikelihood",
    "HolderDPOLikelihood",
    "Variant",
    "VARIANTS",
    "LIKELIHOODS",
    "available_likelihoods",
    "get_likelihood",
]

LIKELIHOODS: dict[str, type[PreferenceLikelihood]] = {
    cls.name: cls
    for cls in (
        DPOLikelihood,
        IPOLikelihood,
        SimPOLikelihood,
        CPOLikelihood,
        HingeLikelihood,
        CDPOLikelihood,
        RDPOLikelihood,
        HolderDPOLikelihood,
    )
}


def available_likelihoods() -> tuple[str, ...]:
    """The registered family names, in registry order."""
    return tuple(LIKELIHOODS)


def get_likelihood(name: str, **kwargs: Any) -> PreferenceLikelihood:
    """Build a likelihood by family name (case-insensitive).

    Example: ``get_likelihood("ipo", beta=0.5)``.

    :param name: one of :func:`available_likelihoods`.
    :param kwargs: the family's constructor arguments (``beta``, ``gamma``, ``epsilon``, ...).
    :raises ValueError: for an unknown name, listing the known ones; for bad
        hyper-parameters (from the constructor).
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in LIKELIHOODS:
        raise ValueError(
            f"unknown likelihood {name!r}; known: {', '.join(available_likelihoods())}"
        )
    cls = LIKELIHOODS[key]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for likelihood {key!r}: {err}") from err
