"""Run by ``torchrun`` from tests/test_fsdp.py: ``re-po train`` under FSDP as torchrun runs
it, then the same run resumed from its first checkpoint, in the same processes.

Usage: ``torchrun --nproc_per_node 2 tests/_fsdp_worker.py VIEW_DIR CONFIG.toml RESUME_DIR``.

1. ``re-po train CONFIG.toml`` (the configuration's ``output_dir``);
2. rank 0 copies the run as it stood at its first checkpoint into ``RESUME_DIR`` (that
   checkpoint, ``config.json`` and the logs: an interrupted run);
3. ``re-po train CONFIG.toml --resume --output-dir RESUME_DIR``.

``Trainer.train`` is wrapped (not changed) to record, per rank and run,
``VIEW_DIR/<run>-rank<r>.json``: the process group, whether the network is sharded,
how many parameter elements this rank holds against the whole network's, the step and
the annotator parameters.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch


def main() -> int:
    from repo.cli import main as cli
    from repo.train import Trainer
    from repo.train.sharding import is_sharded

    view_dir, config, resume_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    train = Trainer.train
    runs = iter(["full", "resumed"])

    def train_and_record(trainer: Trainer) -> dict[str, float]:
        metrics = train(trainer)
        acc = trainer.accelerator
        params = list(trainer.policy.lm.parameters())
        view = {
            "world_size": acc.num_processes,
            "rank": acc.process_index,
            "backend": torch.distributed.get_backend(),
            "sharded": is_sharded(trainer.policy),
            "local_elements": sum(p.to_local().numel() for p in params),
            "elements": sum(p.numel() for p in params),
            "step": trainer.step,
            "parameters": {k: v.tolist() for k, v in trainer.noise.annotator_parameters().items()},
        }
        path = view_dir / f"{next(runs)}-rank{acc.process_index}.json"
        path.write_text(json.dumps(view), encoding="utf-8")
        return metrics

    Trainer.train = train_and_record
    torch.set_num_threads(1)
    if cli(["train", config]) != 0:
        return 1
    if torch.distributed.get_rank() == 0:
        from repo.train import load_config

        full = load_config(config).output_dir
        first = sorted((full / "checkpoints").iterdir())[0]
        shutil.copytree(first, resume_dir / "checkpoints" / first.name)
        for name in ("config.json", "metrics.jsonl", "annotators.jsonl"):
            shutil.copy(full / name, resume_dir / name)
    torch.distributed.barrier()
    return cli(["train", config, "--resume", "--output-dir", str(resume_dir)])


if __name__ == "__main__":
    from repo.train.launch import exit_process

    exit_process(main())  # without interpreter finalization, where gloo's threads can abort
