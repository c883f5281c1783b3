"""What a run records about itself, computed from its parts.

* :func:`resolved_config` - ``config.json``: the configuration with defaults filled
  in and paths made absolute, and what was resolved from it (the likelihood with its
  hyper-parameters, the variant, the noise model, steps and batches);
* :func:`data_report` - ``data_report.json``: what the data turned into and what was
  dropped under which policy;
* :func:`reliability` - ``reliability.json``: per annotator the label count and the
  noise model's parameters, and the population parameters; for one annotator under the
  symmetric flip, what the labels can tell of its ``eta``: the profile likelihood's
  estimate and 95% interval at the items' first-visit (out-of-sample) logits
  (:func:`one_annotator_profile`), and a warning when that interval is wide or misses
  the learned ``eta``;
* :func:`posterior_rows` - ``posteriors.jsonl``: per label its record, annotator,
  label (in the item's A/B order), ``w`` (the posterior that the label is correct),
  ``q`` (that A is truly better), the item's induced logit and ``flipped``
  (``w < 1/2``);
* :func:`scored_fit` - the final noise model as a :class:`~repo.fit.NoiseFit` of the
  ``scored`` format: the labels with the final policy's logits as fixed scores, the
  annotator parameters as trained (one exact E-step at them, no M-step), and on
  request EM's Laplace approximation at them (:mod:`repo.diagnostics` reads it).

:class:`~repo.train.run_dir.RunDir` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from repo.data.labels import EncodedLabels
from repo.data.records import PreferenceData
from repo.diagnostics.checks import identification_warnings
from repo.fit import NoiseFit, attach_posterior, summarise
from repo.inference.bayes import infer
from repo.inference.em import EM
from repo.inference.enumeration import EnumPosterior
from repo.inference.noise_test import NoiseTest
from repo.likelihoods import PreferenceLikelihood
from repo.noise import LabelData, NoiseModel
from repo.policy import ModelRecipe
from repo.scorers import FixedLogits
from repo.train.config import TrainConfig
from repo.train.dataset import BatchSchedule, TrainingData

__all__ = [
    "data_report",
    "one_annotator_profile",
    "posterior_rows",
    "reliability",
    "resolved_config",
    "scored_fit",
]


def resolved_config(
    config: TrainConfig,
    likelihood: PreferenceLikelihood,
    variant: str,
    noise: NoiseModel,
    recipe: ModelRecipe | None,
    *,
    processes: int,
    total_steps: int,
    schedule: BatchSchedule,
) -> dict[str, Any]:
    """The configuration with defaults filled in and paths made absolute, and what the
    trainer resolved from it."""
    sections = config.to_dict()
    sections["run"]["output_dir"] = str(config.output_dir)
    if sections["data"]["train"]:
        sections["data"]["train"] = str(config.path(sections["data"]["train"]))
    return {
        "config": sections,
        "likelihood": {"family": likelihood.name, "variant": variant, **likelihood.hparams()},
        "noise": {"model": noise.name, "num_annotators": noise.num_annotators},
        "recipe": None if recipe is None else recipe.name,
        "processes": processes,
        "total_steps": total_steps,
        "steps_per_epoch": schedule.steps_per_epoch,
        "global_batch": schedule.global_batch,
        # [em] train_held_out: the epoch from which batches hold the held-out items too
        "train_held_out_from": schedule.train_held_out_from,
    }


def data_report(
    records: PreferenceData, data: TrainingData, noise: NoiseModel, schedule: BatchSchedule
) -> dict[str, Any]:
    """What the data turned into, and what was dropped under which policy."""
    labels = data.labels
    report = {
        "records": len(records),
        "items": len(data.pairs),
        "labels": labels.num_labels,
        "truth_units": labels.num_units,
        "shared_truth": labels.shared_truth,
        "annotators": len(data.annotator_ids),
        "shown_order": records.shown_order,
        "skipped": data.skipped,
        "notes": data.notes,
        "units_per_epoch": schedule.steps_per_epoch * schedule.global_batch,
        "held_out_units": schedule.num_units - schedule.num_trained,  # [em] held_out
    }
    if noise.reads_position and not records.shown_order:
        report["warning"] = (
            f"the {noise.name} model reads the A/B position, but the data record no "
            "display order: A/B is a label-independent order, so its position parameters "
            "describe that order, not what annotators saw"
        )
    return report


def one_annotator_profile(
    noise: NoiseModel,
    labels: LabelData,
    first_visit: Tensor | None,
    source: str = "first_visit_logits",
) -> dict[str, Any] | None:
    """The profile likelihood of ``eta`` (:func:`~repo.inference.profile.eta_profile`)
    at per-item out-of-sample logits (NaN: not scored), the items' first-visit logits
    or the held-out items' (``source`` names them in the result), where the noise model
    describes it (:meth:`~repo.noise.base.NoiseModel.eta_profile`: the symmetric flip
    with one annotator and per-label truth); else ``None``."""
    if first_visit is None:
        return None
    profile = noise.eta_profile(first_visit, labels)
    return None if profile is None else {"from": source, **profile.to_dict()}


def reliability(
    noise: NoiseModel,
    data: TrainingData,
    e_step_scale: float = 1.0,
    first_visit: Tensor | None = None,
    noise_test: NoiseTest | None = None,
    e_step: dict[str, Any] | None = None,
    first_visit_scale: float | None = None,
    held_out: Tensor | None = None,
    held_out_scale: float | None = None,
    cross_fit: Tensor | None = None,
) -> dict[str, Any]:
    """Per annotator: label count and the noise model's parameters; the population's;
    the E-step's logit scale ``a`` (``1 / T``, or learned with ``[em] calibrate``);
    ``e_step``, the E-step settings the run resolved ``[em]``'s ``"auto"`` fields to
    (:class:`~repo.train.build.EStepSettings`: where the reliabilities were learned
    from), when given; the Platt scale of the first-visit refit (``first_visit_scale``,
    :attr:`~repo.inference.online.OnlineEM.out_of_sample_scale`), when there was one;
    the number of held-out items and the Platt scale of their refit (``held_out``, the
    logits of their last refit, NaN elsewhere; ``held_out_scale``), when there were any;
    the noise test's last look (``noise_test``: whether the posterior reached the
    policy; :mod:`~repo.inference.noise_test`), when there was one;
    with one annotator, :func:`one_annotator_profile` at ``held_out`` when given, else
    at ``cross_fit`` (the cross-fitted scores the E-step read) when given, else at
    ``first_visit``, and the
    ``warnings`` of :func:`~repo.diagnostics.checks.identification_warnings` on it."""
    counts = data.label_counts()
    params = noise.annotator_parameters()
    report = {
        "model": noise.name,
        "annotators": [
            {
                "id": a,
                "n_labels": int(counts[k]),
                **{name: float(v[k]) for name, v in params.items()},
            }
            for k, a in enumerate(data.annotator_ids)
        ],
        "population": {k: float(v) for k, v in noise.population_parameters().items()},
        "e_step_scale": float(e_step_scale),
    }
    if e_step is not None:
        report["e_step"] = dict(e_step)
    if first_visit_scale is not None:
        report["first_visit_scale"] = float(first_visit_scale)
    if held_out is not None:
        report["held_out_items"] = int((~torch.isnan(held_out)).sum())
    if held_out_scale is not None:
        report["held_out_scale"] = float(held_out_scale)
    if noise_test is not None:
        report["noise_test"] = noise_test.to_dict()
    if held_out is not None:
        profile = one_annotator_profile(noise, data.labels, held_out, "held_out_logits")
    elif cross_fit is not None:
        profile = one_annotator_profile(noise, data.labels, cross_fit, "cross_fit_logits")
    else:
        profile = one_annotator_profile(noise, data.labels, first_visit)
    if profile is not None:
        report["eta_profile"] = profile
        eta = float(params["eta"][0])
        found = identification_warnings(profile, eta, data.annotator_ids[0])
        report["warnings"] = [w.to_dict() for w in found]
    return report


def posterior_rows(
    noise: NoiseModel, data: TrainingData, unit_logits: Tensor, posterior: EnumPosterior
) -> list[dict[str, Any]]:
    """Per label (see the module docstring), from the exact E-step ``posterior`` at the
    units' logits ``unit_logits``."""
    labels = data.labels
    w = labels.flat(noise.label_correct(unit_logits, labels, posterior.marginals))
    q_unit = noise.truth_posterior(unit_logits, posterior.marginals)
    q = labels.flat(q_unit.unsqueeze(-1).expand_as(labels.label))
    logit = labels.flat(unit_logits.unsqueeze(-1).expand_as(labels.label))
    annotator = labels.flat(labels.annotator)
    label = labels.flat(labels.label)
    rows = []
    for j in range(labels.num_labels):
        n = int(data.label_record[j])
        record = data.records[n]
        rows.append(
            {
                "record": n,
                "row": record.row,
                "item": record.item,
                "annotator": data.annotator_ids[int(annotator[j])],
                "label": int(label[j]),
                "w": float(w[j]),
                "q": float(q[j]),
                "logit": float(logit[j]),
                "flipped": bool(w[j] < 0.5),
            }
        )
    return rows


