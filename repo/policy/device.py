"""Device selection and mixed-precision helpers.

The policy runs on CUDA when present (bf16 autocast, gradient checkpointing),
else on Apple's MPS, else on the CPU (float32, no autocast). Under a multi-process
launch (``torchrun``, ``accelerate launch``) without CUDA the processes share the
CPU (a gloo process group): MPS has no process-group backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = [
    "autocast_context",
    "autocast_dtype",
    "launched_processes",
    "resolve_dtype",
    "select_device",
]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def launched_processes() -> int:
    """The number of processes of this launch: ``WORLD_SIZE`` as ``torchrun`` and
    ``accelerate launch`` set it, 1 for a plain ``python`` run."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(int(value), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None


def select_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``prefer`` unless it is ``None`` or ``"auto"``; else CUDA,
    else MPS (one process only: MPS has no process-group backend, so several
    processes of a launch share the CPU), else CPU."""
    if prefer is not None and str(prefer) != "auto":
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and launched_processes() == 1:
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a dtype name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...) to a torch dtype.

    ``None`` and ``"auto"`` give ``None`` (keep the checkpoint's own dtype).
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    try:
        return _DTYPES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype used on ``device``: bf16 on CUDA (fp16 if bf16 is unsupported),
    ``None`` (no autocast) elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast_context(
    device: torch.device | str, enabled: bool | None = None, dtype: torch.dtype | None = None
) -> Iterator[None]:
    """Autocast for the policy forward.

    ``enabled=None`` means "on where it helps": on CUDA with bf16 (or ``dtype``),
    off on MPS and CPU. ``enabled=False`` is a no-op context.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = autocast_dtype(device)
    if enabled is None:
        enabled = dtype is not None
    if not enabled or dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
