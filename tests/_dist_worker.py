"""Run by ``torchrun`` from tests/test_train.py: train, then write this rank's view.

Usage: ``torchrun --nproc_per_node 2 tests/_dist_worker.py CONFIG.toml DATA.jsonl OUT_DIR``
(or :func:`main` called in one process). Each rank writes ``OUT_DIR/rank<r>.json``: world size, rank, the annotator
parameters after every step, and a checksum of the trainable weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def main(config_path: str, data_path: str, out_dir: str) -> None:
    from repo.data.loaders import load_preferences
    from repo.train import Trainer, load_config

    torch.set_num_threads(1)
    config = load_config(config_path)
    records = load_preferences(data_path, annotator_column="annotator")
    trainer = Trainer(config, records=records)
    trajectory = []
    while trainer.step < trainer.total_steps:
        trainer.train_step(trainer.step)
        trainer.step += 1
        trajectory.append(trainer.noise.eta.detach().tolist())
    weights = hashlib.sha256()
    for _, p in sorted(trainer.policy.named_trainable_parameters()):
        weights.update(p.detach().contiguous().numpy().tobytes())
    acc = trainer.accelerator
    result = {
        "world_size": acc.num_processes,
        "rank": acc.process_index,
        "eta": trajectory,
        "weights": weights.hexdigest(),
        "adapter": {
            n: p.detach().reshape(-1)[:8].tolist()
            for n, p in trainer.policy.named_trainable_parameters()
        },
    }
    out = Path(out_dir) / f"rank{acc.process_index}.json"
    out.write_text(json.dumps(result), encoding="utf-8")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    from repo.train.launch import exit_process

    exit_process(0)  # without interpreter finalization, where gloo's threads can abort
