"""Run by ``torchrun`` from tests/test_distributed.py: ``re-po`` as torchrun runs it, and
each rank's view of the end of the run.

Usage: ``torchrun --nproc_per_node 2 tests/_dist_cli_worker.py VIEW_DIR train CONFIG.toml``.
The arguments after ``VIEW_DIR`` go to the console script (:func:`repo.cli.console`)
unchanged. ``Trainer.train`` is wrapped (not changed) to record, per rank,
``VIEW_DIR/rank<r>.json``: the process group's size and backend, the trainer's step, the
annotator parameters and a checksum of the trainable weights at the end of training; an
``atexit`` handler writes ``VIEW_DIR/atexit<r>`` (the console script's exit runs them).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    from repo.cli import console
    from repo.train import Trainer

    view_dir = Path(sys.argv[1])
    train = Trainer.train

    def train_and_record(trainer: Trainer) -> dict[str, float]:
        metrics = train(trainer)
        weights = hashlib.sha256()
        for _, p in sorted(trainer.policy.named_trainable_parameters()):
            weights.update(p.detach().cpu().contiguous().numpy().tobytes())
        distributed = torch.distributed.is_initialized()
        acc = trainer.accelerator
        view = {
            "world_size": acc.num_processes,
            "rank": acc.process_index,
            "backend": torch.distributed.get_backend() if distributed else None,
            "device": str(acc.device),
            "step": trainer.step,
            "parameters": {k: v.tolist() for k, v in trainer.noise.annotator_parameters().items()},
            "weights": weights.hexdigest(),
        }
        path = view_dir / f"rank{acc.process_index}.json"
        path.write_text(json.dumps(view), encoding="utf-8")
        return metrics

    Trainer.train = train_and_record
    torch.set_num_threads(1)
    rank = os.environ["RANK"]
    atexit.register(lambda: (view_dir / f"atexit{rank}").write_text("ran", encoding="utf-8"))
    sys.argv = ["re-po", *sys.argv[2:]]
    console()


if __name__ == "__main__":
    main()
