"""One adapter from any inference result (EM-Laplace, MAP, NUTS, SVI) to ArviZ data.

Groups and their dims:

* ``posterior``: every parameter site, over the dim of the plate it is declared on
  (:class:`~repo.noise.base.Parameter`; :func:`~repo.noise.base.dim_name`:
  ``annotators`` -> ``annotator``, ``items`` -> ``item``, any other plate its own
  name; global ones scalar) and ``eta``, each annotator's probability of a correct
  label; ``(chain, draw, ...)``. For EM and MAP the draws are the Laplace
  approximation's (one chain; ``attrs["approximation"]`` says so).
* ``sample_stats``: NUTS's ``diverging``, ``lp``, ``step_size``.
* ``log_likelihood``: the pointwise marginal log-likelihood with every latent
  summed out, one value per truth unit: ``o`` per label (dim ``label``) or, under
  shared truth, ``o_item`` per item (dim ``item``): the unit PSIS-LOO leaves out.
* ``observed_data``: ``o``, the labels (1: A preferred) over ``label``.
* ``constant_data``: ``annotator`` (index of each label's annotator, with the ids
  as the ``annotator`` coordinate), ``unit`` (each label's truth unit) and
  ``logit`` (the fixed scores of the units).

Pyro's own converter (``arviz.from_pyro``, 0.x only) would record the labels'
log-likelihood conditional on sampled latents, not the marginal one LOO needs, so
the groups are built here and handed to ``from_dict``
(:mod:`repo.diagnostics.compat`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from repo.diagnostics.compat import from_dict
from repo.inference.bayes import BayesResult
from repo.noise.base import ITEMS, REPORTED, dim_name


def unit_dim(result: BayesResult) -> str:
    """``"item"`` under shared truth, else ``"label"``: the dim of the pointwise
    log-likelihood."""
    return "item" if result.data.shared_truth else "label"


def to_inference_data(
    result: BayesResult,
    *,
    annotator_ids: Sequence[str] | None = None,
    unit_ids: Sequence[str] | None = None,
    model_name: str | None = None,
    log_likelihood: bool = True,
):
    """ArviZ data for ``result``; see the module docstring.

    :param annotator_ids: names of the annotators (default ``"0".."K-1"``).
    :param unit_ids: names of the items under shared truth (default their indices);
        labels are numbered in input order.
    :param log_likelihood: compute the pointwise log-likelihood (one enumeration per
        draw; the posterior is thinned alike when the enumeration is thinned).
    """
    draws = result.draws
    data = result.data
    k = data.num_annotators
    ids = [str(a) for a in (annotator_ids if annotator_ids is not None else range(k))]
    units = unit_dim(result)
    unit_names = list(unit_ids) if unit_ids is not None else data.unit.tolist()
    posterior = {**draws.samples, REPORTED: result.eta}  # eta: always implied_eta
    sample_stats = dict(draws.sample_stats)
    groups: dict[str, dict] = {}
    if log_likelihood:
        enumeration = result.enumeration()
        if len(enumeration.index) != draws.num_chains * draws.num_draws:
            keep = np.array(sorted({d for _, d in enumeration.index}))
            posterior = {name: value[:, keep] for name, value in posterior.items()}
            sample_stats = {name: value[:, keep] for name, value in sample_stats.items()}
        groups["log_likelihood"] = {log_likelihood_name(result): enumeration.log_likelihood}
    model = result.point_model
    dims: dict[str, list[str]] = {REPORTED: ["annotator"]}
    coords: dict[str, list] = {"annotator": ids, "label": np.arange(data.num_labels)}
    if units == "item":
        coords["item"] = unit_names
    for name in draws.samples:
        if name == REPORTED:
            continue
        plate = model.plate_of(name)
        if plate is None:
            dims[name] = []
            continue
        dim = dim_name(plate)
        size = model.plate_sizes[plate]
        if plate == ITEMS:
            keys = [str(k) for k in range(size)]
            for key, unit in zip(data.unit.tolist(), unit_names, strict=True):
                keys[key] = str(unit)
            if units == "item" and keys != [str(u) for u in unit_names]:
                dim = "item_key"  # items without labels: the plate is not the units
            coords[dim] = keys
        else:
            coords.setdefault(dim, np.arange(size))
        dims[name] = [dim]
    dims.update({"o": ["label"], "o_item": ["item"], "annotator_index": ["label"]})
    dims.update({"unit_index": ["label"], "logit": [units]})
    groups["posterior"] = posterior
    groups["sample_stats"] = sample_stats
    groups["observed_data"] = {"o": data.flat(data.label).numpy()}
    unit_of_slot = torch.arange(data.num_units).unsqueeze(-1).expand_as(data.annotator)
    groups["constant_data"] = {
        "annotator_index": data.flat(data.annotator).numpy(),
        "unit_index": data.flat(unit_of_slot).numpy(),
        "logit": result.logits.numpy(),
    }
    attrs = {
        "method": result.method,
        "model": model_name or result.point_model.name,
        "shared_truth": int(data.shared_truth),
        "num_divergences": draws.num_divergences,
        "approximation": str(draws.info.get("approximation", "")),
        "inference_library": "pyro",
    }
    return from_dict(groups, coords=coords, dims=dims, attrs=attrs)


def log_likelihood_name(result: BayesResult) -> str:
    """``"o"`` (per label, like the observed labels) or ``"o_item"`` (per item)."""
    return "o_item" if result.data.shared_truth else "o"
