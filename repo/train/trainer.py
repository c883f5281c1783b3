r"""The RE-PO trainer: generalised EM per optimizer step over a causal-LM policy.

One optimizer step (the paper's Algorithm 1, any noise model, any loss family):

1. for each micro-batch of truth units: one forward of the policy over the
   distinct items (A and B concatenated), the induced logits
   :math:`s = \mathrm{logit}\,p(A \succ^* B)` of the loss family, the **E-step**
   with the annotator parameters held (:class:`~repo.inference.online.OnlineEM`; no
   gradient through :math:`w`), and the backward pass of the policy objective
   (:func:`~repo.train.objective.policy_objective`: the gradient of the enumerated
   marginal likelihood, or the weighted loss), scaled so that the accumulated
   gradient is the mean over the global batch;
2. gradient clipping, an AdamW step and a learning-rate schedule step;
3. the annotator **M-step**: the step's sufficient statistics, summed over
   micro-batches and all-reduced over processes, then an EMA update. Every process
   holds the same annotator parameters.

Processes come from ``accelerate`` (``torchrun`` / ``accelerate launch``): the
policy is wrapped by ``Accelerator.prepare_model`` (DDP), gradients of all but the
last micro-batch skip synchronisation, and small sums (statistics, metrics) go
through ``Accelerator.reduce``.

The run directory (``[run] output_dir``)::

    config.json          the resolved configuration (absolute paths, beta, variant, ...)
    data_report.json     records, units, labels, annotators, what was skipped and why
    annotators.json      annotator ids (the order of every per-annotator list)
    metrics.jsonl        per logged step (see repo.train.metrics)
    annotators.jsonl     the per-annotator parameter trajectory
    checkpoints/         step-NNNNNN/ (see repo.train.checkpoint)
    adapter/             the final LoRA adapter (peft format)
    noise.safetensors    the final annotator parameters
    posteriors.jsonl     per label at the end: w (label correct), q (A truly better), flipped
    reliability.json     per annotator at the end: label count, parameters, eta
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

from repo.data.loaders import load_preferences
from repo.data.records import PreferenceData
from repo.inference.enumeration import enumerate_posterior
from repo.inference.online import OnlineEM, single_thread
from repo.likelihoods import PreferenceLikelihood, get_likelihood
from repo.noise import NoiseModel, make_noise_model
from repo.policy import (
    LastLayersError,
    PairTokenizer,
    Policy,
    ReferenceCache,
    ReferenceLogps,
    ResponseLogps,
    batch_to,
    data_fingerprint,
    load_model_and_tokenizer,
    resolve_recipe,
)
from repo.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    restore_rng,
    save_checkpoint,
)
from repo.train.config import ConfigError, TrainConfig
from repo.train.dataset import BatchSchedule, TrainingData
from repo.train.metrics import JsonlLog, MetricSums, parameter_summary
from repo.train.objective import gather_stats, plain_loss, policy_objective

__all__ = ["Trainer", "load_records", "make_noise", "parse_prior_spec"]

# config sections/fields a resumed run may change (the rest must match the checkpoint)
_RESUMABLE = {
    "run": {
        "output_dir",
        "progress",
        "resume",
        "overwrite",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "posteriors",
    },
    "model": {"reference_cache_dir", "device"},
}


def parse_prior_spec(spec: str):
    """``"beta:A,B"`` -> a float64 ``Beta(A, B)``; ``"none"`` -> ``None``."""
    from repo.fit import parse_prior

    try:
        return parse_prior(spec)
    except ValueError as error:
        raise ConfigError(f"[noise] prior: {error}") from None


def make_noise(name: str, num_annotators: int, prior: str, eta_init: float) -> NoiseModel:
    """The noise model ``name`` for ``K`` annotators, started at reliability ``eta_init``.

    ``eta_init`` sets the flip models' reliabilities, the spammer's honesty and the
    hierarchical population's location (``logit eta_init``); the Boltzmann model
    starts at ``tau = 1``.
    """
    start = {
        "symmetric": {"eta_init": eta_init},
        "two-coin": {"eta_init": eta_init},
        "spammer": {"theta_init": eta_init},
        "hierarchical": {"mu_init": math.log(eta_init / (1 - eta_init))},
    }.get(name, {})
    try:
        return make_noise_model(name, num_annotators, prior=parse_prior_spec(prior), **start)
    except ValueError as error:
        raise ConfigError(f"[noise] {error}") from None


def load_records(config: TrainConfig, source: str | None = None) -> PreferenceData:
    """The validated records of ``[data]`` (``source`` replaces ``data.train``)."""
    from repo.data.hh_rlhf import load_hh_rlhf
    from repo.data.pandalm import read_pandalm

    d = config.data
    path = source if source is not None else d.train
    resolved = str(config.path(path)) if path else None
    if d.format == "hh-rlhf":
        records = load_hh_rlhf(
            resolved,
            on_invalid=d.on_invalid,
            on_empty=d.on_empty,
            on_identical=d.on_identical,
        )
    elif d.format == "pandalm":
        records = read_pandalm(
            resolved, on_invalid=d.on_invalid, on_empty=d.on_empty, duplicates=d.duplicates
        )
    else:
        if resolved is None:
            raise ConfigError("[data] train is required (a JSON, JSONL or Parquet file)")
        records = load_preferences(
            resolved,
            prompt_column=d.prompt_column,
            chosen_column=d.chosen_column,
            rejected_column=d.rejected_column,
            annotator_column=d.annotator_column or None,
            item_column=d.item_column or None,
            position_column=d.position_column or None,
            on_invalid=d.on_invalid,
            on_empty=d.on_empty,
            on_identical=d.on_identical,
            duplicates=d.duplicates,
        )
    if d.max_records and len(records) > d.max_records:
        records = PreferenceData(
            records.records[: d.max_records], skipped=records.skipped, notes=records.notes
        )
    return records


def _fingerprint(data: TrainingData) -> str:
    h = hashlib.sha256(data_fingerprint(data.pairs).encode())
    for t in (data.labels.unit, data.labels.annotator, data.labels.label, data.labels.mask):
        h.update(t.contiguous().numpy().tobytes())
    h.update(json.dumps(data.annotator_ids).encode())
    return h.hexdigest()


class Trainer:
    """Train a policy by RE-PO (or the plain loss) as the configuration says.

    :param config: the validated configuration.
    :param policy: a ready :class:`~repo.policy.Policy` (then ``[model] recipe`` only
        supplies defaults); default: built from the recipe.
    :param records: ready records; default: read from ``[data]``.
    :param accelerator: an ``accelerate.Accelerator``; default: one for the device.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        policy: Policy | None = None,
        records: PreferenceData | None = None,
        accelerator: Any | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator or self._make_accelerator(config.model.device)
        self.seed_everything(config.run.seed)
        self.policy = policy if policy is not None else self._make_policy()
        if config.model.layout != "auto":
            self.policy.layout = config.model.layout
        recipe = self.policy.recipe
        self.likelihood = self._make_likelihood(recipe)
        variant = config.loss.variant
        self.variant = self.likelihood.default_variant if variant == "default" else variant
        self.records = records if records is not None else load_records(config)
        self.pair_tokenizer = self._pair_tokenizer(recipe)
        self.data = TrainingData.build(
            self.records, self.pair_tokenizer, shared_truth=config.data.shared_truth
        )
        self.noise = make_noise(
            config.noise.model,
            len(self.data.annotator_ids),
            config.noise.prior,
            config.noise.eta_init,
        )
        if self.data.notes.get("reoriented_labels"):
            if self.noise.reads_position:
                raise ConfigError(
                    f"[noise] model: the {config.noise.model} model reads the A/B position, "
                    f"but {self.data.notes['reoriented_labels']} labels were given in the "
                    "other display order than their item's first row; its position "
                    "parameters would mix the two orders (use the symmetric or hierarchical "
                    "model, or one display order per item)"
                )
        if not self.noise.has_truth and self.variant != "nll" and config.em.enabled:
            raise ConfigError(
                f"[loss] variant: the {self.noise.name} noise model has no latent truth; "
                "use variant = 'nll'"
            )
        self.em = OnlineEM(
            self.noise,
            alpha=config.em.alpha,
            label_counts=self.data.label_counts(),
            temperature=config.em.temperature,
            warmup_steps=config.em.warmup_steps,
            noise_lr=config.em.noise_lr,
        )
        acc = self.accelerator
        self.schedule = BatchSchedule(
            num_units=self.data.num_units,
            batch_size=config.optim.batch_size,
            accumulation=config.optim.gradient_accumulation_steps,
            world_size=acc.num_processes,
            seed=config.run.seed,
        )
        per_epoch = self.schedule.steps_per_epoch
        self.total_steps = config.optim.max_steps or config.optim.epochs * per_epoch
        self.reference = self._make_reference()
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.model = acc.prepare_model(self.policy)
        self.step = 0
        self.fingerprint = _fingerprint(self.data)
        self.output_dir = config.output_dir
        self.metrics_log = JsonlLog(self.output_dir / "metrics.jsonl")
        self.annotator_log = JsonlLog(self.output_dir / "annotators.jsonl")
        self.last_metrics: dict[str, float] = {}
        self._item_logits: Tensor | None = None  # of the current policy; see item_logits

    # -- construction ---------------------------------------------------------
    @staticmethod
    def _make_accelerator(device: str):
        from accelerate import Accelerator

        return Accelerator(cpu=device == "cpu")

    @staticmethod
    def seed_everything(seed: int) -> None:
        """Seed Python, NumPy, torch (all devices) and Pyro."""
        from accelerate.utils import set_seed

        set_seed(seed)
        pyro.set_rng_seed(seed)

    def _make_policy(self) -> Policy:
        m = self.config.model
        device = self.accelerator.device
        checkpointing = {"auto": None, "on": True, "off": False}[m.gradient_checkpointing]
        dtype = m.dtype or None
        reference_model = None
        family = get_likelihood(self.config.loss.family)
        if not m.use_lora and family.needs_reference:
            reference_model, _ = load_model_and_tokenizer(m.recipe, device=device, dtype=dtype)
        try:
            recipe = resolve_recipe(m.recipe)
            lora = None
            if m.lora_last_layers:
                lora = dataclasses.replace(recipe.lora, last_layers=m.lora_last_layers)
            return Policy.from_recipe(
                recipe,
                device=device,
                dtype=dtype,
                use_lora=m.use_lora,
                lora=lora,
                gradient_checkpointing=checkpointing,
                reference_model=reference_model,
            )
        except FileNotFoundError as error:
            raise ConfigError(f"[model] recipe: {error}") from None
        except LastLayersError as error:
            raise ConfigError(f"[model] lora_last_layers: {error}") from None

    def _make_likelihood(self, recipe) -> PreferenceLikelihood:
        family = self.config.loss.family.strip().lower()
        beta = recipe.beta_for(family) if recipe is not None else 0.1
        try:
            return get_likelihood(family, **self.config.likelihood_kwargs(beta))
        except ValueError as error:
            raise ConfigError(f"[loss] {error}") from None

    def _pair_tokenizer(self, recipe) -> PairTokenizer:
        m = self.config.model
        max_length = m.max_length or (recipe.max_length if recipe is not None else 1024)
        min_response = m.min_response_tokens or (
            recipe.min_response_tokens if recipe is not None else 16
        )
        if self.policy.tokenizer is None:
            raise ConfigError("[model] the policy has no tokenizer")
        try:
            return PairTokenizer(
                self.policy.tokenizer,
                max_length,
                min_response_tokens=min_response,
                max_prompt_length=m.max_prompt_length or None,
                prompt_overflow=m.prompt_overflow,
            )
        except ValueError as error:
            raise ConfigError(f"[model] {error}") from None

    def _make_reference(self) -> ReferenceLogps | None:
        if not self.likelihood.needs_reference or self.config.model.reference == "on-the-fly":
            return None
        with self.accelerator.main_process_first():
            return self._reference_cache().get_or_compute(
                self.policy,
                self.data.pairs,
                batch_size=self.config.optim.batch_size,
                progress=self.is_main and self.config.run.progress,
            )

    def _reference_cache(self) -> ReferenceCache:
        m = self.config.model
        folder = (
            self.config.path(m.reference_cache_dir)
            if m.reference_cache_dir
            else self.config.output_dir / "reference-cache"
        )
        return ReferenceCache(folder)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        params = self.policy.trainable_parameters()
        if not params:
            raise ConfigError("[model] the policy has no trainable parameters")
        kind = o.implementation
        if kind == "auto":
            kind = "fused" if self.accelerator.device.type == "cuda" else "foreach"
        return torch.optim.AdamW(
            params,
            lr=o.learning_rate,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_epsilon,
            weight_decay=o.weight_decay,
            fused=kind == "fused",
            foreach=kind == "foreach",
        )

    def _make_scheduler(self):
        from transformers import get_scheduler

        o = self.config.optim
        warmup = o.warmup_steps or math.ceil(o.warmup_ratio * self.total_steps)
        return get_scheduler(
            o.lr_scheduler,
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
        )

    # -- helpers --------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def reduce(self, tensor: Tensor) -> Tensor:
        """Sum over processes (the tensor itself with one process)."""
        if self.accelerator.num_processes == 1:
            return tensor
        out = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")
        return out.to(tensor.device)

    def _reference_logps(self, batch: dict[str, Tensor]) -> ResponseLogps | None:
        if not self.likelihood.needs_reference:
            return None
        if self.reference is not None:
            return self.reference.for_batch(batch)
        return self.policy.reference_logps(batch)

    # -- one optimizer step ---------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step``: E-steps, policy step, annotator M-step; its metrics."""
        acc = self.accelerator
        self._item_logits = None  # the policy is about to change
        self.model.train()
        sums = MetricSums()
        micro_units = self.schedule.micro_units(step, acc.process_index)
        scale = acc.num_processes / self.schedule.global_batch
        use_em = self.config.em.enabled
        for a, units in enumerate(micro_units):
            micro = self.data.batch(units, self.policy.collate)
            batch = batch_to(micro.batch, acc.device)
            last = a == len(micro_units) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            with sync:
                logps = self.model(batch)
                stats = gather_stats(logps.to_stats(self._reference_logps(batch)), micro.unit_item)
                logits = self.likelihood.logits(stats)
                if use_em:
                    estep = self.em.e_step(logits, micro.labels, step)
                    loss = policy_objective(
                        self.likelihood,
                        self.noise,
                        stats,
                        logits,
                        micro.labels,
                        estep,
                        self.variant,
                    )
                else:
                    estep = None
                    loss = plain_loss(self.likelihood, stats, micro.labels)
                acc.backward(loss * scale)
            self._micro_metrics(sums, stats, micro.labels, estep, step)
        params = self.policy.trainable_parameters()
        max_norm = self.config.optim.max_grad_norm or float("inf")
        grad_norm = acc.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if use_em:
            self.em.m_step(self.reduce)
        metrics = sums.means(self.reduce)
        metrics["grad_norm"] = float(grad_norm)
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        metrics.update(parameter_summary(self.noise.annotator_parameters()))
        return metrics

    @torch.no_grad()
    def _micro_metrics(self, sums: MetricSums, stats, labels, estep, step: int) -> None:
        """TRL's reward metrics per label, the loss value, and the E-step's summaries."""
        stats = _detached(stats)
        if estep is not None:
            q = estep.q.to(stats.policy_a.device, stats.policy_a.dtype)
            value = self.likelihood.policy_loss(stats, q, self.variant).sum()
            units = labels.num_units
        else:
            value = plain_loss(self.likelihood, stats, labels)
            units = labels.num_labels if labels.shared_truth else labels.num_units
        sums.add("loss", value, units)
        reward_a, reward_b = (r.cpu().double() for r in self.likelihood.rewards(stats))
        logp_a, logp_b = stats.policy_a.cpu().double(), stats.policy_b.cpu().double()
        chose_a = labels.label > 0.5
        mask = labels.mask
        n = labels.num_labels

        def chosen_rejected(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            a, b = a.unsqueeze(-1).expand_as(chose_a), b.unsqueeze(-1).expand_as(chose_a)
            return torch.where(chose_a, a, b)[mask], torch.where(chose_a, b, a)[mask]

        rc, rr = chosen_rejected(reward_a, reward_b)
        lc, lr = chosen_rejected(logp_a, logp_b)
        sums.add("rewards/chosen", rc.sum(), n)
        sums.add("rewards/rejected", rr.sum(), n)
        sums.add("rewards/margins", (rc - rr).sum(), n)
        sums.add("rewards/accuracies", (rc > rr).double().sum(), n)
        sums.add("logps/chosen", lc.sum(), n)
        sums.add("logps/rejected", lr.sum(), n)
        if estep is not None:
            w = estep.w[mask]
            sums.add("w/mean", w.sum(), n)
            sums.add("w/frac_below_0.5", (w < 0.5).double().sum(), n)
            if not self.em.in_warmup(step):
                sums.add("marginal_nll", -estep.log_likelihood.sum(), labels.num_units)

    # -- full passes ------------------------------------------------------------
    @torch.no_grad()
    def item_logits(self) -> Tensor:
        """Induced logits of every item under the current policy ``(I,)`` (float64, CPU).

        Items are shared out over processes and the results summed, so every process
        gets all of them. Kept until the policy changes (the next optimizer step or a
        resume): the epoch's full-data EM and the run's final posteriors share them.
        """
        if self._item_logits is not None:
            return self._item_logits
        acc = self.accelerator
        self.model.eval()
        num_items = len(self.data.pairs)
        out = torch.zeros(num_items, dtype=torch.float64)
        mine = list(range(acc.process_index, num_items, acc.num_processes))
        size = self.config.optim.batch_size
        for start in range(0, len(mine), size):
            chunk = [self.data.pairs[i] for i in mine[start : start + size]]
            batch = batch_to(self.policy.collate(chunk, self.data.pad_token_id), acc.device)
            stats = self.policy(batch).to_stats(self._reference_logps(batch))
            out[batch["index"].cpu()] = self.likelihood.logits(stats).double().cpu()
        self.model.train()
        out = self.reduce(out)
        self._item_logits = out
        return out

    def full_posterior(self, logits: Tensor | None = None):
        """The exact E-step over the whole data at the current parameters.

        Returns ``(unit_logits, posterior)`` (:class:`~repo.inference.enumeration.EnumPosterior`).
        """
        if logits is None:
            logits = self.item_logits()
        unit_logits = logits[self.data.labels.unit]
        with torch.no_grad(), single_thread():
            posterior = enumerate_posterior(
                self.noise.e_step_model(), unit_logits, self.data.labels
            )
        return unit_logits, posterior

    def epoch_m_step(self) -> None:
        """Full-data EM of the annotator parameters at the current policy's logits.

        E- and M-steps alternate to convergence with the policy held (every process
        holds the same full data, so all reach the same parameters); nothing
        happens during the E-step warm-up.
        """
        if self.em.in_warmup(self.step):
            return
        self.em.fit(self.item_logits(), self.data.labels)

    # -- the loop ---------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run (or resume) training to the end; write the run directory. Final metrics."""
        self._prepare_run_dir()
        progress = self._progress()
        per_epoch = self.schedule.steps_per_epoch
        save_steps = self.config.run.save_steps
        try:
            while self.step < self.total_steps:
                metrics = self.train_step(self.step)
                self.step += 1
                metrics = {"step": self.step, "epoch": self.step / per_epoch, **metrics}
                self.last_metrics = metrics
                em = self.config.em
                if em.enabled and em.epoch_m_step and self.step % per_epoch == 0:
                    self.epoch_m_step()
                if self.is_main:
                    self._log(metrics)
                    self._update_progress(progress, metrics)
                if save_steps and self.step % save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        self.save_checkpoint()
        self._finish()
        return self.last_metrics

    def _progress(self):
        if not (self.is_main and self.config.run.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"re-po {'re-' if self.config.em.enabled else ''}{self.likelihood.name}",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _update_progress(self, progress, metrics: dict[str, float]) -> None:
        if progress is None:
            return
        shown = {"loss": f"{metrics['loss']:.4f}"}
        if "w/mean" in metrics:
            shown["w"] = f"{metrics['w/mean']:.3f}"
        params = self.noise.annotator_parameters() if self.config.em.enabled else {}
        if params:
            name, value = next(iter(params.items()))
            shown[name] = f"{float(value.min()):.3f}-{float(value.max()):.3f}"
        progress.set_postfix(shown, refresh=False)
        progress.update(1)

    def _log(self, metrics: dict[str, float]) -> None:
        if self.step % self.config.run.logging_steps == 0 or self.step == self.total_steps:
            self.metrics_log.write(metrics)
        params = {k: v.tolist() for k, v in self.noise.annotator_parameters().items()}
        self.annotator_log.write({"step": self.step, **params})

    # -- run directory ----------------------------------------------------------
    def resolved_config(self) -> dict[str, Any]:
        """The configuration with defaults filled in and paths made absolute."""
        config = self.config.to_dict()
        config["run"]["output_dir"] = str(self.output_dir)
        if config["data"]["train"]:
            config["data"]["train"] = str(self.config.path(config["data"]["train"]))
        return {
            "config": config,
            "likelihood": {
                "family": self.likelihood.name,
                "variant": self.variant,
                **self.likelihood.hparams(),
            },
            "noise": {"model": self.noise.name, "num_annotators": self.noise.num_annotators},
            "recipe": None if self.policy.recipe is None else self.policy.recipe.name,
            "processes": self.accelerator.num_processes,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "global_batch": self.schedule.global_batch,
        }

    def _prepare_run_dir(self) -> None:
        out = self.output_dir
        checkpoints = out / "checkpoints"
        latest = latest_checkpoint(checkpoints)
        if self.config.run.resume and latest is not None:
            self.resume(load_checkpoint(latest))
        elif self.is_main and (out / "config.json").exists() and not self.config.run.overwrite:
            raise ConfigError(
                f"[run] output_dir {out} already holds a run: resume it (--resume), choose "
                "another output_dir, or set [run] overwrite = true"
            )
        if self.step == 0 and self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for log in (self.metrics_log, self.annotator_log):
                if log.path.exists():
                    log.path.unlink()
            _write_json(out / "config.json", self.resolved_config())
            _write_json(out / "annotators.json", {"annotators": self.data.annotator_ids})
            _write_json(out / "data_report.json", self.data_report())
        self.accelerator.wait_for_everyone()

    def data_report(self) -> dict[str, Any]:
        """What the data turned into, and what was dropped under which policy."""
        labels = self.data.labels
        report = {
            "records": len(self.records),
            "items": len(self.data.pairs),
            "labels": labels.num_labels,
            "truth_units": labels.num_units,
            "shared_truth": labels.shared_truth,
            "annotators": len(self.data.annotator_ids),
            "shown_order": self.records.shown_order,
            "skipped": self.data.skipped,
            "notes": self.data.notes,
            "units_per_epoch": self.schedule.steps_per_epoch * self.schedule.global_batch,
        }
        if self.noise.reads_position and not self.records.shown_order:
            report["warning"] = (
                f"the {self.noise.name} model reads the A/B position, but the data record no "
                "display order: A/B is a label-independent order, so its position parameters "
                "describe that order, not what annotators saw"
            )
        return report

    # -- checkpoints ------------------------------------------------------------
    def _write_model(self, folder: Path) -> None:
        if self.policy.has_adapter:
            self.policy.lm.save_pretrained(folder / "adapter")
        else:
            from safetensors.torch import save_file

            state = {
                n: p.detach().cpu().contiguous()
                for n, p in self.policy.named_trainable_parameters()
            }
            save_file(state, str(folder / "model.safetensors"))

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (main process; all wait)."""
        path = None
        if self.is_main:
            path = save_checkpoint(
                self.output_dir / "checkpoints",
                self.step,
                write_model=self._write_model,
                optimizer=self.optimizer.state_dict(),
                noise=self.em.state_dict(),
                state={
                    "scheduler": _jsonable(self.scheduler.state_dict()),
                    "config": self.config.to_dict(),
                    "data_fingerprint": self.fingerprint,
                    "annotators": self.data.annotator_ids,
                    "noise_model": self.noise.name,
                    "loss_family": self.likelihood.name,
                    "processes": self.accelerator.num_processes,
                },
                keep=self.config.run.save_total_limit,
            )
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: weights, optimizer, schedule, annotators, RNG, step.

        :raises CheckpointError: the checkpoint belongs to another configuration, data,
            noise model or model (the message names what differs).
        """
        state = checkpoint.state
        self._check_compatible(checkpoint)
        self._load_model(checkpoint)
        try:
            self.optimizer.load_state_dict(
                optimizer_from_tensors(checkpoint.optimizer, state["optimizer_groups"])
            )
            self.em.load_state_dict(checkpoint.noise)
        except (KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"{checkpoint.path}: state does not fit this run: {error}"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(checkpoint.rng, state["rng"])
        self.step = checkpoint.step
        self._item_logits = None
        if self.is_main:
            self.metrics_log.truncate_after(self.step)
            self.annotator_log.truncate_after(self.step)

    def _check_compatible(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        saved = state.get("config", {})
        current = self.config.to_dict()
        for section, fields in current.items():
            for name, value in fields.items():
                if name in _RESUMABLE.get(section, set()):
                    continue
                old = saved.get(section, {}).get(name, value)
                if old != value:
                    raise CheckpointError(
                        f"{checkpoint.path} was written with [{section}] {name} = {old!r}, "
                        f"this run has {value!r}"
                    )
        if state.get("data_fingerprint") != self.fingerprint:
            raise CheckpointError(f"{checkpoint.path} was written for other data")
        if state.get("processes") != self.accelerator.num_processes:
            raise CheckpointError(
                f"{checkpoint.path} was written by {state.get('processes')} processes, this run "
                f"has {self.accelerator.num_processes} (the data order depends on it)"
            )

    def _load_model(self, checkpoint: Checkpoint) -> None:
        from safetensors.torch import load_file

        if self.policy.has_adapter:
            from peft import set_peft_model_state_dict

            file = checkpoint.adapter_dir / "adapter_model.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{checkpoint.path}: no adapter/adapter_model.safetensors")
            weights = load_file(str(file))
            expected = {n for n, _ in self.policy.named_trainable_parameters()}
            result = set_peft_model_state_dict(self.policy.lm, weights)
            if result.unexpected_keys or len(weights) != len(expected):
                raise CheckpointError(
                    f"{checkpoint.path}: the adapter does not fit this model "
                    f"({len(weights)} tensors for {len(expected)} trainable ones)"
                )
            return
        file = checkpoint.path / "model.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{checkpoint.path}: no model.safetensors")
        weights = load_file(str(file))
        params = dict(self.policy.named_trainable_parameters())
        if set(weights) != set(params):
            raise CheckpointError(f"{checkpoint.path}: the weights do not fit this model")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])

    def evaluate(self, records: PreferenceData) -> dict[str, Any]:
        """Accuracy, margin and calibration of the current policy on ``records``
        (see :mod:`repo.train.evaluate`); reference log-probs through the run's cache
        when ``[model] reference = "precompute"``."""
        from repo.train.evaluate import evaluate_policy

        data = TrainingData.build(records, self.pair_tokenizer)
        reference = None
        if self.likelihood.needs_reference and self.config.model.reference == "precompute":
            reference = self._reference_cache().get_or_compute(
                self.policy,
                data.pairs,
                batch_size=self.config.optim.batch_size,
                progress=self.is_main and self.config.run.progress,
            )
        return evaluate_policy(
            self.policy,
            self.likelihood,
            data,
            batch_size=self.config.optim.batch_size,
            reference=reference,
        )

    # -- the end ------------------------------------------------------------------
    def _finish(self) -> None:
        from safetensors.torch import save_file

        out = self.output_dir
        posterior = None
        if self.config.run.posteriors and self.config.em.enabled:
            posterior = self.full_posterior()
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return
        if self.policy.has_adapter:
            self.policy.save_adapter(out / "adapter")
        else:
            self._write_model(out)
        save_file(
            {k: v.contiguous() for k, v in self.em.state_dict().items()},
            str(out / "noise.safetensors"),
        )
        _write_json(out / "reliability.json", self.reliability())
        if posterior is not None:
            self.write_posteriors(out / "posteriors.jsonl", *posterior)
        self.accelerator.wait_for_everyone()

    def reliability(self) -> dict[str, Any]:
        """Per annotator: label count and the noise model's parameters."""
        counts = self.data.label_counts()
        params = self.noise.annotator_parameters()
        return {
            "model": self.noise.name,
            "annotators": [
                {
                    "id": a,
                    "n_labels": int(counts[k]),
                    **{name: float(v[k]) for name, v in params.items()},
                }
                for k, a in enumerate(self.data.annotator_ids)
            ],
            "population": {k: float(v) for k, v in self.noise.population_parameters().items()},
        }

    def write_posteriors(self, path: Path, unit_logits: Tensor, posterior) -> None:
        """Per label: its record, annotator, label (in the item's A/B order), ``w``, ``q``,
        the item's induced logit and whether the label is flagged (``w < 1/2``)."""
        labels = self.data.labels
        w = labels.flat(self.noise.label_correct(unit_logits, labels, posterior.marginals))
        q_unit = self.noise.truth_posterior(unit_logits, posterior.marginals)
        q = labels.flat(q_unit.unsqueeze(-1).expand_as(labels.label))
        logit = labels.flat(unit_logits.unsqueeze(-1).expand_as(labels.label))
        annotator = labels.flat(labels.annotator)
        label = labels.flat(labels.label)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for j in range(labels.num_labels):
                n = int(self.data.label_record[j])
                record = self.records[n]
                fh.write(
                    json.dumps(
                        {
                            "record": n,
                            "row": record.row,
                            "item": record.item,
                            "annotator": self.data.annotator_ids[int(annotator[j])],
                            "label": int(label[j]),
                            "w": float(w[j]),
                            "q": float(q[j]),
                            "logit": float(logit[j]),
                            "flipped": bool(w[j] < 0.5),
                        }
                    )
                    + "\n"
                )
        os.replace(tmp, path)


def _detached(stats):
    from repo.likelihoods.stats import PairLogps

    def d(t):
        return None if t is None else t.detach()

    return PairLogps(
        d(stats.policy_a),
        d(stats.policy_b),
        d(stats.length_a),
        d(stats.length_b),
        d(stats.reference_a),
        d(stats.reference_b),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)
