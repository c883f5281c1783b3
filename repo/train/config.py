"""The training configuration: one TOML file, seven sections, every field typed and documented.

A configuration reads like this (every field but ``model.recipe`` and ``data.train``
has a default; ``re-po train --describe-config`` prints them all with their meaning)::

    [model]
    recipe = "tiny-llama"          # a name in models/, a recipe TOML or a model folder

    [data]
    train = "pairs.jsonl"          # TRL layout: prompt / chosen / rejected (+ annotator)
    annotator_column = "annotator"

    [loss]
    family = "dpo"                 # dpo | ipo | simpo | cpo | hinge | cdpo | rdpo | holder_dpo

    [noise]
    model = "symmetric"            # symmetric | two-coin | hierarchical | spammer | boltzmann

    [em]
    alpha = 0.1

    [optim]
    learning_rate = 1e-4
    batch_size = 8

    [run]
    output_dir = "runs/re-dpo"

Rules: an unknown section or field, or a value of the wrong type, is a
:class:`ConfigError` naming ``[section] field``. TOML has no null: leave a field
out to get its default. Relative paths (data files, output folder, caches) are
resolved against the folder of the TOML file, so a configuration travels with
its data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "DataSection",
    "EMSection",
    "LossSection",
    "ModelSection",
    "NoiseSection",
    "OptimSection",
    "RunSection",
    "TrainConfig",
    "describe_config",
    "load_config",
    "toml_value",
]


class ConfigError(ValueError):
    """A bad training configuration; the message names ``[section] field``."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass
