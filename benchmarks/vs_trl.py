"""Training throughput (pairs per second) of re-po's DPO against TRL's DPOTrainer.

Same model (the same random weights, LoRA r=16 on the same modules), same pairs,
batch size, maximum length (no pair is truncated by either), precision (float32),
device (CPU) and no gradient checkpointing (TRL turns it on by default, which re-runs
the forward in the backward; the full run reports that default too), in one process: for each reference mode - precomputed reference
log-probs, or a reference forward (adapter disabled) in every step - TRL trains
``steps`` steps, then re-po does. The figure per mode is the median seconds
between consecutive optimizer steps after ``warmup`` steps (data loading, forward,
backward, optimizer and logging included; tokenisation and precomputation not),
as pairs per second; the ratio is re-po's over TRL's (target >= 1.0, aim 1.25).
re-po's RE-DPO (with the E-step) is reported beside it.

    pip install 're-po[bench]'                # TRL
    python benchmarks/vs_trl.py --quick        # under a minute
    python benchmarks/vs_trl.py --save         # more steps; write results/

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import LORA, config, emit, machine, make_policy, median, rule_records

from repo.train import Trainer

TARGET = 1.0
AIM = 1.25


def trl_step_seconds(
    model: str, records, *, batch_size, max_length, steps, warmup, precompute, checkpointing=False
):
    """Median seconds per optimizer step of TRL's DPOTrainer (``checkpointing``: TRL's
    default gradient checkpointing, which re-runs the forward in the backward)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    policy = make_policy(model)  # the same random weights as re-po's copy
    base = policy.lm.get_base_model()  # TRL wraps its own adapter (same settings)
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            max_steps=steps + warmup,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            beta=0.1,
            max_length=max_length,
            precompute_ref_log_probs=precompute,
            logging_steps=10_000,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            gradient_checkpointing=checkpointing,
        )
        trainer = DPOTrainer(
            base,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=policy.tokenizer,
            peft_config=LORA.to_peft(),
            callbacks=[clock],
        )
        trainer.train()
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    return median(gaps[warmup:])


def repo_step_seconds(
    model: str, records, *, batch_size, max_length, steps, warmup, precompute, em
):
    """Median seconds per optimizer step of re-po's trainer (DPO, or RE-DPO with ``em``)."""
    policy = make_policy(model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(
            tmp,
            model={
                "max_length": max_length,
                "reference": "precompute" if precompute else "on-the-fly",
            },
            em={"enabled": em},
            optim={"batch_size": batch_size, "max_steps": steps + warmup},
        )
        trainer = Trainer(cfg, policy=policy, records=records)
        stamps = []
        for step in range(steps + warmup):
            trainer.train_step(step)
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return median(gaps[warmup - 1 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/")
    parser.add_argument("--model", default="30m", choices=["tiny", "30m", "smollm2"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("vs_trl.py needs TRL: pip install 're-po[bench]'") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # short responses, few steps: under a minute
        steps, warmup, batch_size, filler = 5, 2, 4, (3, 6)
    else:
        steps, warmup, batch_size, filler = 20, 3, 8, (8, 14)
    max_length = 128
    records = rule_records(batch_size * (steps + warmup + 1), seed=2, filler=filler)
    modes = {}
    for precompute in (True, False):
        common = dict(
            batch_size=batch_size,
            max_length=max_length,
            steps=steps,
            warmup=warmup,
            precompute=precompute,
        )
        t_trl = trl_step_seconds(args.model, records, **common)
        t_dpo = repo_step_seconds(args.model, records, em=False, **common)
        t_re = repo_step_seconds(args.model, records, em=True, **common)
        name = "precomputed_reference" if precompute else "reference_forward"
        modes[name] = {
            "trl_pairs_per_s": round(batch_size / t_trl, 2),
            "repo_dpo_pairs_per_s": round(batch_size / t_dpo, 2),
            "repo_re_dpo_pairs_per_s": round(batch_size / t_re, 2),
            "ratio": round(t_trl / t_dpo, 3),
        }
        if not args.quick:  # TRL's own default: gradient checkpointing on
            t_default = trl_step_seconds(args.model, records, checkpointing=True, **common)
            modes[name]["trl_default_checkpointing_pairs_per_s"] = round(batch_size / t_default, 2)
        print(f"{name}: {modes[name]}")
    ratios = [m["ratio"] for m in modes.values()]
    emit(
        {
            "benchmark": "vs_trl",
            "ratio": min(ratios),
            "target": TARGET,
            "aim": AIM,
            "meets_target": min(ratios) >= TARGET,
            "model": args.model,
            "batch_size": batch_size,
            "max_length": max_length,
            "precision": "float32",
            "gradient_checkpointing": False,
            "device": "cpu",
            "steps": steps,
            "trl": trl.__version__,
            "quick": args.quick,
            "modes": modes,
            "machine": machine(),
        },
        "vs_trl" + ("_quick" if args.quick else ""),
        args.save,
    )


if __name__ == "__main__":
    main()
