"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder ``checkpoints/step-000120/``::

    adapter/                 the LoRA adapter in peft's format (adapter_model.safetensors,
                             adapter_config.json); full fine-tuning: model.safetensors
    optimizer.safetensors    AdamW's moments and step counts
    noise.safetensors        the noise model's parameters (and a gradient M-step's moments)
    rng.safetensors          torch (and CUDA) generator states, NumPy's key
    state.json               format, step, the scheduler's and the optimizer's groups,
                             Python and NumPy generator details, the configuration, the
                             annotator ids, and the sha256 of every file above

Writing: everything goes to a temporary folder beside the target, files are
flushed to disk, and the folder is renamed into place in one step; a process
killed midway leaves a temporary folder that is ignored (and removed on the next
save), never a half-written checkpoint. Reading never unpickles: tensors come from
safetensors, the rest from JSON, and every file is checked against its sha256,
so a truncated, edited or foreign folder is a :class:`CheckpointError` that says
which file is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "capture_rng",
    "check_compatible",
    "jsonable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_adapter_weights",
    "load_checkpoint",
    "load_policy_weights",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "restore_rng",
    "restore_training_state",
    "save_checkpoint",
    "write_policy_weights",
]

FORMAT = "re-po-checkpoint-v1"
PREFIX = "step-"
ADAPTER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or foreign."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    :param path: its folder.
    :param state: the JSON part (``state.json``).
    :param optimizer: AdamW state tensors by flat name (see :func:`optimizer_to_tensors`).
    :param noise: the noise model's (and gradient M-step's) tensors.
    :param rng: generator states by name.
    """

    path: Path
    state: dict[str, Any]
    optimizer: dict[str, Tensor]
    noise: dict[str, Tensor]
    rng: dict[str, Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER


# ----------------------------------------------------------------------------- optimizer


def optimizer_to_tensors(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], list[dict]]:
    """Split a torch optimizer ``state_dict`` into flat tensors and JSON-able groups."""
    tensors = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            tensors[f"state.{int(index)}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
    groups = []
    for group in state["param_groups"]:
        clean = {}
        for key, value in group.items():
            if isinstance(value, Tensor):
                value = value.item()
            if isinstance(value, tuple):
                value = list(value)
            clean[key] = value
        groups.append(clean)
    return tensors, groups


def optimizer_from_tensors(tensors: Mapping[str, Tensor], groups: list[dict]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_tensors`: a ``state_dict`` for ``load_state_dict``."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    param_groups = []
    for group in groups:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}


RESUMABLE: dict[str, set[str]] = {
    "run": {
        "output_dir",
        "progress",
        "resume",
        "overwrite",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "posteriors",
        "eval_steps",
        "report_to",
    },
    "model": {"reference_cache_dir", "device"},
    "data": {"eval", "eval_split"},
}
"""Configuration fields a resumed run may change (the rest must match the checkpoint)."""


def check_compatible(
    checkpoint: Checkpoint, config: Mapping[str, Any], fingerprint: str, processes: int
) -> None:
    """Refuse a checkpoint of another run.

    :param config: this run's configuration (``TrainConfig.to_dict()``).
    :param fingerprint: this run's data fingerprint.
    :param processes: this run's number of processes (the data order depends on it).
    :raises CheckpointError: a field outside :data:`RESUMABLE` differs, or the data or
        the number of processes do (the message names what differs).
    """
    state = checkpoint.state
    saved = state.get("config", {})
    for section, fields in config.items():
        for name, value in fields.items():
            if name in RESUMABLE.get(section, set()):
                continue
            old = saved.get(section, {}).get(name, value)
            if old != value:
                raise CheckpointError(
                    f"{checkpoint.path} was written with [{section}] {name} = {old!r}, "
                    f"this run has {value!r}"
                )
    if state.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"{checkpoint.path} was written for other data")
    if state.get("processes") != processes:
        raise CheckpointError(
            f"{checkpoint.path} was written by {state.get('processes')} processes, this run "
            f"has {processes} (the data order depends on it)"
        )


def jsonable(value: Any) -> Any:
    """``value`` (a scheduler's state, ...) with tensors as numbers or lists and
    callables left out."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


# ----------------------------------------------------------------------------- weights


def write_policy_weights(
    policy: Any, folder: Path, weights: Mapping[str, Tensor] | None = None
) -> None:
    """Write the policy's trainable weights into a checkpoint folder: the LoRA adapter
    (``adapter/``, peft's format), or every trainable tensor (``model.safetensors``;
    ``weights``: those tensors gathered whole from a sharded policy)."""
    if policy.has_adapter:
        policy.lm.save_pretrained(folder / ADAPTER)
        return
    if weights is None:
        weights = dict(policy.named_trainable_parameters())
    state = {n: p.detach().cpu().contiguous() for n, p in weights.items()}
    save_file(state, str(folder / MODEL_WEIGHTS))


def load_adapter_weights(policy: Any, folder: Path) -> None:
    """Set the policy's LoRA adapter from a peft adapter folder (``adapter_model.safetensors``).

    :raises CheckpointError: no such file, or an adapter of another layout (other
        target modules, rank or layers).
    """
    from peft import set_peft_model_state_dict

    file = Path(folder) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    weights = load_file(str(file))
    expected = {n for n, _ in policy.named_trainable_parameters()}
    result = set_peft_model_state_dict(policy.lm, weights)
    if result.unexpected_keys or len(weights) != len(expected):
        raise CheckpointError(
            f"{folder}: the adapter does not fit this model "
            f"({len(weights)} tensors for {len(expected)} trainable ones)"
        )


def load_policy_weights(policy: Any, folder: Path) -> None:
    """Set the policy's trainable weights from a checkpoint folder
    (:func:`write_policy_weights`).

    :raises CheckpointError: the files are missing or do not fit the policy.
    """
    if policy.has_adapter:
        load_adapter_weights(policy, Path(folder) / ADAPTER)
        return
    file = Path(folder) / MODEL_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {MODEL_WEIGHTS}")
    weights = load_file(str(file))
    params = dict(policy.named_trainable_parameters())
    if set(weights) != set(params):
        raise CheckpointError(f"{folder}: the weights do not fit this model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The states of Python's, NumPy's, torch's (and CUDA's) generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    # the legacy global generator is the one libraries draw from: save it as it is
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    tensors["numpy.key"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    info = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": gauss},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    return tensors, info


def restore_rng(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
    """Set every generator to a state from :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda])
    n = info["numpy"]
    key = tensors["numpy.key"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    p = info["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder under ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    write_model: Any,
    optimizer: Mapping[str, Any],
    noise: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` atomically; keep the newest ``keep``.

    :param write_model: ``write_model(folder)`` writes the adapter (or model) files.
    :param optimizer: the optimizer's ``state_dict()``.
    :param noise: the annotator state tensors.
    :param state: JSON-able run state (step, scheduler, configuration, ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    target = directory / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        write_model(tmp)
        opt_tensors, groups = optimizer_to_tensors(optimizer)
        save_file(_contiguous(opt_tensors), str(tmp / "optimizer.safetensors"))
        save_file(_contiguous(noise), str(tmp / "noise.safetensors"))
        rng_tensors, rng_info = capture_rng()
        save_file(_contiguous(rng_tensors), str(tmp / "rng.safetensors"))
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {
            "format": FORMAT,
            "step": int(step),
            **dict(state),
            "optimizer_groups": groups,
            "rng": rng_info,
            "files": files,
        }
        (tmp / "state.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if target.exists():  # a resumed run saving the same step again
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _contiguous(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint folder (see the module docstring).

    :raises CheckpointError: no such folder, no or unreadable ``state.json``, another
        format, a listed file missing or with another sha256.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no state.json (not a re-po checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{state_file}: unreadable (truncated?): {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format: {found!r})")
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{state_file}: lists no files")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing (truncated checkpoint)")
        if _sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its sha256 (truncated or edited)")
    try:
        optimizer = load_file(str(path / "optimizer.safetensors"))
        noise = load_file(str(path / "noise.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable tensors: {error}") from None
    return Checkpoint(path=path, state=state, optimizer=optimizer, noise=noise, rng=rng)


def restore_training_state(
    checkpoint: Checkpoint, *, policy: Any, optimizer: Any, online_em: Any, scheduler: Any
) -> None:
    """Put a checkpoint's training state back: the policy's trainable weights, the
    optimizer's moments, the online EM's state, the schedule and every RNG.

    :raises CheckpointError: a piece that does not fit (another model, optimizer or
        noise model).
    """
    from repo.train.sharding import is_sharded, load_full_state

    state = checkpoint.state
    optimizer_state = optimizer_from_tensors(checkpoint.optimizer, state["optimizer_groups"])
    if is_sharded(policy):  # every process reads the whole tensors and keeps its shards
        file = checkpoint.path / MODEL_WEIGHTS
        if not file.is_file():
            raise CheckpointError(f"{checkpoint.path}: no {MODEL_WEIGHTS}")
        try:
            load_full_state(policy, optimizer, load_file(str(file)), optimizer_state)
        except (KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{checkpoint.path}: {error}") from None
    else:
        load_policy_weights(policy, checkpoint.path)
    try:
        if not is_sharded(policy):
            optimizer.load_state_dict(optimizer_state)
        online_em.load_state_dict(checkpoint.noise)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{checkpoint.path}: state does not fit this run: {error}") from None
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(checkpoint.rng, state["rng"])