def scored_fit(
    noise: NoiseModel,
    rows: Sequence[dict[str, Any]],
    annotator_ids: Sequence[str],
    *,
    shared_truth: bool,
    prior: str | None = None,
    posterior: bool = False,
) -> NoiseFit:
    """The trained noise model as a :class:`~repo.fit.NoiseFit` (``scored`` format).

    :param noise: the noise model at its trained parameters (left as it is).
    :param rows: per label, in the order of :func:`posterior_rows`: ``annotator``,
        ``item``, ``label`` (1: A preferred), ``logit`` (the item's induced logit
        under the final policy) and ``row`` (the source row).
    :param annotator_ids: the run's annotator ids (the noise model's index order).
    :param shared_truth: the labels of one item share one truth.
    :param prior: ``[noise] prior`` as written in the configuration.
    :param posterior: attach EM's Laplace approximation at the trained parameters
        (intervals, draws for :meth:`~repo.fit.NoiseFit.to_inference_data`).
    """
    code = {a: k for k, a in enumerate(annotator_ids)}
    unknown = sorted({str(r["annotator"]) for r in rows} - set(code))
    if unknown:
        raise ValueError(f"labels of annotators the run does not know: {unknown[:3]}")
    item_ids: list[str] = []
    item_code: dict[str, int] = {}
    for r in rows:  # items numbered in order of first appearance: the run's unit order
        item_code.setdefault(str(r["item"]), len(item_ids))
        if len(item_code) > len(item_ids):
            item_ids.append(str(r["item"]))
    annotator = np.array([code[str(r["annotator"])] for r in rows], dtype=np.int64)
    item = np.array([item_code[str(r["item"])] for r in rows], dtype=np.int64)
    label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    score = np.array([float(r["logit"]) for r in rows], dtype=np.float64)
    item_logits = np.zeros(len(item_ids))
    item_logits[item] = score
    encoded = EncodedLabels(
        format="scored",
        annotator=annotator,
        annotator_ids=list(annotator_ids),
        label=label,
        row=np.array([int(r["row"]) for r in rows], dtype=np.int64),
        item=item,
        item_ids=item_ids,
        score=score,
    )
    data = LabelData.from_labels(
        torch.as_tensor(annotator),
        torch.as_tensor(label),
        torch.as_tensor(item),
        shared_truth=shared_truth,
        num_annotators=len(annotator_ids),
    )
    scorer = FixedLogits(torch.as_tensor(item_logits))
    result = EM(noise, scorer, data).fit(max_iter=1)  # the E-step at these parameters only
    fit = summarise(noise, scorer, data, encoded, result, prior=prior)
    if posterior:
        fit = attach_posterior(fit, infer("em", noise, scorer, data), encoded)
    fit.inference["estimate"] = "online-em"  # trained, not refitted
    return fit
