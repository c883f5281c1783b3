"""Annotator noise processes, each a Pyro model of labels given preference logits."""

from __future__ import annotations

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
    "make_noise_model",
]
