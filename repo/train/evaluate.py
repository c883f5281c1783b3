r"""Held-out evaluation of a policy's implicit preference model (``re-po eval``).

For every labelled pair the loss family's induced logit
:math:`s = \mathrm{logit}\,p(A \succ^* B)` under the trained policy (and its
reference) is compared with the label :math:`o` (1: A preferred):

* ``accuracy``: share of labels whose chosen response has the higher implicit
  reward, :math:`\mathrm{sign}(s) = 2o - 1` (TRL's ``rewards/accuracies``);
  ``ties`` (:math:`s = 0`, e.g. an untrained policy) count as wrong and are
  reported;
* ``margin``: mean reward of the chosen minus the rejected response (TRL's
  ``rewards/margins``);
* calibration of :math:`p = \sigma(s)` against :math:`o`: ``log_loss``
  (:math:`-\log p(o)`), ``brier`` (:math:`(p - o)^2`) and ``ece`` (expected
  calibration error over ``bins`` equal-width bins of :math:`p`:
  :math:`\sum_b (n_b / N) |\bar p_b - \bar o_b|`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repo.data.records import PreferenceData
from repo.likelihoods import PreferenceLikelihood
from repo.policy import PairTokenizer, Policy, ReferenceLogps, batch_to
from repo.train.build import (
    build_pair_tokenizer,
    build_reference_cache,
    build_trained_policy,
    check_settings,
    load_records,
    model_recipe,
)
from repo.train.config import TrainConfig
from repo.train.dataset import TrainingData
from repo.train.run_dir import RunDir

__all__ = [
    "calibration",
    "evaluate_policy",
    "evaluate_records",
    "evaluate_run",
    "item_scores",
    "label_metrics",
    "load_run",
]


@torch.no_grad()
def item_scores(
    policy: Policy,
    likelihood: PreferenceLikelihood,
    data: TrainingData,
    *,
    batch_size: int = 16,
    reference: ReferenceLogps | None = None,
    items: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Induced logit and rewards of A and B for every item: three ``(I,)`` float64 tensors
    (with ``items``, of those item positions alone, in their order).

    Reference log-probs (when the family needs them) come from ``reference``
    (precomputed for ``data``, e.g. by :class:`~repo.policy.ReferenceCache`) or else
    from the policy's reference (the adapter disabled).
    """
    pairs = data.pairs if items is None else [data.pairs[i] for i in items]
    was_training = policy.lm.training
    policy.lm.eval()
    logits, reward_a, reward_b = [], [], []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = batch_to(policy.collate(chunk, data.pad_token_id), policy.device)
            ref = None
            if likelihood.needs_reference:
                ref = (
                    reference.for_batch(batch)
                    if reference is not None
                    else policy.reference_logps(batch)
                )
            stats = policy(batch).to_stats(ref)
            ra, rb = likelihood.rewards(stats)
            logits.append(likelihood.logits(stats).double().cpu())
            reward_a.append(ra.double().cpu())
            reward_b.append(rb.double().cpu())
    finally:
        policy.lm.train(was_training)
    return torch.cat(logits), torch.cat(reward_a), torch.cat(reward_b)


