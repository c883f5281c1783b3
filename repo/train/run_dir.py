"""The run directory of ``re-po train``: the one place that knows its file names.

A run directory (``[run] output_dir``) holds::

    config.json          the resolved configuration (absolute paths, beta, variant, ...)
    data_report.json     records, units, labels, annotators, what was skipped and why
    annotators.json      annotator ids (the order of every per-annotator list)
    metrics.jsonl        per logged step (see repo.train.metrics)
    annotators.jsonl     the per-annotator parameter trajectory
    checkpoints/         step-NNNNNN/ (see repo.train.checkpoint)
    adapter/             LoRA: the final adapter (peft; PeftModel.from_pretrained(base, adapter/))
    model/               full fine-tuning: the final model and tokenizer (save_pretrained;
                         AutoModelForCausalLM.from_pretrained(model/))
    noise.safetensors    the final state of the online EM (annotator parameters, ...)
    noise/               the final noise model as a NoiseFit (repo.fit: fit.json, labels.parquet,
                         items.parquet): estimates at the final policy's logits
    reliability.json     per annotator at the end: label count, parameters
    posteriors.jsonl     per label at the end: w (label correct), q (A truly better),
                         logit (the item's induced logit), flipped (w < 1/2)
    reference-cache/     reference log-probs (unless [model] reference_cache_dir is set)
    cross-fit/scorer-K/  [em] cross_fit: the run of fold K's scorer (trained on the others)
    trackers/            [run] report_to: the trackers' logs (TensorBoard: trackers/<name>/)
    export-<mode>.jsonl  what ``re-po export`` writes by default

:class:`RunDir` writes and reads each of them; every other module asks it for
paths and contents. JSON files are written to a temporary name and renamed, so a
killed process never leaves half a file; the final policy is written to a
temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from repo.fit import NoiseFit
from repo.train.checkpoint import (
    latest_checkpoint,
    load_adapter_weights,
    save_checkpoint,
    write_policy_weights,
)
from repo.train.config import TrainConfig
from repo.train.metrics import JsonlLog

__all__ = ["RunDir"]


class RunDir:
    """A ``re-po train`` run directory (see the module docstring).

    :param path: the folder (it need not exist yet).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- file names -------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def data_report_file(self) -> Path:
        return self.path / "data_report.json"

    @property
    def annotators_file(self) -> Path:
        return self.path / "annotators.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def trajectory_file(self) -> Path:
        return self.path / "annotators.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        """The final LoRA adapter's folder."""
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        """The final full fine-tune's model folder."""
        return self.path / "model"

    @property
    def noise_file(self) -> Path:
        return self.path / "noise.safetensors"

    @property
    def noise_fit(self) -> Path:
        """The final noise model's :class:`~repo.fit.NoiseFit` folder."""
        return self.path / "noise"

    @property
    def reliability_file(self) -> Path:
        return self.path / "reliability.json"

    @property
    def posteriors_file(self) -> Path:
        return self.path / "posteriors.jsonl"

    @property
    def trackers(self) -> Path:
        """The metric trackers' folder (``[run] report_to``: TensorBoard's event files
        under ``trackers/<run name>/``)."""
        return self.path / "trackers"

    @property
    def reference_cache(self) -> Path:
        """The default folder of the reference log-prob cache."""
        return self.path / "reference-cache"

    def cross_fit_scorer(self, fold: int) -> Path:
        """The run directory of fold ``fold``'s scorer (``[em] cross_fit``), trained on
        the items of the other folds: a run of its own, with its checkpoints and final
        policy."""
        return self.path / "cross-fit" / f"scorer-{fold}"

    def export_file(self, mode: str) -> Path:
        """Where ``re-po export --mode MODE`` writes by default."""
        return self.path / f"export-{mode}.jsonl"

    # -- the start of a run -----------------------------------------------------
    def holds_run(self) -> bool:
        """Whether a run was started here (its ``config.json`` exists)."""
        return self.config_file.is_file()

    def start(
        self, resolved: dict[str, Any], annotator_ids: list[str], data_report: dict[str, Any]
    ) -> None:
        """Begin a fresh run: the folder, the configuration, the annotator ids and the
        data report; logs of an earlier run here are removed."""
        self.path.mkdir(parents=True, exist_ok=True)
        for log in (self.metrics_file, self.trajectory_file):
            if log.exists():
                log.unlink()
        _write_json(self.config_file, resolved)
        _write_json(self.annotators_file, {"annotators": list(annotator_ids)})
        _write_json(self.data_report_file, data_report)

    def read_resolved(self) -> dict[str, Any]:
        """The whole ``config.json``: the configuration and what the trainer resolved
        (likelihood, noise model, steps, ...)."""
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a re-po run directory (no config.json)")
        return json.loads(self.config_file.read_text(encoding="utf-8"))

    def read_config(self) -> TrainConfig:
        """The run's configuration (relative paths resolve against the run directory)."""
        return TrainConfig.from_dict(self.read_resolved()["config"], base_dir=self.path)

    def read_annotators(self) -> list[str]:
        """The annotator ids, in the order of every per-annotator list."""
        return [str(a) for a in _read_json(self.annotators_file)["annotators"]]

    def read_data_report(self) -> dict[str, Any]:
        return _read_json(self.data_report_file)

    def metrics_log(self) -> JsonlLog:
        return JsonlLog(self.metrics_file)

    def trajectory_log(self) -> JsonlLog:
        return JsonlLog(self.trajectory_file)

    # -- checkpoints --------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, or ``None``."""
        return latest_checkpoint(self.checkpoints)

    def save_checkpoint(
        self,
        step: int,
        policy: Any,
        *,
        optimizer: dict[str, Any],
        noise: dict[str, Tensor],
        state: dict[str, Any],
        keep: int,
        weights: dict[str, Tensor] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` (:func:`~repo.train.checkpoint.save_checkpoint`;
        ``weights``: the trainable tensors gathered whole from a sharded policy)."""
        return save_checkpoint(
            self.checkpoints,
            step,
            write_model=lambda folder: write_policy_weights(policy, folder, weights),
            optimizer=optimizer,
            noise=noise,
            state=state,
            keep=keep,
        )

    # -- the end of a run ---------------------------------------------------------
    def save_final_policy(self, policy: Any, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the final policy: the adapter (LoRA) or the whole model (full
        fine-tuning), each with the tokenizer, as Hugging Face folders (``state_dict``:
        the whole model's tensors, gathered from a sharded one)."""
        target = self.adapter if policy.has_adapter else self.model
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".tmp-{target.name}-"))
        try:
            if policy.has_adapter:
                policy.save_adapter(tmp)
            else:
                policy.lm.save_pretrained(tmp, state_dict=state_dict)
                if policy.tokenizer is not None:
                    policy.tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def has_final_policy(self) -> bool:
        """Whether the run finished: its final adapter or model is written."""
        return self.adapter.is_dir() or (self.model / "config.json").is_file()

    def final_model(self) -> Path:
        """The final full fine-tune's model folder.

        :raises FileNotFoundError: there is none (the run did not finish, or trained
            a LoRA adapter).
        """
        if not (self.model / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.path}: no final model (model/config.json; did the run finish?)"
            )
        return self.model

    def load_final_adapter(self, policy: Any) -> None:
        """Set ``policy``'s adapter to the run's final one.

        :raises FileNotFoundError: the run has no final adapter (it did not finish).
        """
        if not self.adapter.is_dir():
            raise FileNotFoundError(f"{self.path}: no final adapter (did the run finish?)")
        load_adapter_weights(policy, self.adapter)

    def write_noise_state(self, tensors: dict[str, Tensor]) -> None:
        """The online EM's final state (``OnlineEM.state_dict()``)."""
        from safetensors.torch import save_file

        tmp = self.noise_file.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.noise_file)

    def read_noise_state(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        if not self.noise_file.is_file():
            raise FileNotFoundError(f"{self.path}: no {self.noise_file.name} (unfinished run?)")
        return load_file(str(self.noise_file))

    def write_noise_fit(self, fit: NoiseFit) -> None:
        """The final noise model (:meth:`repo.fit.NoiseFit.save`)."""
        fit.save(self.noise_fit)

    def read_noise_fit(self) -> NoiseFit:
        """The final noise model (:meth:`repo.fit.NoiseFit.load`).

        :raises FileNotFoundError: none was written (an unfinished run, or one with
            ``[em] enabled = false`` or ``[run] posteriors = false``).
        """
        if not self.noise_fit.is_dir():
            raise FileNotFoundError(
                f"{self.path}: no noise/ (the run has not finished, or ran with [em] enabled "
                "= false or [run] posteriors = false)"
            )
        return NoiseFit.load(self.noise_fit)

    def write_reliability(self, reliability: dict[str, Any]) -> None:
        _write_json(self.reliability_file, reliability)

    def read_reliability(self) -> dict[str, Any]:
        """Per annotator at the end: label count and the noise model's parameters."""
        return _read_json(self.reliability_file)

    def finished(self) -> bool:
        """Whether the run wrote its end-of-run files."""
        return self.reliability_file.is_file()

    def write_posteriors(self, rows: Iterable[dict[str, Any]]) -> None:
        """Per-label posteriors, one JSON object a line."""
        tmp = self.posteriors_file.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, self.posteriors_file)

    def has_posteriors(self) -> bool:
        return self.posteriors_file.is_file()

    def read_posteriors(self) -> list[dict[str, Any]]:
        """The per-label posteriors (:meth:`write_posteriors`).

        :raises FileNotFoundError: none were written (an unfinished run, or one with
            ``[em] enabled = false`` or ``[run] posteriors = false``).
        :raises ValueError: a line that is not JSON.
        """
        path = self.posteriors_file
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the run has not finished, or ran with [em] enabled = "
                "false or [run] posteriors = false"
            )
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {n + 1} is not JSON ({error})") from None
        return rows


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))
