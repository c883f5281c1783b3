"""One process of tests/test_trl_integration.py's two-process run (or the one-process
reference): REDPOTrainer on a four-annotator crowd, shared truth, three optimizer steps.

    python tests/_trl_dist_worker.py OUT BATCH_SIZE        # one process
    torchrun --nproc_per_node 2 tests/_trl_dist_worker.py OUT BATCH_SIZE

Writes ``OUT/rank<r>.json``: the annotator reliabilities, the number of labels with a
posterior (gathered over processes) and the number of processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_trl_integration as helpers  # noqa: E402

import repo.integrations.trl as rt  # noqa: E402
from repo.train.launch import exit_process  # noqa: E402


def main(out: Path, batch_size: int) -> None:
    model, tokenizer = helpers.tiny()
    args = helpers.dpo_config(
        rt,
        out,
        item_column="item",
        position_column="chosen_first",
        shared_truth=True,
        max_steps=3,
        per_device_train_batch_size=batch_size,
        save_strategy="steps",
        save_steps=3,
        em_alpha=0.3,
    )
    trainer = rt.REDPOTrainer(
        model,
        args=args,
        train_dataset=helpers._dataset(helpers.crowd_rows(32, seed=6)),
        processing_class=tokenizer,
        peft_config=helpers.lora(),
    )
    trainer.train()
    result = {
        "eta": trainer.annotator_parameters()["eta"],
        "posteriors": len(trainer.posteriors()),
        "world_size": trainer.accelerator.num_processes,
    }
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    # left to interpreter finalization, gloo's threads can abort the process after its
    # work is done ("terminate called without an active exception", SIGABRT: three times
    # in CI, once after destroy_process_group); exit_process leaves without it
    exit_process(0)
