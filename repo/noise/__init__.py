"""Annotator noise processes, each a Pyro model of labels given preference logits."""

from __future__ import annotations

import math

import pyro.distributions as dist

from repo.noise.base import EPS, NoiseModel
from repo.noise.boltzmann import Boltzmann
from repo.noise.hierarchical import HierarchicalFlip
from repo.noise.layout import LabelData
from repo.noise.spammer import Spammer
from repo.noise.symmetric import SymmetricFlip
from repo.noise.two_coin import TwoCoin

NOISE_MODELS: dict[str, type[NoiseModel]] = {
    "symmetric": SymmetricFlip,
    "two-coin": TwoCoin,
    "hierarchical": HierarchicalFlip,
    "spammer": Spammer,
    "boltzmann": Boltzmann,
}


def make_noise_model(
    name: str, num_annotators: int, prior: dist.Beta | None = None, **kwargs
) -> NoiseModel:
    """The noise model called ``name`` (see :data:`NOISE_MODELS`) for ``K`` annotators.

    ``prior`` (a Beta on the reliability parameters) applies to the flip models;
    the hierarchical model has its population instead, and the Boltzmann model has
    no probability parameter, so a prior there is an error.
    """
    if name not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {name!r}; choose from {', '.join(NOISE_MODELS)}")
    cls = NOISE_MODELS[name]
    if prior is not None:
        if not cls.reliability_names:
            raise ValueError(
                f"the {name} model has no reliability probability for a Beta prior "
                "(hierarchical: the population is the prior; boltzmann: tau is real-valued)"
            )
        kwargs["prior"] = prior
    return cls(num_annotators, **kwargs)


def initial_arguments(name: str, eta_init: float) -> dict[str, float]:
    """Constructor arguments that start the model ``name`` at reliability ``eta_init``.

    The flip models start every reliability at ``eta_init``, the spammer its
    honesty ``theta``, the hierarchical model its population location
    ``mu = logit eta_init``; the Boltzmann model starts at its own ``tau = 1``. The
    one map of ``re-po fit-noise`` and ``re-po train``.
    """
    if name in ("symmetric", "two-coin"):
        return {"eta_init": eta_init}
    if name == "spammer":
        return {"theta_init": eta_init}
    if name == "hierarchical":
        return {"mu_init": math.log(eta_init / (1 - eta_init))}
    return {}


__all__ = [
    "EPS",
    "NOISE_MODELS",
    "Boltzmann",
    "HierarchicalFlip",
    "LabelData",
    "NoiseModel",
    "Spammer",
    "SymmetricFlip",
    "TwoCoin",
    "initial_arguments",
    "make_noise_model",
]
