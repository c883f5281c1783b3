"""Helpers shared by the training tests: a JSONL writer and the tiny-model configuration."""

from __future__ import annotations

import json
from pathlib import Path

from repo.train import TrainConfig


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
