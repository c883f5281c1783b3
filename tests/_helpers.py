"""Helpers shared by the training tests: a JSONL writer, the tiny-model configuration and
the two-process ``torchrun`` launch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from repo.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` to ``path``, one JSON object a line."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def tiny_config(tmp_path: Path, max_steps: int = 8, **sections) -> TrainConfig:
    """A tiny-model configuration reading ``data.jsonl`` and writing ``run`` under
    ``tmp_path``; ``sections`` override fields section by section."""
    base = {
        "model": {"recipe": "tiny-llama", "device": "cpu", "max_length": 64},
        "data": {"train": "data.jsonl", "annotator_column": "annotator"},
        "loss": {"family": "dpo", "beta": 1.0},
        "optim": {"batch_size": 8, "learning_rate": 1e-2, "max_steps": max_steps},
        "run": {"output_dir": "run", "progress": False},
    }
    for name, fields in sections.items():
        base.setdefault(name, {}).update(fields)
    return TrainConfig.from_dict(base, base_dir=tmp_path)


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, this checkout first on the
    path, one thread a process, no hub."""
    launcher = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def torchrun(
    worker: Path, *args: str, cwd: Path = ROOT, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 WORKER ARGS...``: two processes on this
    machine, their rendezvous on a free port (so that launches in parallel test processes
    never share one); ``env`` adds to :func:`launch_env`. The finished process, its
    output captured as text."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(worker), *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, env=launch_env(**env), capture_output=True, text=True, timeout=timeout
    )


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (its helpers import from that folder)."""
    benchmarks = str(ROOT / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(benchmarks)
    return module
