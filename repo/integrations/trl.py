r"""RE-PO inside TRL: ``REDPOTrainer`` (TRL's ``DPOTrainer``) and ``RECPOTrainer``
(TRL's ``CPOTrainer``, SimPO included through ``loss_type="simpo"``).

For the engineer who trains with TRL and wants noise-robust preference optimisation
without leaving it. Everything TRL does stays TRL's: the model and PEFT set-up, the
reference (a separate model, the adapter disabled, or precomputed log-probs), the
optimizer and schedule, gradient accumulation, several processes, logging,
evaluation and checkpoints. re-po adds the E-step, the posterior-weighted loss and
the annotator M-step, each the one re-po's own trainer runs
(:mod:`repo.train.trainer`):

1. **Data.** The training set keeps TRL's columns (``prompt``/``chosen``/``rejected``,
   text or chat messages) plus an annotator column and, optionally, an item and a
   position column. It is read by re-po's loader
   (:func:`repo.data.loaders.load_preferences`: validation naming row and field, the
   A/B rule, duplicate labels), tokenised by re-po's
   :class:`~repo.policy.PairTokenizer` (prompt and response tokenised apart, so no
   token merges across the boundary: TRL's "tokenized prompt is not a prefix" warning
   cannot arise, and the tokens are those of ``re-po train``) and laid out in *truth
   units* (:class:`~repo.train.TrainingData`): one row per label (the paper), or with
   ``shared_truth`` one row per item carrying all its labels (Dawid-Skene). Each row
   holds the tokenised pair in A/B order and its labels (``repo_annotator``,
   ``repo_label``, ``repo_unit``); :class:`LabelCollator` pads them beside TRL's
   collated tensors, and the signature columns keep them through
   ``remove_unused_columns``, so they reach the loss.
2. **E-step** per micro-batch on the induced logit
   :math:`s = L(B \succ A) - L(A \succ B)` of TRL's loss (for ``sigmoid``,
   :math:`\beta h`), by :class:`~repo.inference.online.OnlineEM` built as
   ``re-po train`` builds it (:func:`repo.train.build.build_online_em`): the posterior
   :math:`q = p(A \succ^* B \mid \text{labels})`, no gradient through it.
3. **Policy step** (:func:`repo.train.objective.policy_objective`), the one
   ``re-po train`` takes for the same family (``policy_step="default"``, as ``[loss]
   variant = "default"``): ``"mixture"``, the paper's posterior-weighted loss
   :math:`q\,L(A \succ B) + (1 - q)\,L(B \succ A)`, i.e. per label
   :math:`w\,\ell(y) + (1 - w)\,\ell(\text{flipped})` with :math:`w` the posterior
   that the label is right and :math:`L` TRL's own per-pair loss; or ``"nll"``, the
   gradient of the noise model's marginal likelihood (the only step for the Boltzmann
   model, which has no latent truth). The default is ``"nll"`` for a likelihood-style
   loss (DPO's ``sigmoid``, where the two coincide), for CPO's ``sigmoid`` loss (the
   paper's literal RE-CPO, without the behaviour-cloning term once the posterior is on:
   :class:`~repo.likelihoods.CPOLikelihood`) and for ``simpo`` without ``cpo_alpha``
   (:class:`~repo.likelihoods.SimPOLikelihood`: the mixture with SimPO's margin can
   train the policy away from its labels), ``"mixture"`` otherwise (IPO, hinge, ...).
   Until the noise test finds noise, every step is TRL's loss on the labels as given.
4. **M-step** once per optimizer step (a ``TrainerCallback``'s ``on_step_end``, after
   gradient accumulation): the step's sufficient statistics all-reduced over
   processes through TRL's ``accelerator``, then the damped update. Every process
   holds the same annotator parameters.
5. **State.** The online EM's state (noise-model parameters, E-step scale, running
   statistics), the annotator ids and the latest posterior of every training label
   are written into each TRL checkpoint (``repo_em.safetensors``, ``repo_em.json``)
   and into the final ``save_model`` folder, and restored by
   ``train(resume_from_checkpoint=...)``. The annotator parameters are logged through
   TRL's ``log`` (``eta/<annotator>``, ...) beside the posterior's ``w/mean``.

Supported: every noise model of :data:`repo.noise.NOISE_MODELS`, per-label or shared
truth, and of TRL's DPO losses those that score one pair (``sigmoid``, ``hinge``,
``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``,
``apo_zero``, ``apo_down``, ``discopop``, ``sigmoid_norm``; several with
``loss_weights``; every ``f_divergence_type``); of CPO's, ``sigmoid``, ``hinge``,
``ipo`` and ``simpo`` with ``cpo_alpha``, ``label_smoothing`` and AlphaPO's
``alpha``. Not supported (an error says so): ``aot``/``aot_unpaired`` (they sort the
batch, so there is no per-pair loss to flip), ``sft``, ``ld_alpha``,
``use_weighting``, vision-language data. One deliberate difference from TRL: CPO's
behaviour-cloning term is per pair (the mean token NLL of each pair's preferred
response, averaged over pairs), where TRL averages over every chosen token of the
batch; the two agree when the responses have one length, and a per-pair term is what
a per-pair weight needs.

Tested with TRL 1.16. ``REDPOTrainer`` overrides ``DPOTrainer._prepare_dataset`` and
``_compute_loss``, ``RECPOTrainer`` overrides ``CPOTrainer.tokenize_row`` and
``get_batch_loss_metrics``: private methods, so another TRL version may need them
adjusted (the extra pins ``trl>=1.16,<2``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    with warnings.catch_warnings():  # CPO lives in trl.experimental since TRL 1.0
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
except ImportError as error:
    raise ImportError(
        "repo.integrations.trl needs TRL, an optional extra of re-po: "
        "pip install 're-po[trl]' (or pip install 'trl>=1.16,<2')"
    ) from error

from datasets import Dataset
from safetensors.torch import load_file, save_file

from repo.data.loaders import load_preferences
from repo.inference.online import EStep
from repo.likelihoods import (
    CPOLikelihood,
    InducedLikelihood,
    PairLogps,
    PreferenceLikelihood,
    SimPOLikelihood,
)
from repo.noise import NOISE_MODELS, LabelData, NoiseModel
from repo.policy import PairTokenizer
from repo.train.build import (
    EStepSettings,
    auto_cross_fit,
    build_noise,
    build_online_em,
    check_policy_variant,
    estep_settings,
    policy_variant,
)
from repo.train.config import DataSection, EMSection, LossSection, NoiseSection, TrainConfig
from repo.train.dataset import TrainingData
from repo.train.metrics import parameter_summary
from repo.train.objective import plain_loss, policy_objective

__all__ = [
    "DPO_LOSS_TYPES",
    "CPO_LOSS_TYPES",
    "LabelCollator",
    "RECPOConfig",
    "RECPOTrainer",
    "REDPOConfig",
    "REDPOTrainer",
    "REPOArguments",
    "cpo_pair_loss",
    "dpo_pair_loss",
]

#: TRL's DPO loss types that score one pair, so that the pair can be flipped.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
#: TRL's CPO loss types (all score one pair).
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")

#: the columns the unit data set adds to TRL's, and the collator passes to the loss.
LABEL_COLUMNS = ("repo_unit", "repo_annotator", "repo_label")

#: up to this many annotators each parameter is logged per annotator, else its summary.
MAX_LOGGED_ANNOTATORS = 32

STATE_TENSORS = "repo_em.safetensors"
STATE_JSON = "repo_em.json"


# ----------------------------------------------------------------------------- arguments


AUTO_BOOL: dict[object, str | bool] = {
    "auto": "auto",
    "true": True,
    "false": False,
    True: True,
    False: False,
}
"""The values of the ``"auto" | true | false`` fields, as command-line strings or Python
values, and the ``[em]`` value each stands for."""


@dataclass
class REPOArguments:
    """RE-PO's fields of :class:`REDPOConfig` and :class:`RECPOConfig`: the data columns,
    the noise model and the online EM, with the meaning of ``re-po train``'s ``[data]``,
    ``[noise]`` and ``[em]`` fields of the same names (``docs/config.md``)."""

    annotator_column: str | None = field(
        default="annotator",
        metadata={"help": "annotator-id column; None: one annotator for every label"},
    )
    item_column: str | None = field(
        default=None,
        metadata={"help": "item-id column: rows of one item are labels of one comparison"},
    )
    position_column: str | None = field(
        default=None,
        metadata={
            "help": "column saying whether chosen was shown first (bool or 0/1); None: A/B "
            "is a label-independent order"
        },
    )
    shared_truth: bool = field(
        default=False,
        metadata={"help": "the labels of one item share one latent truth (Dawid-Skene)"},
    )
    noise_model: str = field(
        default="symmetric",
        metadata={"help": "symmetric | two-coin | hierarchical | spammer | boltzmann"},
    )
    noise_prior: str = field(
        default="none",
        metadata={"help": "'beta:A,B': a Beta prior on the reliabilities (MAP-EM), or 'none'"},
    )
    eta_init: float = field(default=0.9, metadata={"help": "initial reliability, in (0, 1)"})
    em_alpha: float = field(
        default=0.1, metadata={"help": "EMA rate of the annotator update, in (0, 1]"}
    )
    em_temperature: float = field(
        default=0.0,
        metadata={
            "help": "E-step logits are divided by this (> 0; 0: the loss's default: 1, CPO's 50)"
        },
    )
    em_warmup_steps: int = field(
        default=0, metadata={"help": "optimizer steps with w fixed at the prior reliability"}
    )
    em_calibrate: str = field(
        default="auto",
        metadata={
            "help": "learn the E-step's logit scale by EM: 'true', 'false' or 'auto' (for "
            "losses that are not likelihood-style: every loss type but DPO's sigmoid)"
        },
    )
    em_policy_calibrate: str = field(
        default="auto",
        metadata={
            "help": "with em_calibrate: the policy step's posterior reads the learned scale "
            "too; 'false': it reads s / temperature while the annotator parameters read the "
            "learned scale; 'true', 'false' or 'auto' (false with the 'nll' step on DPO's or "
            "SimPO's logit in one epoch)"
        },
    )
    em_out_of_sample: str = field(
        default="auto",
        metadata={
            "help": "learn the annotator parameters from each unit's first visit only and "
            "refit them on those logits after every epoch: 'true', 'false' or 'auto' (with "
            "one annotator and DPO's sigmoid loss)"
        },
    )
    em_epoch_m_step: str = field(
        default="auto",
        metadata={
            "help": "after every epoch, refit the annotator parameters by EM on the scores "
            "the epoch's E-steps read: 'true', 'false' or 'auto' (with several annotators)"
        },
    )
    em_noise_test: float = field(
        default=0.05,
        metadata={
            "help": "level of the test of 'no label is wrong' on each pass's scores that "
            "switches the posterior on (until then w = 1: the plain loss); 0: no test"
        },
    )
    noise_lr: float = field(
        default=0.05, metadata={"help": "Adam step of gradient M-steps (boltzmann)"}
    )
    policy_step: str = field(
        default="default",
        metadata={
            "help": "'mixture': w L(y) + (1 - w) L(flipped) (the paper); 'nll': the gradient "
            "of the marginal likelihood (required by boltzmann); 'weighted': w L(y), a "
            "doubtful label left out, never reversed; 'default': the loss's own, "
            "as [loss] variant = 'default' (nll for DPO's and CPO's sigmoid loss, mixture for "
            "the others)"
        },
    )

    def check_repo_arguments(self) -> None:
        """Range checks; a bad value is a ``ValueError`` naming the field."""
        name = type(self).__name__
        checks = [
            ("noise_model", self.noise_model in NOISE_MODELS, f"one of {', '.join(NOISE_MODELS)}"),
            ("eta_init", 0 < self.eta_init < 1, "in (0, 1)"),
            ("em_alpha", 0 < self.em_alpha <= 1, "in (0, 1]"),
            ("em_temperature", self.em_temperature >= 0, ">= 0 (0: the loss's default)"),
            ("em_calibrate", self.em_calibrate in AUTO_BOOL, "'auto', 'true' or 'false'"),
            (
                "em_policy_calibrate",
                self.em_policy_calibrate in AUTO_BOOL,
                "'auto', 'true' or 'false'",
            ),
            ("em_out_of_sample", self.em_out_of_sample in AUTO_BOOL, "'auto', 'true' or 'false'"),
            ("em_epoch_m_step", self.em_epoch_m_step in AUTO_BOOL, "'auto', 'true' or 'false'"),
            ("em_warmup_steps", self.em_warmup_steps >= 0, ">= 0"),
            ("em_noise_test", 0 <= self.em_noise_test < 1, "in [0, 1) (0: no test)"),
            ("noise_lr", self.noise_lr > 0, "> 0"),
            (
                "policy_step",
                self.policy_step in ("default", "mixture", "nll", "weighted"),
                "'default', 'mixture', 'nll' or 'weighted'",
            ),
        ]
        for field_name, ok, rule in checks:
            if not ok:
                value = getattr(self, field_name)
                raise ValueError(f"{name}.{field_name} must be {rule}, got {value!r}")
        if self.shared_truth and not self.item_column:
            raise ValueError(f"{name}.shared_truth needs item_column (the item-id column)")
        if self.policy_step != "default":  # the default is known with the trainer's loss
            check_policy_variant(
                NOISE_MODELS[self.noise_model], self.policy_step, f"{name}.policy_step"
            )

    def repo_config(self) -> TrainConfig:
        """The ``[data]``, ``[noise]`` and ``[em]`` sections and ``[loss] variant`` of
        ``re-po train`` these fields stand for (the other fields at their defaults)."""
        return TrainConfig(
            data=DataSection(shared_truth=self.shared_truth),
            loss=LossSection(variant=self.policy_step),
            noise=NoiseSection(
                model=self.noise_model, prior=self.noise_prior, eta_init=self.eta_init
            ),
            em=EMSection(
                alpha=self.em_alpha,
                temperature=self.em_temperature,
                warmup_steps=self.em_warmup_steps,
                calibrate=AUTO_BOOL[self.em_calibrate],
                policy_calibrate=AUTO_BOOL[self.em_policy_calibrate],
                out_of_sample=AUTO_BOOL[self.em_out_of_sample],
                epoch_m_step=AUTO_BOOL[self.em_epoch_m_step],
                held_out=False,  # TRL's loop trains on every row it is given
                cross_fit=False,  # TRL's loop trains one policy: no folds' scorers
                noise_test=self.em_noise_test,
                noise_lr=self.noise_lr,
            ),
        )


@dataclass
class REDPOConfig(DPOConfig, REPOArguments):
    """TRL's ``DPOConfig`` with RE-PO's fields (:class:`REPOArguments`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_repo_arguments()


@dataclass
class RECPOConfig(CPOConfig, REPOArguments):
    """TRL's ``CPOConfig`` with RE-PO's fields (:class:`REPOArguments`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_repo_arguments()


# ----------------------------------------------------------------------------- losses


def _f_score(log_ratio: Tensor, kind: str, coef: float) -> Tensor:
    """TRL's f-divergence score :math:`f'(\\pi/\\pi_{ref})` of a log-ratio."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(coef - 1.0) < 1e-6):
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":
        t = torch.clamp((coef - 1.0) * log_ratio.float(), max=80.0)
        return ((torch.exp(t) - 1.0) / (coef - 1.0)).to(log_ratio.dtype)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def dpo_pair_loss(stats: PairLogps, args: DPOConfig) -> Tensor:
    r"""TRL's DPO loss of "A preferred" per pair, :math:`L(A \succ B)`, shape ``(B,)``.

    The per-sequence losses of ``DPOTrainer._compute_loss`` (TRL 1.16) with chosen = A
    and rejected = B, summed over ``args.loss_type`` with ``args.loss_weights``; the
    mean over pairs is TRL's loss. ``stats`` holds summed completion log-probs,
    completion token counts (``ipo`` and ``sigmoid_norm`` average over them) and the
    reference log-probs.
    """
    beta, smoothing = args.beta, args.label_smoothing
    ratio_a, ratio_b = stats.log_ratio_a, stats.log_ratio_b
    score_a = _f_score(ratio_a, args.f_divergence_type, args.f_alpha_divergence_coef)
    score_b = _f_score(ratio_b, args.f_divergence_type, args.f_alpha_divergence_coef)
    delta = score_a - score_b
    length_a, length_b = stats.length_a.clamp(min=1.0), stats.length_b.clamp(min=1.0)
    weights = args.loss_weights or [1.0] * len(args.loss_type)
    total = torch.zeros_like(delta)
    for loss_type, weight in zip(args.loss_type, weights, strict=True):
        x = beta * delta
        if loss_type == "sigmoid":
            loss = -F.logsigmoid(x)
        elif loss_type == "hinge":
            loss = torch.relu(1 - x)
        elif loss_type == "ipo":
            loss = (score_a / length_a - score_b / length_b - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            eps = torch.tensor(smoothing, dtype=x.dtype, device=x.device)
            loss = torch.sigmoid(x) * (F.logsigmoid(x) - torch.log1p(-eps)) + torch.sigmoid(-x) * (
                F.logsigmoid(-x) - torch.log(eps)
            )
        elif loss_type == "nca_pair":
            ra, rb = beta * ratio_a, beta * ratio_b
            loss = -F.logsigmoid(ra) - 0.5 * F.logsigmoid(-ra) - 0.5 * F.logsigmoid(-rb)
        elif loss_type == "robust":
            loss = (-(1 - smoothing) * F.logsigmoid(x) + smoothing * F.logsigmoid(-x)) / (
                1 - 2 * smoothing
            )
        elif loss_type == "bco_pair":
            loss = -F.logsigmoid(beta * ratio_a) - F.logsigmoid(-beta * ratio_b)
        elif loss_type == "sppo_hard":
            loss = (ratio_a - 0.5 / beta) ** 2 + (ratio_b + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            loss = 1 - torch.sigmoid(beta * ratio_a) + torch.sigmoid(beta * ratio_b)
        elif loss_type == "apo_down":
            loss = torch.sigmoid(beta * ratio_a) + 1 - torch.sigmoid(beta * (ratio_a - ratio_b))
        elif loss_type == "discopop":
            mix = torch.sigmoid(x / args.discopop_tau)
            loss = -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix
        elif loss_type == "sigmoid_norm":
            loss = -F.logsigmoid(beta * (score_a / length_a - score_b / length_b))
        else:
            raise ValueError(
                f"REDPOTrainer: loss_type {loss_type!r} has no per-pair loss to flip; "
                f"supported: {', '.join(DPO_LOSS_TYPES)}"
            )
        total = total + weight * loss
    return total


def cpo_pair_loss(stats: PairLogps, trainer: CPOTrainer) -> Tensor:
    r"""TRL's CPO (or SimPO) loss of "A preferred" per pair, :math:`L(A \succ B)`.

    The preference term is TRL's own ``CPOTrainer.cpo_loss`` on A's and B's log-probs
    (summed, or averaged over tokens for ``ipo`` and ``simpo``, as TRL takes them);
    ``cpo_alpha`` times the mean token NLL of A is added (the behaviour-cloning term,
    per pair; see the module docstring).
    """
    if trainer.loss_type in ("ipo", "simpo"):
        logps_a, logps_b = stats.policy_mean_a, stats.policy_mean_b
    else:
        logps_a, logps_b = stats.policy_a, stats.policy_b
    loss, _, _ = trainer.cpo_loss(logps_a, logps_b)
    if trainer.cpo_alpha:
        loss = loss + trainer.cpo_alpha * (-stats.policy_mean_a)
    return loss


# ----------------------------------------------------------------------------- data


@dataclass
class LabelCollator:
    """A preference collator that also passes each unit's labels to the loss.

    ``inner`` (TRL's collator) collates the tokenised pairs; the label columns are
    taken off before it sees the examples and added to its output as tensors:
    ``repo_unit`` ``(U,)``, ``repo_annotator`` ``(U, S)`` (0 on padding),
    ``repo_label`` ``(U, S)`` (1: A preferred) and ``repo_mask`` ``(U, S)``.
    """

    inner: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        plain = [{k: v for k, v in e.items() if k not in LABEL_COLUMNS} for e in examples]
        batch = self.inner(plain)
        batch.update(collate_labels(examples))
        return batch


def collate_labels(examples: list[Mapping[str, Any]]) -> dict[str, Tensor]:
    """The label columns of ``examples`` padded to the batch's most labels per unit."""
    slots = max(len(e["repo_annotator"]) for e in examples)
    annotator = torch.zeros(len(examples), slots, dtype=torch.long)
    label = torch.zeros(len(examples), slots, dtype=torch.float64)
    mask = torch.zeros(len(examples), slots, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["repo_annotator"])
        annotator[i, :n] = torch.as_tensor(e["repo_annotator"], dtype=torch.long)
        label[i, :n] = torch.as_tensor(e["repo_label"], dtype=torch.float64)
        mask[i, :n] = True
    unit = torch.as_tensor([int(e["repo_unit"]) for e in examples], dtype=torch.long)
    return {"repo_unit": unit, "repo_annotator": annotator, "repo_label": label, "repo_mask": mask}


def batch_labels(inputs: dict[str, Any], num_annotators: int, shared_truth: bool) -> LabelData:
    """The :class:`~repo.noise.LabelData` of a collated batch (taken off ``inputs``)."""
    mask = inputs.pop("repo_mask").cpu()
    slot = torch.cumsum(mask.reshape(-1).long(), 0).reshape(mask.shape) - 1
    return LabelData(
        unit=inputs.pop("repo_unit").cpu(),
        annotator=inputs.pop("repo_annotator").cpu(),
        label=inputs.pop("repo_label").cpu().double(),
        mask=mask,
        row=torch.where(mask, slot, torch.full_like(slot, -1)),
        num_annotators=num_annotators,
        shared_truth=shared_truth,
    )


def unit_rows(data: TrainingData) -> dict[str, list]:
    """One row per truth unit of ``data``: the item's token ids in A/B order (TRL's
    ``prompt_ids``/``chosen_ids``/``rejected_ids``; "chosen" is A) and the unit's labels."""
    labels = data.labels
    columns: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    columns.update({k: [] for k in LABEL_COLUMNS})
    for u in range(labels.num_units):
        pair = data.pairs[int(labels.unit[u])]
        keep = labels.mask[u]
        columns["prompt_ids"].append(list(pair.prompt_ids))
        columns["chosen_ids"].append(list(pair.response_a_ids))
        columns["rejected_ids"].append(list(pair.response_b_ids))
        columns["repo_unit"].append(u)
        columns["repo_annotator"].append(labels.annotator[u][keep].tolist())
        columns["repo_label"].append(labels.label[u][keep].tolist())
    return columns


def cpo_rows(columns: dict[str, list]) -> dict[str, list]:
    """:func:`unit_rows` in the layout of TRL's CPO collator (``prompt_input_ids``,
    ``chosen_input_ids``, ``chosen_labels`` with the prompt at -100, ...)."""
    out: dict[str, list] = {k: columns[k] for k in LABEL_COLUMNS}
    prompts = columns["prompt_ids"]
    out["prompt_input_ids"] = prompts
    out["prompt_attention_mask"] = [[1] * len(p) for p in prompts]
    for side in ("chosen", "rejected"):
        ids = [p + r for p, r in zip(prompts, columns[f"{side}_ids"], strict=True)]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [[1] * len(x) for x in ids]
        out[f"{side}_labels"] = [
            [-100] * len(p) + r for p, r in zip(prompts, columns[f"{side}_ids"], strict=True)
        ]
    return out


# ----------------------------------------------------------------------------- the mixin


class _AnnotatorMStep(TrainerCallback):
    """The annotator M-step once per optimizer step (TRL calls ``on_step_end`` after the
    optimizer step, once per gradient-accumulation cycle)."""

    def __init__(self, trainer: _REPOTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.online_em.m_step(self.trainer.reduce_sum)

    def on_epoch_end(self, args, state, control, **kwargs):
        """The annotator refit of the pass (:meth:`~repo.inference.online.OnlineEM.end_pass`:
        on the first-visit logits with out-of-sample statistics, on the pass's logits with
        ``[em] epoch_m_step``)."""
        self.trainer.online_em.end_pass(state.global_step, self.trainer.reduce_sum)


class _REPOTrainerMixin:
    """What :class:`REDPOTrainer` and :class:`RECPOTrainer` add to their TRL trainer."""

    likelihood: PreferenceLikelihood
    noise: NoiseModel
    estep: EStepSettings  # the E-step's fields, "auto" resolved for the data and epochs
    policy_step: str  # "nll", "mixture" or "weighted": ``policy_step`` resolved against the loss
    repo_data: TrainingData | None = None
    _repo_args: REPOArguments

    # -- data ---------------------------------------------------------------------
    def _pair_tokenizer(self, tokenizer: Any, args: Any) -> PairTokenizer:
        max_length = args.max_length or 1024
        return PairTokenizer(tokenizer, max_length, min_response_tokens=min(16, max_length - 1))

    def _training_units(self, dataset: Any, tokenizer: Any, name: str) -> dict[str, list]:
        """Read, validate, tokenise and lay out ``dataset`` in truth units (module
        docstring). The training set fixes the annotators; an evaluation set needs TRL's
        columns only (one label per row, one annotator for every label): its loss is
        TRL's on the observed labels, which does not depend on the A/B order."""
        a = self._repo_args
        train = name == "train"
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"{type(self).__name__}: the {name} data set must be a datasets.Dataset "
                f"(streaming data sets are not supported), got {type(dataset).__name__}"
            )
        records = load_preferences(
            dataset,
            annotator_column=a.annotator_column if train else None,
            item_column=a.item_column if train else None,
            position_column=a.position_column if train else None,
        )
        data = TrainingData.build(
            records,
            self._pair_tokenizer(tokenizer, a),
            shared_truth=a.shared_truth and train,
        )
        if train:
            self.repo_data = data
        return unit_rows(data)

    def _setup_repo(self) -> None:
        """The noise model and the online EM for the training set's annotators."""
        config = self._repo_args.repo_config()
        self.noise = build_noise(config, self.repo_data)
        self.policy_step = policy_variant(config, self.likelihood)
        check_policy_variant(
            self.noise, self.policy_step, f"{type(self._repo_args).__name__}.policy_step"
        )
        labels = self.repo_data.labels
        passes = self._passes(labels.num_units)
        # "auto" resolved for this data and run length, as re-po train resolves it (the
        # arguments rule out held-out labels and cross-fitting, which TRL's loop lacks)
        self.estep = estep_settings(config, self.likelihood, self.noise, labels.num_units, passes)
        items = labels.num_units
        if auto_cross_fit(self.noise, self.likelihood, items, passes, variant=self.policy_step):
            warnings.warn(
                f"{type(self).__name__}: one annotator and {items} items, over "
                f"{passes} pass(es): re-po train's E-step would read cross-fitted scores here "
                "([em] cross_fit = 'auto', docs/math.md section 13), which TRL's loop, "
                "training one policy, cannot give; this E-step reads the policy's own "
                "logits, from which one annotator's eta can drift or stay unidentified "
                "(docs/training.md); re-po train cross-fits",
                stacklevel=2,
            )
        self.online_em = build_online_em(
            config,
            self.noise,
            self.likelihood,
            self.repo_data.label_counts(),
            num_items=labels.num_units,
            labels=replace(labels, unit=torch.arange(labels.num_units)),  # keyed as the E-step's
            passes=passes,
            settings=self.estep,
        )
        self._posterior_w = torch.full(labels.label.shape, float("nan"), dtype=torch.float64)
        self._posterior_step = torch.full((labels.num_units,), -1, dtype=torch.long)
        self.add_callback(_AnnotatorMStep(self))

    def _passes(self, num_units: int) -> int:
        """Passes over the training units the run makes (TRL's ``num_train_epochs``, or
        ``max_steps`` optimizer steps of ``per_device_train_batch_size`` times the
        accumulation times the processes units)."""
        args = self.args
        if args.max_steps and args.max_steps > 0:
            per_step = (
                args.per_device_train_batch_size
                * args.gradient_accumulation_steps
                * max(args.world_size, 1)
            )
            return max(math.ceil(args.max_steps * per_step / num_units), 1)
        return max(math.ceil(args.num_train_epochs), 1)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            for column in LABEL_COLUMNS:
                if column not in self._signature_columns:
                    self._signature_columns.append(column)

    # -- the loss -------------------------------------------------------------------
    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (the tensor itself with one process)."""
        if self.accelerator.num_processes == 1:
            return tensor
        out = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")
        return out.to(tensor.device)

    def _repo_loss(
        self, stats: PairLogps, labels: LabelData, training: bool
    ) -> tuple[Tensor, dict[str, float]]:
        """The policy loss of one micro-batch (mean over units) and its metrics.

        Training: E-step, then :func:`~repo.train.objective.policy_objective`.
        Evaluation: TRL's loss on the observed labels (no E-step, nothing learned).
        """
        logits = self.likelihood.logits(stats)
        estep: EStep | None = None
        if training:
            estep = self.online_em.e_step(logits, labels, step=self.state.global_step)
            loss = policy_objective(
                self.likelihood,
                self.noise,
                stats,
                logits,
                labels,
                estep,
                self.policy_step,
            )
            loss = loss / labels.num_units
            self._record_posteriors(labels.unit, estep.w)
        else:
            loss = plain_loss(self.likelihood, stats, labels) / labels.num_labels
        return loss, self._micro_metrics(logits.detach(), labels, estep)

    def _micro_metrics(
        self, logits: Tensor, labels: LabelData, estep: EStep | None
    ) -> dict[str, float]:
        """Reward margin and accuracy on the observed labels, and the posterior's
        ``w/mean`` and ``w/frac_below_0.5``; each a mean over every process's labels."""
        sign = torch.where(labels.label > 0.5, 1.0, -1.0).double()
        margin = (logits.cpu().double().unsqueeze(-1) * sign)[labels.mask]
        sums = [margin.sum(), (margin > 0).double().sum(), torch.tensor(float(margin.numel()))]
        if estep is not None:
            w = estep.w[labels.mask].double()
            sums += [w.sum(), (w < 0.5).double().sum()]
        totals = self.reduce_sum(torch.stack(sums)).tolist()
        n = max(totals[2], 1.0)
        metrics = {"rewards/margins": totals[0] / n, "rewards/accuracies": totals[1] / n}
        if estep is not None:
            metrics["w/mean"] = totals[3] / n
            metrics["w/frac_below_0.5"] = totals[4] / n
        return metrics

    def _record_posteriors(self, units: Tensor, w: Tensor) -> None:
        slots = w.shape[1]
        self._posterior_w[units, :slots] = w.double()
        self._posterior_step[units] = self.state.global_step

    # -- reading the fit --------------------------------------------------------------
    def annotator_parameters(self) -> dict[str, dict[str, float]]:
        """Each annotator parameter (``eta``, ...) by annotator id."""
        ids = self.repo_data.annotator_ids
        return {
            name: {a: float(v[k]) for k, a in enumerate(ids)}
            for name, v in self.noise.annotator_parameters().items()
        }

    def posteriors(self) -> list[dict[str, Any]]:
        """The latest E-step posterior of every training label seen so far: one row per
        label with its record, item, annotator, label (1: A preferred), ``w`` (the
        posterior that the label is right), ``flipped`` (``w < 0.5``) and the optimizer
        step of that E-step; labels not seen yet are left out."""
        data, labels = self.repo_data, self.repo_data.labels
        w, step = self._gathered_posteriors()
        flat_w = labels.flat(w)
        flat_step = labels.flat(step.unsqueeze(-1).expand_as(labels.label))
        annotator, label = labels.flat(labels.annotator), labels.flat(labels.label)
        rows = []
        for j in range(labels.num_labels):
            if int(flat_step[j]) < 0:
                continue
            record = data.records[int(data.label_record[j])]
            rows.append(
                {
                    "row": record.row,
                    "item": record.item,
                    "annotator": data.annotator_ids[int(annotator[j])],
                    "label": int(label[j]),
                    "w": float(flat_w[j]),
                    "flipped": bool(flat_w[j] < 0.5),
                    "step": int(flat_step[j]),
                }
            )
        return rows

    def _gathered_posteriors(self) -> tuple[Tensor, Tensor]:
        """The posterior table merged over processes: each unit's latest E-step."""
        if self.accelerator.num_processes == 1:
            return self._posterior_w, self._posterior_step
        device = self.accelerator.device
        steps = self.accelerator.gather(self._posterior_step.unsqueeze(0).to(device)).cpu()
        ws = self.accelerator.gather(self._posterior_w.unsqueeze(0).to(device)).cpu()
        latest = steps.argmax(0)
        units = torch.arange(steps.shape[1])
        return ws[latest, units], steps[latest, units]

    # -- logging --------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's ``log``, with the annotator parameters on every training record."""
        if "loss" in logs:
            if self.noise.num_annotators <= MAX_LOGGED_ANNOTATORS:
                for name, values in self.annotator_parameters().items():
                    logs.update({f"{name}/{a}": v for a, v in values.items()})
            else:
                logs.update(parameter_summary(self.noise.annotator_parameters()))
            logs.update({k: float(v) for k, v in self.noise.population_parameters().items()})
            logs["e_step_scale"] = float(self.online_em.scale)
            logs["noise/evident"] = float(self.online_em.noise_evident)
        super().log(logs, start_time)

    # -- state ------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's ``save_model`` (checkpoints call it too), then the RE-PO state beside the
        weights: ``repo_em.safetensors`` (the online EM's state and the posterior table)
        and ``repo_em.json`` (noise model, annotator ids, reliabilities)."""
        super().save_model(output_dir, _internal_call)
        self.save_repo_state(output_dir or self.args.output_dir)

    def save_repo_state(self, folder: str | os.PathLike) -> None:
        """Write the RE-PO state into ``folder`` (every process calls this; the main
        process writes)."""
        w, step = self._gathered_posteriors()
        em_state = self.online_em.state_dict(self.reduce_sum)  # a collective
        if not self.args.should_save:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"em.{k}": v.contiguous() for k, v in em_state.items()}
        tensors["posterior.w"] = w.contiguous()
        tensors["posterior.step"] = step.contiguous()
        save_file(tensors, str(folder / STATE_TENSORS))
        info = {
            "format": 1,
            "noise_model": self.noise.name,
            "shared_truth": self._repo_args.shared_truth,
            "annotators": self.repo_data.annotator_ids,
            "parameters": self.annotator_parameters(),
            "population": {k: float(v) for k, v in self.noise.population_parameters().items()},
            "e_step_scale": float(self.online_em.scale),
            "e_step": self.e_step_settings(),
            "global_step": int(self.state.global_step),
        }
        if self.online_em.out_of_sample_scale is not None:
            info["first_visit_scale"] = float(self.online_em.out_of_sample_scale)
        (folder / STATE_JSON).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    def e_step_settings(self) -> dict[str, Any]:
        """The E-step settings the RE-PO fields resolved to
        (:func:`~repo.train.build.estep_settings`: ``"auto"`` made concrete for this
        trainer's loss, annotators, training units and epochs), as ``reliability.json``
        of ``re-po train`` has them."""
        return self.estep._asdict()

    def load_repo_state(self, folder: str | os.PathLike) -> None:
        """Restore the RE-PO state written by :meth:`save_repo_state`.

        :raises ValueError: the folder holds the state of another noise model or other
            annotators (the message names the file).
        """
        folder = Path(folder)
        info_path = folder / STATE_JSON
        if not info_path.is_file():
            raise FileNotFoundError(
                f"{info_path}: no RE-PO state in this checkpoint (was it written by "
                f"{type(self).__name__}?)"
            )
        info = json.loads(info_path.read_text(encoding="utf-8"))
        expected = {
            "noise_model": self.noise.name,
            "shared_truth": self._repo_args.shared_truth,
            "annotators": self.repo_data.annotator_ids,
        }
        for key, value in expected.items():
            if info.get(key) != value:
                raise ValueError(
                    f"{info_path}: {key} is {info.get(key)!r} but this trainer has {value!r}"
                )
        tensors = load_file(str(folder / STATE_TENSORS))
        self.online_em.load_state_dict(
            {k[len("em.") :]: v for k, v in tensors.items() if k.startswith("em.")}
        )
        self._posterior_w = tensors["posterior.w"].clone()
        self._posterior_step = tensors["posterior.step"].clone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_repo_state(checkpoint)


def _prepare_tokenizer(processing_class: Any, args: Any, trainer: str) -> Any:
    """The tokenizer with a pad token, as TRL's trainers set it."""
    if processing_class is None or not hasattr(processing_class, "eos_token"):
        raise ValueError(
            f"{trainer} needs processing_class: the model's tokenizer (vision-language "
            "processors are not supported)"
        )
    if processing_class.pad_token is None:
        processing_class.pad_token = processing_class.eos_token
    pad_token = getattr(args, "pad_token", None)
    if pad_token:
        processing_class.pad_token = pad_token
    return processing_class


# ----------------------------------------------------------------------------- DPO


class REDPOTrainer(_REPOTrainerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with RE-PO's E-step, posterior-weighted loss and annotator
    M-step (see the module docstring).

    Arguments are ``DPOTrainer``'s; ``args`` is a :class:`REDPOConfig` (``DPOConfig``
    plus the RE-PO fields) and ``processing_class`` the tokenizer. After training,
    :meth:`annotator_parameters` gives each annotator's reliability and
    :meth:`posteriors` each label's posterior.
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: REDPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = REDPOConfig(output_dir="re-dpo")
        if not isinstance(args, REDPOConfig):
            raise TypeError(
                f"REDPOTrainer: args must be a REDPOConfig (DPOConfig plus the RE-PO fields), "
                f"got {type(args).__name__}"
            )
        self._check_dpo_args(args)
        self._repo_args = args
        tokenizer = _prepare_tokenizer(processing_class, args, "REDPOTrainer")
        if data_collator is None:
            data_collator = DataCollatorForPreference(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self.likelihood = InducedLikelihood(
            lambda stats: dpo_pair_loss(stats, args),
            needs_reference=True,
            # DPO's own loss, -log sigmoid(beta h), is the Bradley-Terry likelihood
            likelihood_style=(
                list(args.loss_type) == ["sigmoid"]
                and list(args.loss_weights or [1.0]) == [1.0]
                and not args.label_smoothing
            ),
            rewards_fn=lambda s: (args.beta * s.log_ratio_a, args.beta * s.log_ratio_b),
            name="trl-dpo:" + "+".join(args.loss_type),
        )
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=LabelCollator(data_collator),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            **kwargs,
        )
        self._setup_repo()

    @staticmethod
    def _check_dpo_args(args: REDPOConfig) -> None:
        unsupported = [t for t in args.loss_type if t not in DPO_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"REDPOConfig.loss_type {unsupported[0]!r} has no per-pair loss to flip; "
                f"supported: {', '.join(DPO_LOSS_TYPES)}"
            )
        if args.ld_alpha is not None:
            raise ValueError("REDPOConfig.ld_alpha is not supported (leave it None)")
        if args.use_weighting:
            raise ValueError("REDPOConfig.use_weighting (WPO) is not supported")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """re-po's reading, tokenisation and unit layout instead of TRL's (module docstring)."""
        return Dataset.from_dict(self._training_units(dataset, processing_class, dataset_name))

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference log-probs of a batch (the label columns set aside)."""
        inputs = {k: v for k, v in inputs.items() if not k.startswith("repo_")}
        return super().compute_ref_log_probs(model, inputs)

    def _pair_logps(self, model, inputs: dict[str, Any]) -> tuple[PairLogps, Any]:
        """Summed completion log-probs and token counts of A and B, as TRL computes them,
        with TRL's reference log-probs (precomputed, or from the reference model or the
        disabled adapter)."""
        model_kwargs = {
            k: v
            for k, v in inputs.items()
            if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        }
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.shape[1] - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        policy_a, policy_b = logps.chunk(2, dim=0)
        length_a, length_b = completion_mask.sum(dim=1).to(logps.dtype).chunk(2, dim=0)
        if self.precompute_ref_logps:
            reference = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.compute_ref_log_probs(self.model, inputs)
        stats = PairLogps(
            policy_a=policy_a,
            policy_b=policy_b,
            length_a=length_a,
            length_b=length_b,
            reference_a=reference[0].to(logps.device, logps.dtype),
            reference_b=reference[1].to(logps.device, logps.dtype),
        )
        return stats, outputs

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = batch_labels(inputs, self.noise.num_annotators, self._repo_args.shared_truth)
        stats, outputs = self._pair_logps(model, inputs)
        loss, metrics = self._repo_loss(stats, labels, training=mode == "train")
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
            self._total_train_tokens += int(tokens.item()) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:  # TRL recomputes the logits for compute_metrics, as here
            model_inputs = {"input_ids": inputs["input_ids"]}
            model_inputs["attention_mask"] = inputs["attention_mask"]
            with torch.no_grad():
                outputs = model(**model_inputs)
            return loss, outputs
        return loss


# ----------------------------------------------------------------------------- CPO


class RECPOTrainer(_REPOTrainerMixin, CPOTrainer):
    """TRL's ``CPOTrainer`` (CPO; SimPO with ``loss_type="simpo"``, ``cpo_alpha=0``)
    with RE-PO's E-step, posterior-weighted loss and annotator M-step (module
    docstring).

    Arguments are ``CPOTrainer``'s; ``args`` is a :class:`RECPOConfig` and
    ``processing_class`` the tokenizer.
    """

    def __init__(
        self,
        model: Any = None,
        args: RECPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = RECPOConfig(output_dir="re-cpo")
        if not isinstance(args, RECPOConfig):
            raise TypeError(
                f"RECPOTrainer: args must be a RECPOConfig (CPOConfig plus the RE-PO fields), "
                f"got {type(args).__name__}"
            )
        if args.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(
                f"RECPOConfig.loss_type must be one of {', '.join(CPO_LOSS_TYPES)}, "
                f"got {args.loss_type!r}"
            )
        self._repo_args = args
        tokenizer = _prepare_tokenizer(processing_class, args, "RECPOTrainer")
        simpo = args.loss_type == "simpo" and not args.cpo_alpha  # SimPO, no SFT term
        self.likelihood = InducedLikelihood(
            lambda stats: cpo_pair_loss(stats, self),
            needs_reference=False,
            # CPO's sigmoid loss takes CPOLikelihood's step (the literal EM step, no SFT
            # term), SimPO SimPOLikelihood's (the exact EM step)
            default_variant=(
                CPOLikelihood.default_variant
                if args.loss_type == "sigmoid"
                else SimPOLikelihood.default_variant
                if simpo
                else None
            ),
            # summed log-probs (all but ipo and simpo): CPO's E-step default (CPOLikelihood)
            default_temperature=(
                1.0 if args.loss_type in ("ipo", "simpo") else CPOLikelihood.default_temperature
            ),
            # SimPO: its logit is a log-odds (SimPOLikelihood)
            default_out_of_sample=simpo,
            rewards_fn=lambda s: (args.beta * s.policy_a, args.beta * s.policy_b),
            name=f"trl-cpo:{args.loss_type}",
            # the SFT term clones every label's response: DPO's scorers, as CPOLikelihood's
            cross_fit_scorer="dpo" if args.cpo_alpha else "",
        )
        train_dataset = Dataset.from_dict(
            cpo_rows(self._training_units(train_dataset, tokenizer, "train"))
        )
        if eval_dataset is not None:
            eval_dataset = Dataset.from_dict(
                cpo_rows(self._training_units(eval_dataset, tokenizer, "eval"))
            )
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            **kwargs,
        )
        self.data_collator = LabelCollator(self.data_collator)
        self._setup_repo()

    def tokenize_row(self, feature, model=None) -> dict:
        """The rows are tokenised already (re-po's :class:`~repo.policy.PairTokenizer`)."""
        return dict(feature)

    def _pair_logps(self, model, batch: dict[str, Any]) -> PairLogps:
        """Summed completion log-probs and token counts of A and B (TRL's CPO forward:
        ``concatenated_inputs`` and ``get_batch_logps``)."""
        concatenated = self.concatenated_inputs(
            batch,
            is_encoder_decoder=self.is_encoder_decoder,
            padding_value=self.pad_token_id,
            device=self.accelerator.device,
        )
        outputs = model(
            concatenated["concatenated_input_ids"],
            attention_mask=concatenated["concatenated_attention_mask"],
            use_cache=False,
        )
        labels = concatenated["concatenated_labels"]
        logps = self.get_batch_logps(outputs.logits, labels, average_log_prob=False)
        lengths = (labels[:, 1:] != -100).sum(-1).to(logps.dtype)
        policy_a, policy_b = logps.chunk(2, dim=0)
        length_a, length_b = lengths.chunk(2, dim=0)
        return PairLogps(policy_a, policy_b, length_a, length_b)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """The RE-PO loss of a batch and its metrics (TRL's names, ``eval_`` for evaluation)."""
        training = self.model.training
        batch = dict(batch)
        labels = batch_labels(batch, self.noise.num_annotators, self._repo_args.shared_truth)
        stats = self._pair_logps(model, batch)
        loss, metrics = self._repo_loss(stats, labels, training=training)
        prefix = "" if training else "eval_"
        return loss, {f"{prefix}{k}": v for k, v in metrics.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.get_batch_loss_metrics(model, inputs)
        self.store_metrics(metrics, train_eval="train" if self.model.training else "eval")
        return (loss, metrics) if return_outputs else loss