def calibration(p: Tensor, o: Tensor, bins: int = 10) -> dict[str, float]:
    """``log_loss``, ``brier`` and ``ece`` of probabilities ``p`` for outcomes ``o``."""
    p = p.double().clamp(1e-12, 1 - 1e-12)
    o = o.double()
    log_loss = -(o * p.log() + (1 - o) * (1 - p).log()).mean()
    brier = ((p - o) ** 2).mean()
    index = (p * bins).long().clamp(max=bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        inside = index == b
        if inside.any():
            ece = ece + inside.double().mean() * (p[inside].mean() - o[inside].mean()).abs()
    return {"log_loss": float(log_loss), "brier": float(brier), "ece": float(ece)}


def evaluate_policy(
    policy: Policy,
    likelihood: PreferenceLikelihood,
    data: TrainingData,
    *,
    batch_size: int = 16,
    bins: int = 10,
    reference: ReferenceLogps | None = None,
) -> dict[str, Any]:
    """Accuracy, margin and calibration of the policy on the labels of ``data``
    (``reference``: precomputed reference log-probs, see :func:`item_scores`)."""
    logits, reward_a, reward_b = item_scores(
        policy, likelihood, data, batch_size=batch_size, reference=reference
    )
    return label_metrics(data, logits, reward_a, reward_b, bins=bins)


def label_metrics(
    data: TrainingData, logits: Tensor, reward_a: Tensor, reward_b: Tensor, *, bins: int = 10
) -> dict[str, Any]:
    """Accuracy, margin and calibration (the module docstring) of the labels of ``data``
    from every item's induced logit and rewards (``(I,)`` each, as
    :func:`item_scores` gives them)."""
    labels = data.labels
    item = labels.flat(labels.unit.unsqueeze(-1).expand_as(labels.label))
    o = labels.flat(labels.label)
    s = logits[item]
    chose_a = o > 0.5
    signed = torch.where(chose_a, s, -s)
    chosen = torch.where(chose_a, reward_a[item], reward_b[item])
    rejected = torch.where(chose_a, reward_b[item], reward_a[item])
    return {
        "labels": int(o.numel()),
        "items": len(data.pairs),
        "accuracy": float((signed > 0).double().mean()),
        "ties": float((signed == 0).double().mean()),
        "margin": float((chosen - rejected).mean()),
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        **calibration(torch.sigmoid(s), o, bins),
    }


def evaluate_records(
    config: TrainConfig,
    policy: Policy,
    likelihood: PreferenceLikelihood,
    pair_tokenizer: PairTokenizer,
    records: PreferenceData,
    *,
    bins: int = 10,
) -> dict[str, Any]:
    """:func:`evaluate_policy` on ``records``, tokenised by ``pair_tokenizer``, in
    batches of ``[optim] batch_size``; reference log-probs through the run's cache
    (:func:`~repo.train.build.build_reference_cache`) when the family needs them and
    ``[model] reference = "precompute"``."""
    data = TrainingData.build(records, pair_tokenizer)
    reference = None
    if likelihood.needs_reference and config.model.reference == "precompute":
        reference = build_reference_cache(config).get_or_compute(
            policy, data.pairs, batch_size=config.optim.batch_size, progress=False
        )
    return evaluate_policy(
        policy, likelihood, data, batch_size=config.optim.batch_size, bins=bins, reference=reference
    )


def load_run(run_dir: str | os.PathLike) -> tuple[TrainConfig, Policy, PreferenceLikelihood]:
    """``(config, final policy, likelihood)`` of a finished run, built as the run built
    them (:func:`repo.train.build.build_trained_policy`): LoRA runs with their adapter,
    full fine-tunes from their ``model/`` folder, each with its reference.

    :raises FileNotFoundError: not a run directory, or the run has no final policy.
    """
    run = RunDir(run_dir)
    config = run.read_config()
    likelihood, _ = check_settings(config, model_recipe(config))
    return config, build_trained_policy(config, run), likelihood


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 16,
    bins: int = 10,
    split: str | None = None,
) -> dict[str, Any]:
    """``re-po eval``: the run's final policy on the labelled pairs of ``data``.

    ``data`` is a file, a data set folder or a data set name (read by
    ``datasets.load_dataset``; ``split``, default the run's ``[data] eval_split``), read
    with the run's ``[data]`` settings (format, columns, policies), and every row is
    checked before the model loads.
    """
    run = RunDir(run_dir)
    config = run.read_config().replace("data", max_records=0)  # a training subset only
    likelihood, _ = check_settings(config, model_recipe(config))
    source = str(Path(data).resolve()) if Path(data).exists() else str(data)
    split = split if split is not None else config.data.eval_split
    records = load_records(config, source=source, split=split, field="eval")
    policy = build_trained_policy(config, run)
    pairs = TrainingData.build(records, build_pair_tokenizer(config, policy))
    result = evaluate_policy(policy, likelihood, pairs, batch_size=batch_size, bins=bins)
    result["skipped"] = pairs.skipped
    result["run"] = str(run.path.resolve())
    result["data"] = source
    return result
