"""One adapter from any inference result (EM-Laplace, MAP, NUTS, SVI) to ArviZ data.

Groups and their dims:

* ``posterior``: every parameter site (per-annotator ones over ``annotator``;
  ``mu``, ``sigma`` scalar) and ``eta``, each annotator's probability of a correct
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
from repo.inference.bayes import POPULATION, BayesResult


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
    posterior = {"eta": result.eta, **draws.samples}
    sample_stats = dict(draws.sample_stats)
    groups: dict[str, dict] = {}
    if log_likelihood:
        enumeration = result.enumeration()
        if len(enumeration.index) != draws.num_chains * draws.num_draws:
            keep = np.array(sorted({d for _, d in enumeration.index}))
            posterior = {name: value[:, keep] for name, value in posterior.items()}
            sample_stats = {name: value[:, keep] for name, value in sample_stats.items()}
        groups["log_likelihood"] = {log_likelihood_name(result): enumeration.log_likelihood}
    dims = {name: ["annotator"] for name in posterior if name not in POPULATION}
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
    coords = {"annotator": ids, "label": np.arange(data.num_labels)}
    if units == "item":
        coords["item"] = unit_names
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
