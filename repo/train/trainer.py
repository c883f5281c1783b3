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

Processes come from ``accelerate`` (``torchrun`` / ``accelerate launch``): with
``[run] distributed = "ddp"`` the policy is wrapped by ``Accelerator.prepare_model``
(DDP, every process holds the whole model); with ``"fsdp"`` its network is sharded
in place by FSDP2 (:mod:`repo.train.sharding`: parameters, gradients and AdamW's
moments split over the processes; checkpoints and the final model gathered whole).
Gradients of all but the last micro-batch skip synchronisation, and small sums
(statistics, metrics) go through ``Accelerator.reduce``.

The trainer holds the loop only. Its components (records, policy and reference,
tokeniser, likelihood, noise model, online EM, optimizer, schedule) come from
:mod:`repo.train.build`; what it writes goes through
:class:`~repo.train.run_dir.RunDir` (the run directory's layout is described
there): the resolved configuration, the data report and annotator ids at the
start, metrics and the annotator trajectory per step, checkpoints, and at the end
the final policy (the LoRA adapter, or for full fine-tuning a Hugging Face model
folder), the online EM's state, per-annotator reliability, per-label posteriors and
the final noise model as a :class:`~repo.fit.NoiseFit` (the trained parameters at
the final policy's logits). The run's own checks of
:mod:`repo.diagnostics.checks` (with one annotator, an ``eta`` its labels do not pin
down) are kept in :attr:`Trainer.warnings` and ``reliability.json``, and ``re-po
train`` prints them; the final fit's Laplace checks run where it is read
(``re-po diagnose``).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repo.data.records import PreferenceData
from repo.diagnostics.checks import FitWarning
from repo.inference.enumeration import enumerate_posterior
from repo.inference.online import single_thread
from repo.policy import Policy, ReferenceLogps, ResponseLogps, batch_to
from repo.train.build import (
    build_held_out,
    build_likelihood,
    build_online_em,
    build_optimizer,
    build_reference,
    build_run,
    build_schedule,
    build_scheduler,
    estep_settings,
    model_recipe,
    run_steps,
    seed_everything,
)
from repo.train.checkpoint import (
    Checkpoint,
    check_compatible,
    jsonable,
    load_checkpoint,
    restore_training_state,
)
from repo.train.config import ConfigError, TrainConfig
from repo.train.cross_fit import fold_config, fold_scores, item_folds, scorer_records
from repo.train.dataset import TrainingData
from repo.train.evaluate import evaluate_records, label_metrics
from repo.train.metrics import MetricSums, ProgressBar, add_micro_metrics, parameter_summary
from repo.train.objective import gather_stats, plain_loss, policy_objective
from repo.train.run_dir import RunDir
from repo.train.sharding import (
    clip_grad_norm,
    full_model_state,
    full_optimizer_state,
    full_trainable_state,
    shard_policy,
)
from repo.train.summaries import (
    data_report,
    posterior_rows,
    reliability,
    resolved_config,
    scored_fit,
)

__all__ = ["Trainer", "tracker_config"]


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """The configuration as the flat ``{"section/field": value}`` of numbers, strings
    and booleans that trackers take as hyper-parameters (lists as strings)."""
    flat = {}
    for section, fields in config.to_dict().items():
        for name, value in fields.items():
            flat[f"{section}/{name}"] = str(list(value)) if isinstance(value, tuple) else value
    return flat


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
        self.accelerator = accelerator or self._make_accelerator(config)
        acc = self.accelerator
        self.seed_everything(config.run.seed)
        parts = build_run(config, device=acc.device, policy=policy, records=records)
        self.records, self.policy, self.data = parts.records, parts.policy, parts.data
        self.likelihood, self.variant = parts.likelihood, parts.variant
        self.pair_tokenizer, self.noise = parts.pair_tokenizer, parts.noise
        self.eval_data = parts.eval_data
        # how the online EM reads the policy, "auto" resolved for this data and run length
        every = build_schedule(config, self.data, acc.num_processes)  # no unit held out
        passes = math.ceil(run_steps(config, every) / every.steps_per_epoch)
        self.estep = estep_settings(
            config, self.likelihood, self.noise, len(self.data.pairs), passes
        )
        self.held_out = build_held_out(config, self.data, self.estep.held_out)
        self.schedule = build_schedule(config, self.data, acc.num_processes, self.held_out)
        self.total_steps = run_steps(config, self.schedule)
        passes = self.schedule.epoch_of(self.total_steps - 1)[0] + 1
        batch = self.schedule.global_batch
        self.em = build_online_em(
            config,
            self.noise,
            self.likelihood,
            self.data.label_counts(),
            num_items=len(self.data.pairs),
            labels=self.data.labels,
            passes=passes,
            pass_size=[self.schedule.steps_in(e) * batch for e in range(passes)],
            settings=self.estep,
        )
        with acc.main_process_first():  # one process computes the reference cache
            show = self.is_main and config.run.progress
            self.reference = build_reference(config, parts, progress=show)
            self.eval_reference = None
            if self.eval_data is not None:
                self.eval_reference = build_reference(
                    config, parts, progress=show, data=self.eval_data
                )
        self.sharded = config.run.distributed == "fsdp" and acc.num_processes > 1
        if self.sharded:  # the optimizer then holds the shards
            shard_policy(self.policy, acc.device)
        self.optimizer = build_optimizer(config, self.policy, acc.device)
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        self.model = self.policy if self.sharded else acc.prepare_model(self.policy)
        self.step = 0
        self.fingerprint = self.data.fingerprint()
        self.output_dir = config.output_dir
        self.run_dir = RunDir(self.output_dir)
        self.metrics_log = self.run_dir.metrics_log()
        self.annotator_log = self.run_dir.trajectory_log()
        self.last_metrics: dict[str, float] = {}
        self.warnings: list[FitWarning] = []  # the run's checks at the end (main process)
        self._item_logits: Tensor | None = None  # of the current policy; see item_logits

    # -- construction ---------------------------------------------------------
    @staticmethod
    def _make_accelerator(config: TrainConfig):
        """An Accelerator on ``[model] device`` (``"auto"`` as
        :func:`~repo.policy.device.select_device` picks it, so a torchrun launch without
        CUDA is one gloo run of all its processes), with the trackers of ``[run]
        report_to`` logging under ``<output_dir>/trackers``."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from repo.policy import select_device

        report_to = list(config.run.report_to)
        return Accelerator(
            cpu=select_device(config.model.device).type == "cpu",
            log_with=report_to or None,
            project_config=ProjectConfiguration(
                project_dir=str(config.output_dir),
                logging_dir=str(RunDir(config.output_dir).trackers),
            ),
        )

    @staticmethod
    def seed_everything(seed: int) -> None:
        """Seed Python, NumPy, torch (all devices) and Pyro."""
        seed_everything(seed)

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

    def _reference_logps(
        self, batch: dict[str, Tensor], reference: ReferenceLogps | None
    ) -> ResponseLogps | None:
        """The batch's reference log-probs: from ``reference`` (the precomputed log-probs
        of the batch's data), or by the policy's reference when none were precomputed."""
        if not self.likelihood.needs_reference:
            return None
        if reference is not None:
            return reference.for_batch(batch)
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
            with self._gradient_sync(last):
                logps = self.model(batch)
                reference = self._reference_logps(batch, self.reference)
                stats = gather_stats(logps.to_stats(reference), micro.unit_item)
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
            add_micro_metrics(
                sums,
                self.likelihood,
                self.variant,
                stats,
                micro.labels,
                estep,
                marginal=not self.em.in_warmup(step),
            )
        params = self.policy.trainable_parameters()
        max_norm = self.config.optim.max_grad_norm or float("inf")
        if self.sharded:
            grad_norm = clip_grad_norm(params, max_norm)
        else:
            grad_norm = acc.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if use_em:
            self.em.m_step(self.reduce)
        metrics = sums.means(self.reduce)
        if use_em:
            metrics["noise/evident"] = float(self.em.noise_evident)
            metrics["posterior/on"] = float(self.em.posterior_on)  # else the labels as given
            metrics["e_step_scale"] = float(self.em.scale)  # the a the E-step read s at
        metrics["grad_norm"] = float(grad_norm)
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        metrics.update(parameter_summary(self.noise.annotator_parameters()))
        return metrics

    def _gradient_sync(self, sync: bool):
        """Gradient synchronisation on (``sync``) or off for the next backward pass:
        DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``."""
        if self.sharded:
            self.policy.lm.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    # -- full passes ------------------------------------------------------------
    @torch.no_grad()
    def item_scores(
        self,
        data: TrainingData,
        reference: ReferenceLogps | None,
        items: Tensor | None = None,
    ) -> Tensor:
        """Induced logit and rewards of A and B of every item of ``data`` (or of
        ``items`` only, the others' columns NaN) under the current policy: ``(3, I)``
        float64 on the CPU (rows: logit, reward A, reward B).

        Items are shared out over processes and the results summed, so every process
        gets all of them. Every process runs the same number of forwards (one with
        nothing of its own to score runs a batch and drops it), as FSDP's collective
        forward needs. ``reference``: the precomputed reference log-probs of ``data``
        (``None``: the policy's reference runs).
        """
        acc = self.accelerator
        self.model.eval()
        num_items = len(data.pairs)
        out = torch.zeros(3, num_items, dtype=torch.float64)
        scored = list(range(num_items)) if items is None else items.tolist()
        mine = scored[acc.process_index :: acc.num_processes]
        size = self.config.optim.batch_size
        rounds = math.ceil(math.ceil(len(scored) / acc.num_processes) / size)
        for r in range(rounds):
            chunk = mine[r * size : (r + 1) * size]
            pairs = [data.pairs[i] for i in chunk] or data.pairs[:1]
            batch = batch_to(self.policy.collate(pairs, data.pad_token_id), acc.device)
            stats = self.policy(batch).to_stats(self._reference_logps(batch, reference))
            if chunk:
                index = batch["index"].cpu()
                out[0, index] = self.likelihood.logits(stats).double().cpu()
                reward_a, reward_b = self.likelihood.rewards(stats)
                out[1, index] = reward_a.double().cpu()
                out[2, index] = reward_b.double().cpu()
        self.model.train()
        out = self.reduce(out)
        if items is not None:
            keep = torch.zeros(num_items, dtype=torch.bool)
            keep[items] = True
            out[:, ~keep] = float("nan")
        return out

    def item_logits(self) -> Tensor:
        """Induced logits of every training item under the current policy ``(I,)``
        (float64, CPU; :meth:`item_scores`). Kept until the policy changes (the next
        optimizer step or a resume): the epoch's full-data EM and the run's final
        posteriors share them.
        """
        if self._item_logits is None:
            self._item_logits = self.item_scores(self.data, self.reference)[0]
        return self._item_logits

    def held_out_logits(self, epoch: int) -> Tensor:
        """``(I,)`` the held-out items' logits for the refit at the end of ``epoch``, NaN
        for every other item: their scores under the current policy, which has not
        trained on them; or, in an epoch whose batches held them
        (``[em] train_held_out``), their scores at their first visit in it, before the
        policy trained on them (:meth:`~repo.inference.online.OnlineEM.first_visit_logits`;
        every process must call it)."""
        start = self.schedule.train_held_out_from
        if start is None or epoch < start:
            return self.item_scores(self.data, self.reference, self.held_out)[0]
        first = self.em.first_visit_logits(self.reduce)
        logits = torch.full_like(first, float("nan"))
        logits[self.held_out] = first[self.held_out]
        return logits

    def evaluate_held_out(self) -> dict[str, float]:
        """The current policy on ``[data] eval``: ``eval/accuracy``, ``eval/margin``,
        ``eval/log_loss``, ``eval/brier``, ``eval/ece``, ... (see
        :mod:`repo.train.evaluate`); every process gets the same numbers."""
        if self.eval_data is None:
            raise ConfigError("[data] eval is not set: there is no held-out data")
        scores = self.item_scores(self.eval_data, self.eval_reference)
        result = label_metrics(self.eval_data, *scores)
        return {f"eval/{name}": value for name, value in result.items()}

    def full_posterior(self, logits: Tensor | None = None):
        """The exact E-step over the whole data at the current parameters, at per-item
        ``logits`` (default the current policy's, :meth:`item_logits`).

        Returns ``(unit_logits, posterior)`` (:class:`~repo.inference.enumeration.EnumPosterior`).
        """
        if logits is None:
            logits = self.item_logits()
        unit_logits = self.em.calibrated(logits[self.data.labels.unit])
        with torch.no_grad(), single_thread():
            posterior = enumerate_posterior(
                self.noise.e_step_model(), unit_logits, self.data.labels
            )
        return unit_logits, posterior

    # -- the loop ---------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run (or resume) training to the end; write the run directory. Final metrics."""
        self._start_or_resume()
        if self.estep.cross_fit and self.em.cross_fit_logits is None:
            self.cross_fit()
        eval_steps = self.config.run.eval_steps
        progress = None
        if self.is_main and self.config.run.progress:
            em = "re-" if self.config.em.enabled else ""
            progress = ProgressBar(self.total_steps, self.step, f"re-po {em}{self.likelihood.name}")
        save_steps = self.config.run.save_steps
        try:
            while self.step < self.total_steps:
                metrics = self.train_step(self.step)
                self.step += 1
                epoch, position = self.schedule.epoch_of(self.step)
                epochs = epoch + position / self.schedule.steps_in(epoch)
                metrics = {"step": self.step, "epoch": epochs, **metrics}
                self.last_metrics = metrics
                em = self.config.em
                end_of_epoch = position == 0 or self.step == self.total_steps
                if em.enabled and end_of_epoch:  # the annotator refit of the pass
                    held_out = None
                    if self.held_out is not None and not self.em.in_warmup(self.step):
                        held_out = self.held_out_logits(self.schedule.epoch_of(self.step - 1)[0])
                    if self.em.end_pass(self.step, self.reduce, held_out) is not None:
                        # the step's row logs the parameters the refit left, as the
                        # run's fit (reliability.json) has them
                        metrics.update(parameter_summary(self.noise.annotator_parameters()))
                last = self.step == self.total_steps
                if self.eval_data is not None and (
                    last or (eval_steps and self.step % eval_steps == 0)
                ):
                    metrics.update(self.evaluate_held_out())
                if self.is_main:
                    self._log(metrics)
                    if progress is not None:
                        params = self.noise.annotator_parameters() if self.config.em.enabled else {}
                        progress.update(metrics, params)
                if save_steps and self.step % save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        self.save_checkpoint()
        self._finish()
        for tracker in self.accelerator.trackers:  # not end_training: it ends the process group
            tracker.finish()
        return self.last_metrics

    def _log(self, metrics: dict[str, float]) -> None:
        evaluated = any(name.startswith("eval/") for name in metrics)
        if (
            self.step % self.config.run.logging_steps == 0
            or self.step == self.total_steps
            or evaluated
        ):
            self.metrics_log.write(metrics)
            self.accelerator.log(metrics, step=self.step)
        params = {k: v.tolist() for k, v in self.noise.annotator_parameters().items()}
        self.annotator_log.write({"step": self.step, **params})

    # -- run directory ----------------------------------------------------------
    def _start_or_resume(self) -> None:
        run = self.run_dir
        latest = run.latest_checkpoint()
        if self.config.run.resume and latest is not None:
            self.resume(load_checkpoint(latest))
        elif (
            self.is_main
            and run.holds_run()
            and not (self.config.run.overwrite or self.config.run.resume)
        ):  # resumed before its first checkpoint: it starts again (a cross-fitted run's
            # finished scorers are kept)
            raise ConfigError(
                f"[run] output_dir {run.path} already holds a run: resume it (--resume), "
                "choose another output_dir, or set [run] overwrite = true"
            )
        if self.step == 0 and self.is_main:
            resolved = resolved_config(
                self.config,
                self.likelihood,
                self.variant,
                self.noise,
                self.policy.recipe,
                processes=self.accelerator.num_processes,
                total_steps=self.total_steps,
                schedule=self.schedule,
            )
            report = data_report(self.records, self.data, self.noise, self.schedule)
            if self.eval_data is not None:
                report["eval"] = {
                    "items": len(self.eval_data.pairs),
                    "labels": self.eval_data.labels.num_labels,
                    "skipped": self.eval_data.skipped,
                }
            run.start(resolved, self.data.annotator_ids, report)
        if self.config.run.report_to:
            self.accelerator.init_trackers(run.path.name, config=tracker_config(self.config))
        self.accelerator.wait_for_everyone()

    def cross_fit(self) -> None:
        """Fix the E-step on cross-fitted scores (``[em] cross_fit``): split the items in
        ``[em] cross_fit_folds`` folds, train each fold's scorer on the others
        (:func:`~repo.train.cross_fit.fold_config` on
        :func:`~repo.train.cross_fit.scorer_records`, each a run of its own), score each
        fold's items by its scorer, which never saw them
        (:func:`~repo.train.cross_fit.fold_scores`; the scorers' loss family ``[em]
        cross_fit_scorer`` or the family's choice) and fit the annotator parameters and
        the scale to those scores
        (:meth:`~repo.inference.online.OnlineEM.fit_cross_fitted`). The RNGs are then
        seeded anew, so a run resumed after its scorers finished trains as one that
        never stopped."""
        config, data = self.config, self.data
        folds = self.estep.cross_fit_folds
        fold = item_folds(len(data.pairs), config.run.seed, folds)
        logits = torch.full((len(data.pairs),), float("nan"), dtype=torch.float64)
        device = self.accelerator.device
        for k in range(folds):
            share = float((fold[data.labels.unit] != k).double().mean())
            sub = fold_config(config, k, self.total_steps, share, self.estep.cross_fit_scorer)
            own = sub.loss == config.loss  # else the scorers' family, at its defaults
            scorer = self.likelihood if own else build_likelihood(sub, model_recipe(sub))
            run = RunDir(sub.output_dir)
            # resumed: a finished scorer is kept, one cut short continues; else afresh
            if not (config.run.resume and run.has_final_policy()):
                resume = config.run.resume and run.latest_checkpoint() is not None
                sub = sub.replace("run", resume=resume, overwrite=True)
                Trainer(sub, records=scorer_records(data, fold, k)).train()
            items = (fold == k).nonzero().reshape(-1).tolist()
            logits[items] = fold_scores(sub, run, scorer, data, items, self.reference, device)
        self.em.fit_cross_fitted(logits, data.labels)
        self.seed_everything(config.run.seed)

    # -- checkpoints ------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (main process; all wait; under FSDP
        every process first takes part in gathering the weights and AdamW's state)."""
        path = None
        weights, optimizer = None, None
        if self.sharded:
            weights = full_trainable_state(self.policy)
            optimizer = full_optimizer_state(self.policy, self.optimizer)
        noise = self.em.state_dict(self.reduce)  # every process: items visited anywhere
        if self.is_main:
            path = self.run_dir.save_checkpoint(
                self.step,
                self.policy,
                weights=weights,
                optimizer=optimizer or self.optimizer.state_dict(),
                noise=noise,
                state={
                    "scheduler": jsonable(self.scheduler.state_dict()),
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
        check_compatible(
            checkpoint, self.config.to_dict(), self.fingerprint, self.accelerator.num_processes
        )
        restore_training_state(
            checkpoint,
            policy=self.policy,
            optimizer=self.optimizer,
            online_em=self.em,
            scheduler=self.scheduler,
        )
        self.step = checkpoint.step
        self._item_logits = None
        if self.is_main:
            self.metrics_log.truncate_after(self.step)
            self.annotator_log.truncate_after(self.step)

    def evaluate(self, records: PreferenceData) -> dict[str, Any]:
        """Accuracy, margin and calibration of the current policy on ``records``
        (:func:`repo.train.evaluate.evaluate_records`)."""
        return evaluate_records(
            self.config, self.policy, self.likelihood, self.pair_tokenizer, records
        )

    # -- the end ------------------------------------------------------------------
    def _estep_settings(self) -> dict[str, Any] | None:
        """The E-step settings ``[em]`` resolved to (``None`` with EM off)."""
        if not self.config.em.enabled:
            return None
        return self.estep._asdict()

    def _finish(self) -> None:
        posterior = None
        scores = self.em.cross_fit_logits  # the E-step's scores when cross-fitted
        if self.config.run.posteriors and self.config.em.enabled:
            posterior = self.full_posterior(scores)
        first_visit = self.em.first_visit_logits(self.reduce)
        noise = self.em.state_dict(self.reduce)
        whole = full_model_state(self.policy) if self.sharded else None
        if self.is_main:
            run, n = self.run_dir, self.config.noise
            run.save_final_policy(self.policy, state_dict=whole)
            run.write_noise_state(noise)
            report = reliability(
                self.noise,
                self.data,
                self.em.scale,
                first_visit=first_visit,
                noise_test=self.em.noise_test_result,
                e_step=self._estep_settings(),
                first_visit_scale=self.em.out_of_sample_scale,
                held_out=self.em.held_out_logits,
                held_out_scale=self.em.held_out_scale,
                cross_fit=scores,
            )
            run.write_reliability(report)
            self.warnings = [FitWarning.from_dict(w) for w in report.get("warnings", [])]
            if posterior is not None:
                rows = posterior_rows(self.noise, self.data, *posterior)
                run.write_posteriors(rows)
                ids, shared = self.data.annotator_ids, self.data.labels.shared_truth
                fit = scored_fit(self.noise, rows, ids, shared_truth=shared, prior=n.prior)
                run.write_noise_fit(fit)
        self.accelerator.wait_for_everyone()