class ModelSection:
    """The policy and its reference."""

    recipe: str = field(
        default="",
        metadata=_doc(
            "required. A recipe name in models/ (e.g. 'tiny-llama', 'smollm2-135m-instruct'), "
            "a path to a recipe TOML, or a Hugging Face model folder"
        ),
    )
    use_lora: bool = field(
        default=True,
        metadata=_doc(
            "train a LoRA adapter with the recipe's [lora] settings; false: full fine-tuning "
            "(losses with a reference then load a second, frozen copy of the model as the "
            "reference)"
        ),
    )
    lora_last_layers: int = field(
        default=0,
        metadata=_doc(
            "LoRA on the last N transformer blocks only (the backward pass stops there: "
            "cheaper steps); 0: the recipe's [lora] setting"
        ),
    )
    device: str = field(
        default="auto",
        metadata=_doc("'auto' (CUDA, then MPS, then CPU) or a torch device string ('cpu')"),
    )
    dtype: str = field(
        default="",
        metadata=_doc("load dtype ('float32', 'bfloat16', ...); empty: the recipe's"),
    )
    max_length: int = field(
        default=0, metadata=_doc("prompt + response tokens per sequence; 0: the recipe's")
    )
    min_response_tokens: int = field(
        default=0,
        metadata=_doc("each response keeps at least this many tokens when cut; 0: the recipe's"),
    )
    max_prompt_length: int = field(
        default=0, metadata=_doc("separate cap on prompt tokens; 0: none")
    )
    prompt_overflow: Literal["truncate", "skip", "error"] = field(
        default="truncate",
        metadata=_doc(
            "a prompt that does not fit: 'truncate' keeps its tail, 'skip' drops the pair "
            "(counted in the run's data report), 'error' stops naming the record"
        ),
    )
    reference: Literal["precompute", "on-the-fly"] = field(
        default="precompute",
        metadata=_doc(
            "reference log-probs (DPO, IPO and the baselines): computed once before training "
            "and cached on disk, or by an extra no-grad forward in every step"
        ),
    )
    reference_cache_dir: str = field(
        default="",
        metadata=_doc("folder of the reference cache; empty: <output_dir>/reference-cache"),
    )
    layout: Literal["auto", "shared-prompt", "concatenated"] = field(
        default="auto",
        metadata=_doc(
            "batch layout: 'shared-prompt' runs one row [prompt | A | B] per pair (B masked "
            "from A; the prompt is computed once, same log-probs), 'concatenated' the 2B rows "
            "[prompt | A], [prompt | B]; 'auto': shared-prompt unless the model's attention "
            "cannot take a custom mask (flash attention) or uses a sliding window"
        ),
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = field(
        default="auto", metadata=_doc("'auto': on for CUDA, off elsewhere")
    )


@dataclass
class DataSection:
    """The preference data and how to read it."""

    train: str = field(
        default="",
        metadata=_doc(
            "the training data: a JSON / JSONL(.gz) / Parquet file in TRL's preference layout "
            "(format = 'trl'), or HH-RLHF / PandaLM files; empty with format 'hh-rlhf' or "
            "'pandalm' reads the copy shipped with re-po"
        ),
    )
    format: Literal["trl", "hh-rlhf", "pandalm"] = field(
        default="trl",
        metadata=_doc(
            "'trl': prompt/chosen/rejected columns (strings or chat messages); 'hh-rlhf': "
            "chosen/rejected full dialogues; 'pandalm': PandaLM rows with three annotators"
        ),
    )
    prompt_column: str = field(
        default="prompt",
        metadata=_doc("prompt column (trl); absent from the data: implicit-prompt layout"),
    )
    chosen_column: str = field(default="chosen", metadata=_doc("chosen-response column (trl)"))
    rejected_column: str = field(
        default="rejected", metadata=_doc("rejected-response column (trl)")
    )
    annotator_column: str = field(
        default="",
        metadata=_doc("annotator-id column (trl); empty: one virtual annotator for all labels"),
    )
    item_column: str = field(
        default="",
        metadata=_doc("item-id column (trl): rows of one item are labels of one comparison"),
    )
    position_column: str = field(
        default="",
        metadata=_doc(
            "column saying whether chosen was shown first (bool or 0/1); empty: A/B is a "
            "label-independent order"
        ),
    )
    on_invalid: Literal["error", "skip"] = field(
        default="error",
        metadata=_doc(
            "malformed rows (null fields, missing ids, ...): stop, naming the row and field, "
            "or skip (counted by reason; one line on stderr)"
        ),
    )
    duplicates: Literal["error", "first"] = field(
        default="error",
        metadata=_doc(
            "a second label of one annotator on one item: stop, naming both rows, or keep the "
            "first (as re-po fit-noise --duplicates)"
        ),
    )
    on_empty: Literal["skip", "error", "keep"] = field(
        default="skip", metadata=_doc("empty chosen or rejected response")
    )
    on_identical: Literal["skip", "error"] = field(
        default="skip", metadata=_doc("chosen identical to rejected")
    )
    shared_truth: bool = field(
        default=False,
        metadata=_doc(
            "the labels of one item share one latent truth (Dawid-Skene; one forward per "
            "item, the item's posterior as soft target); false: each label its own truth "
            "(the paper)"
        ),
    )
    max_records: int = field(
        default=0, metadata=_doc("use only the first N records (after validation); 0: all")
    )
    split: str = field(
        default="train",
        metadata=_doc(
            "the split of a data set read by name (a Hugging Face data set, or a local "
            "folder that datasets.load_dataset reads); files have no splits"
        ),
    )
    eval: str = field(
        default="",
        metadata=_doc(
            "held-out pairs evaluated during training ([run] eval_steps) and at the end: a "
            "file or a data set name as for train, read with the same format, columns and "
            "policies; empty: no evaluation"
        ),
    )
    eval_split: str = field(
        default="test", metadata=_doc("the split of an eval data set read by name")
    )


@dataclass
class LossSection:
    """The preference loss family and its hyper-parameters."""

    family: str = field(
        default="dpo",
        metadata=_doc(
            "dpo | ipo | simpo | cpo | hinge | cdpo | rdpo | holder_dpo (see repo.likelihoods)"
        ),
    )
    variant: Literal["default", "nll", "mixture", "weighted"] = field(
        default="default",
        metadata=_doc(
            "policy step: 'nll' (induced negative log-likelihood, the EM derivation; taken as "
            "the gradient of the noise model's marginal likelihood), 'mixture' (w L(A>B) + "
            "(1-w) L(B>A), keeps the loss's shape) or 'weighted' (each label's own loss times "
            "the posterior that it is correct: a doubtful label is ignored, never reversed; "
            "docs/math.md, section 5); 'default': the family's own default"
        ),
    )
    beta: float = field(
        default=0.0, metadata=_doc("the family's beta; 0: the recipe's suggestion for the family")
    )
    gamma: float = field(
        default=-1.0,
        metadata=_doc(
            "simpo: target margin (default 0.5); holder_dpo: Hölder exponent, > 0 (default "
            "1.0); -1: the family's default"
        ),
    )
    epsilon: float = field(
        default=-1.0, metadata=_doc("cdpo / rdpo: assumed flip rate; -1: default (0.1)")
    )
    nll_weight: float = field(
        default=-1.0, metadata=_doc("cpo: weight of the SFT term; -1: default (1.0)")
    )
    keep_sft_term: bool = field(
        default=False, metadata=_doc("cpo, variant 'nll': keep the w-weighted SFT term")
    )
    length_normalized: bool = field(
        default=False, metadata=_doc("ipo: per-token mean log-ratios (TRL's IPO)")
    )


@dataclass
class NoiseSection:
    """The annotator noise model."""

    model: str = field(
        default="symmetric",
        metadata=_doc("symmetric | two-coin | hierarchical | spammer | boltzmann"),
    )
    prior: str = field(
        default="none",
        metadata=_doc(
            "'beta:A,B': a Beta prior on the reliabilities (MAP-EM; flip models only), or 'none'"
        ),
    )
    eta_init: float = field(
        default=0.9,
        metadata=_doc("initial reliability eta_0 (the paper's default 0.9; > 0.5 breaks symmetry)"),
    )


@dataclass
class EMSection:
    """The E-step and the annotator M-step."""

    enabled: bool = field(
        default=True,
        metadata=_doc(
            "false: the plain loss on the observed labels (DPO instead of RE-DPO), eta untouched"
        ),
    )
    alpha: float = field(
        default=0.1,
        metadata=_doc("EMA rate of the annotator update per optimizer step, in (0, 1]"),
    )
    temperature: float = field(
        default=0.0,
        metadata=_doc(
            "E-step logits are divided by this (> 1 softens early, confidently wrong posteriors "
            "of reference-free losses); 1: the exact posterior; 0: the loss family's default "
            "(1; CPO 50)"
        ),
    )
    warmup_steps: int = field(
        default=0,
        metadata=_doc(
            "optimizer steps with w fixed at the prior reliability (no E-step, no annotator "
            "update) before EM starts"
        ),
    )
    calibrate: Literal["auto", True, False] = field(
        default="auto",
        metadata=_doc(
            "learn the E-step's logit scale a (starting at 1 / temperature) by EM with the "
            "annotator parameters: the E-step reads a * s (docs/math.md, calibration); 'auto': "
            "for loss families that are not likelihood-style (IPO, SimPO, CPO; not DPO), "
            "except with the 'nll' step and out_of_sample (one annotator with SimPO: the "
            "E-step is then exact, docs/math.md, section 5)"
        ),
    )
    policy_calibrate: Literal["auto", True, False] = field(
        default="auto",
        metadata=_doc(
            "with calibrate: the policy step's posterior reads the learned scale too; "
            "false: it reads s / temperature while the annotator parameters read a * s "
            "(docs/math.md, section 5); 'auto': false with the 'nll' step on a family "
            "whose logit is a log-odds (PreferenceLikelihood.default_out_of_sample: DPO, "
            "SimPO) in a run of one pass, where the scale learned on a still-learning "
            "policy's first scores would hand the policy its own beliefs; else true"
        ),
    )
    out_of_sample: Literal["auto", True, False] = field(
        default="auto",
        metadata=_doc(
            "learn the annotator parameters from each item's first visit only (before the "
            "policy has trained on it), and refit them after every epoch by EM on those "
            "logits with their scale learned (docs/math.md, section 9); 'auto': with one "
            "annotator and a loss whose logit is a log-odds up to a scale (DPO, SimPO)"
        ),
    )
    noise_test: float | Literal["auto"] = field(
        default="auto",
        metadata=_doc(
            "level of the likelihood-ratio test of 'no label is wrong' on the scores of each "
            "pass (first visits in the first): until it rejects, w = 1 (RE-X trains as X) "
            "while eta is learned "
            "(docs/math.md, section 10); 0: the posterior from the first step (the paper's); "
            "'auto': 0.05 where the E-step reads the policy, 0.5 where it reads cross-fitted "
            "scores of 4,096 items or more in a run of several epochs (their posterior, "
            "fixed at the maximum likelihood, reaches the policy wherever that fit finds "
            "any noise; docs/math.md, section 13)"
        ),
    )
    epoch_m_step: Literal["auto", True, False] = field(
        default="auto",
        metadata=_doc(
            "after every epoch: EM of the annotator parameters to convergence (no EMA) on the "
            "logits the epoch's E-steps read, at the E-step's scale (learned jointly with "
            "calibrate; no extra forward pass; docs/math.md, section 11); 'auto': with "
            "several annotators, or one in a run of one pass over 4,096 items or more whose "
            "E-step learns its scale and whose family's scores its cross-fitted scorers "
            "would give (IPO, not CPO); out_of_sample's refit on first visits takes its place"
        ),
    )
    held_out: Literal["auto", True, False] = field(
        default="auto",
        metadata=_doc(
            "keep held_out_share of the items out of every batch: after every epoch the "
            "current policy scores them (one forward pass over them) and the annotator "
            "parameters are refitted by EM on those scores with their scale learned, and "
            "then learn from nothing else (docs/math.md, section 12); 'auto': with one "
            "annotator, a loss whose trained scores are far from 0 (IPO, CPO), at least 625 "
            "items held out (6,250 items at the default share) and more than one epoch"
        ),
    )
    held_out_share: float = field(
        default=0.1,
        metadata=_doc("the share of the items held out with held_out, in (0, 0.5)"),
    )
    train_held_out: bool = field(
        default=False,
        metadata=_doc(
            "with held_out: the last epoch trains on the held-out items too (each label "
            "weighted by its posterior, as every other), and the run's last refit reads "
            "their scores at that first visit; false: the policy never trains on them "
            "(docs/math.md, section 12, and why it is not the default)"
        ),
    )
    cross_fit: Literal["auto", True, False] = field(
        default="auto",
        metadata=_doc(
            "before training, split the items in cross_fit_folds folds, train a scorer for "
            "each fold on the others' labels by the plain loss (the run's model and passes, "
            "under <output_dir>/cross-fit/), and let every E-step read each item's score by "
            "its fold's scorer, which never saw it, the annotator parameters and a Platt "
            "scale fitted by EM on those scores once (docs/math.md, section 13); the E-step "
            "fields above then do not apply but noise_test (one test on those scores; "
            "'auto' at 0.5 from 4,096 items over several epochs); 'auto': with one "
            "annotator, a noise model with a latent truth, 4,096 items or more, a family "
            "whose PreferenceLikelihood.default_cross_fit says so (not SimPO), and more than "
            "one epoch, scorers of another loss than the run's (CPO's, by DPO) or the "
            "mixture policy step (IPO's), unless calibrate, out_of_sample, epoch_m_step or "
            "held_out is set to true"
        ),
    )
    cross_fit_scorer: str = field(
        default="",
        metadata=_doc(
            "with cross_fit: the loss family the scorers train with, at its own defaults "
            "(a [loss] family name); '': the run's family's choice "
            "(PreferenceLikelihood.cross_fit_scorer: its own loss, DPO for CPO with its "
            "SFT term, IPO for DPO over several passes)"
        ),
    )
    cross_fit_folds: int | Literal["auto"] = field(
        default="auto",
        metadata=_doc(
            "with cross_fit: the folds the items are split in (>= 2); the scorer of each "
            "fold trains on the items of the others and scores that fold's, so each trains "
            "on a share 1 - 1/folds of the items and the scorers cost folds - 1 runs' "
            "compute (docs/math.md, section 13); 'auto': 4 in a run of one epoch, where "
            "scorers on half the items are much weaker than the policy; over several, the "
            "scorers' loss's PreferenceLikelihood.several_pass_folds: 4 for IPO's scorers "
            "(RE-IPO's, and RE-DPO's), whose margins regress to a finite target, 2 for the "
            "others, which learn the flipped labels on more of them"
        ),
    )
    noise_lr: float = field(
        default=0.05,
        metadata=_doc("Adam step size for noise models without a closed-form M-step (boltzmann)"),
    )


@dataclass
class OptimSection:
    """AdamW, batches and the learning-rate schedule."""

    learning_rate: float = field(default=1e-4, metadata=_doc("peak learning rate (> 0)"))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW decoupled weight decay"))
    adam_beta1: float = field(default=0.9, metadata=_doc("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_doc("AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_doc("AdamW epsilon"))
    batch_size: int = field(
        default=8,
        metadata=_doc("truth units (labels; items under shared truth) per micro-batch and process"),
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_doc("micro-batches per optimizer step")
    )
    epochs: int = field(default=1, metadata=_doc("passes over the data"))
    max_steps: int = field(
        default=0, metadata=_doc("stop after this many optimizer steps; 0: epochs decide")
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = field(
        default="linear", metadata=_doc("decay after warm-up (transformers' schedules)")
    )
    warmup_steps: int = field(default=0, metadata=_doc("linear learning-rate warm-up steps"))
    warmup_ratio: float = field(
        default=0.0, metadata=_doc("warm-up as a fraction of all steps (used if warmup_steps = 0)")
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_doc("clip the global gradient norm to this; 0: no clipping")
    )
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = field(
        default="auto",
        metadata=_doc("AdamW kernel: 'auto' = fused on CUDA, foreach elsewhere"),
    )


@dataclass
class RunSection:
    """The run directory, seeds, logging and checkpoints."""

    output_dir: str = field(
        default="runs/re-po",
        metadata=_doc(
            "the run directory (config, metrics, checkpoints, posteriors, the final adapter "
            "or model, the noise fit; see repo.train.run_dir)"
        ),
    )
    seed: int = field(
        default=0, metadata=_doc("seeds Python, NumPy, torch, Pyro and the data order")
    )
    logging_steps: int = field(default=1, metadata=_doc("write metrics every N optimizer steps"))
    save_steps: int = field(
        default=0, metadata=_doc("checkpoint every N optimizer steps (0: only at the end)")
    )
    save_total_limit: int = field(default=2, metadata=_doc("checkpoints kept (oldest removed)"))
    progress: bool = field(default=True, metadata=_doc("show a progress bar (stderr)"))
    resume: bool = field(
        default=False,
        metadata=_doc("continue from the newest checkpoint in output_dir (also: --resume)"),
    )
    overwrite: bool = field(
        default=False, metadata=_doc("allow starting afresh in an output_dir that holds a run")
    )
    posteriors: bool = field(
        default=True,
        metadata=_doc("at the end, a full-data E-step with the final policy: per-label posteriors"),
    )
    eval_steps: int = field(
        default=0,
        metadata=_doc(
            "evaluate on [data] eval every N optimizer steps (eval/accuracy, eval/margin, "
            "eval/log_loss, ... in metrics.jsonl) and at the end; 0: at the end only"
        ),
    )
    report_to: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            'metric trackers through accelerate, e.g. ["tensorboard"] or ["wandb"] (logs '
            "in <output_dir>/trackers); empty: metrics.jsonl only"
        ),
    )
    distributed: Literal["ddp", "fsdp"] = field(
        default="ddp",
        metadata=_doc(
            "several processes: 'ddp' (every process holds the whole model) or 'fsdp' "
            "(FSDP2 fully_shard: parameters, gradients and optimizer state sharded, one unit "
            "per transformer block); one process ignores it"
        ),
    )


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "loss": LossSection,
    "noise": NoiseSection,
    "em": EMSection,
    "optim": OptimSection,
    "run": RunSection,
}


