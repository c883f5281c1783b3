"""Annotator noise processes, each a Pyro model of labels given preference logits."""

from __future__ import annotations

import pyro.distributions as dist

from repo.noise.base import ANNOTATORS, EPS, ITEMS, NoiseModel, Parameter, Sizes, dim_name
from repo.noise.boltzmann import Boltzmann
from repo.noise.glad import GLAD
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
    "glad": GLAD,
}


def make_noise_model(
    name: str,
    sizes: Sizes | int,
    prior: dist.Beta | None = None,
    *,
    eta_init: float = 0.9,
) -> NoiseModel:
    """The noise model called ``name`` (see :data:`NOISE_MODELS`) for data of these
    ``sizes`` (an int: ``K`` annotators alone), through the class's
    :meth:`~repo.noise.base.NoiseModel.build`: started at reliability ``eta_init``,
    with ``prior`` (a Beta on the reliability probabilities) where the model takes one.
    """
    if name not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {name!r}; choose from {', '.join(NOISE_MODELS)}")
    if isinstance(sizes, int):
        sizes = Sizes(annotators=sizes)
    model = NOISE_MODELS[name].build(sizes, eta_init=eta_init, prior=prior)
    if prior is not None and not model.reliability_names:
        raise ValueError(f"the {name} model has no reliability probability for a Beta prior")
    return model


__all__ = [
    "ANNOTATORS",
    "EPS",
    "GLAD",
    "ITEMS",
    "NOISE_MODELS",
    "Boltzmann",
    "HierarchicalFlip",
    "LabelData",
    "NoiseModel",
    "Parameter",
    "Sizes",
    "Spammer",
    "SymmetricFlip",
    "TwoCoin",
    "dim_name",
    "make_noise_model",
]