@dataclass
class TrainConfig:
    """A complete training configuration (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    em: EMSection = field(default_factory=EMSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    base_dir: Path = field(default_factory=Path.cwd)
    """The folder relative paths are resolved against (the TOML file's)."""

    # -- construction -----------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike | None = None):
        """Build and validate a configuration from a parsed TOML mapping."""
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration is a table of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(
                f"unknown section [{unknown[0]}]; sections are {', '.join(_SECTIONS)}"
            )
        sections = {}
        for name, section_cls in _SECTIONS.items():
            raw = data.get(name, {})
            if not isinstance(raw, dict):
                raise ConfigError(f"[{name}] must be a table, got {type(raw).__name__}")
            sections[name] = _build_section(name, section_cls, raw)
        config = cls(**sections, base_dir=Path(base_dir or Path.cwd()).resolve())
        config.validate()
        return config

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The sections as plain mappings (what the run directory's config.json holds)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        """A copy with fields of one section changed (validated)."""
        new = dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)}
        )
        new.validate()
        return new

    def path(self, value: str) -> Path:
        """``value`` as a path, relative ones resolved against :attr:`base_dir`."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def output_dir(self) -> Path:
        return self.path(self.run.output_dir)

    # -- checks across fields ----------------------------------------------
    def validate(self) -> None:
        """Range checks and checks that involve several fields."""
        from repo.likelihoods import available_likelihoods
        from repo.noise import NOISE_MODELS

        if not self.model.recipe:
            raise ConfigError("[model] recipe is required")
        if not self.data.train and self.data.format == "trl":
            raise ConfigError(
                "[data] train is required (a JSON, JSONL or Parquet file, or a data set name)"
            )
        if self.run.distributed == "fsdp" and self.model.use_lora:
            raise ConfigError(
                "[run] distributed = 'fsdp' shards a full fine-tune: set [model] use_lora = "
                "false (a LoRA adapter trains with 'ddp', the whole model on every process)"
            )
        if self.run.eval_steps and not self.data.eval:
            raise ConfigError("[run] eval_steps needs held-out data: set [data] eval")
        _check_trackers(self.run.report_to)
        family = self.loss.family.strip().lower()
        if family not in available_likelihoods():
            raise ConfigError(
                f"[loss] family: unknown loss family {self.loss.family!r}; known: "
                f"{', '.join(available_likelihoods())}"
            )
        if self.noise.model not in NOISE_MODELS:
            raise ConfigError(
                f"[noise] model: unknown noise model {self.noise.model!r}; known: "
                f"{', '.join(NOISE_MODELS)}"
            )
        _family_options(self.loss)
        scorer = self.em.cross_fit_scorer.strip().lower()
        if scorer and scorer not in available_likelihoods():
            raise ConfigError(
                f"[em] cross_fit_scorer: unknown loss family {self.em.cross_fit_scorer!r}; "
                f"known: {', '.join(available_likelihoods())}"
            )
        checks = [
            ("em", "alpha", 0 < self.em.alpha <= 1, "in (0, 1]"),
            ("em", "temperature", self.em.temperature >= 0, ">= 0 (0: the family's default)"),
            ("em", "warmup_steps", self.em.warmup_steps >= 0, ">= 0"),
            (
                "em",
                "noise_test",
                self.em.noise_test == "auto" or 0 <= self.em.noise_test < 1,
                "in [0, 1) (0: no test) or 'auto'",
            ),
            ("em", "held_out_share", 0 < self.em.held_out_share < 0.5, "in (0, 0.5)"),
            (
                "em",
                "cross_fit_folds",
                self.em.cross_fit_folds == "auto" or self.em.cross_fit_folds >= 2,
                ">= 2 or 'auto'",
            ),
            ("em", "noise_lr", self.em.noise_lr > 0, "> 0"),
            ("noise", "eta_init", 0 < self.noise.eta_init < 1, "in (0, 1)"),
            ("optim", "learning_rate", self.optim.learning_rate > 0, "> 0"),
            ("optim", "weight_decay", self.optim.weight_decay >= 0, ">= 0"),
            ("optim", "adam_beta1", 0 <= self.optim.adam_beta1 < 1, "in [0, 1)"),
            ("optim", "adam_beta2", 0 <= self.optim.adam_beta2 < 1, "in [0, 1)"),
            ("optim", "adam_epsilon", self.optim.adam_epsilon > 0, "> 0"),
            ("optim", "batch_size", self.optim.batch_size >= 1, ">= 1"),
            (
                "optim",
                "gradient_accumulation_steps",
                self.optim.gradient_accumulation_steps >= 1,
                ">= 1",
            ),
            ("optim", "epochs", self.optim.epochs >= 1, ">= 1"),
            ("optim", "max_steps", self.optim.max_steps >= 0, ">= 0"),
            ("optim", "warmup_steps", self.optim.warmup_steps >= 0, ">= 0"),
            ("optim", "warmup_ratio", 0 <= self.optim.warmup_ratio < 1, "in [0, 1)"),
            ("optim", "max_grad_norm", self.optim.max_grad_norm >= 0, ">= 0"),
            ("model", "max_length", self.model.max_length >= 0, ">= 0"),
            ("model", "min_response_tokens", self.model.min_response_tokens >= 0, ">= 0"),
            ("model", "max_prompt_length", self.model.max_prompt_length >= 0, ">= 0"),
            ("data", "max_records", self.data.max_records >= 0, ">= 0"),
            ("run", "logging_steps", self.run.logging_steps >= 1, ">= 1"),
            ("run", "save_steps", self.run.save_steps >= 0, ">= 0"),
            ("run", "save_total_limit", self.run.save_total_limit >= 1, ">= 1"),
            ("run", "eval_steps", self.run.eval_steps >= 0, ">= 0"),
        ]
        for section, name, ok, rule in checks:
            if not ok:
                value = getattr(getattr(self, section), name)
                raise ConfigError(f"[{section}] {name} must be {rule}, got {value!r}")
        if self.loss.beta < 0:
            raise ConfigError(
                f"[loss] beta must be > 0 (or 0 for the recipe's), got {self.loss.beta}"
            )

    # -- derived objects ----------------------------------------------------
    def likelihood_kwargs(self, recipe_beta: float) -> dict[str, Any]:
        """Constructor arguments of the loss family (beta from the recipe when unset)."""
        kwargs = _family_options(self.loss)
        kwargs["beta"] = self.loss.beta if self.loss.beta > 0 else recipe_beta
        return kwargs


def _check_trackers(names: tuple[str, ...]) -> None:
    """``[run] report_to`` names trackers that accelerate knows."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"[run] report_to: unknown tracker {name!r}; accelerate's trackers are "
                f"{', '.join(LOGGER_TYPE_TO_CLASS)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"[run] report_to names a tracker twice: {list(names)}")


_FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {
    # family -> the [loss] fields that are its constructor arguments (beyond beta)
    "simpo": ("gamma",),
    "cdpo": ("epsilon",),
    "rdpo": ("epsilon",),
    "holder_dpo": ("gamma",),
    "cpo": ("nll_weight", "keep_sft_term"),
    "ipo": ("length_normalized",),
}


def _family_options(loss: LossSection) -> dict[str, Any]:
    """The family-specific options that differ from their "unset" default (the family's
    own default then applies); a set option of another family, or a value its
    constructor refuses (``gamma = 0`` for ``holder_dpo``), is an error."""
    from repo.likelihoods import get_likelihood

    family = loss.family.strip().lower()
    defaults = LossSection()
    kwargs = {}
    for name in sorted({n for names in _FAMILY_OPTIONS.values() for n in names}):
        value = getattr(loss, name)
        if value == getattr(defaults, name):
            continue
        if name not in _FAMILY_OPTIONS.get(family, ()):
            owners = [f for f, names in _FAMILY_OPTIONS.items() if name in names]
            raise ConfigError(
                f"[loss] {name} does not apply to family {family!r} (it is an option of "
                f"{', '.join(owners)})"
            )
        kwargs[name] = value
    try:
        get_likelihood(family, **kwargs)
    except ValueError as error:
        raise ConfigError(f"[loss] {error}") from None
    return kwargs


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(_toml(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def toml_value(value: Any) -> str:
    """``value`` written as TOML (the defaults shown by :func:`describe_config`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def _toml(value: Any) -> str:
    """A choice as a TOML file spells it (``true``, ``'auto'``)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the field type ``tp`` (TOML types; ints accepted as floats)."""
    where = f"[{section}] {name}"
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(
                f"{where} must be one of {', '.join(_toml(c) for c in choices)}, got {value!r}"
            )
        return value
    if origin is tuple:  # a TOML array of one item type
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {_describe(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(section, f"{name}[{i}]", item, v) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):  # the first type the value is
        for member in typing.get_args(tp):
            try:
                return _coerce(section, name, member, value)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {_describe(value)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls, include_extras=False)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"[{name}] {unknown[0]}: unknown field; [{name}] takes {', '.join(fields)}"
        )
    values = {key: _coerce(name, key, hints[key], value) for key, value in raw.items()}
    return cls(**values)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a training configuration TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no configuration file at {path}")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return TrainConfig.from_dict(data, base_dir=path.resolve().parent)


def describe_config() -> str:
    """Every section and field with its type, default and meaning, as commented TOML."""
    lines = ["# re-po train: every configuration field (defaults shown)"]
    for name, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines += ["", f"[{name}]  # {cls.__doc__.splitlines()[0]}"]
        for f in dataclasses.fields(cls):
            shown = toml_value(f.default)
            lines.append(f"# {f.name} ({_type_name(hints[f.name])}): {f.metadata['doc']}")
            lines.append(f"{f.name} = {shown}")
    return "\n".join(lines) + "\n"
