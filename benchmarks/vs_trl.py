"""Training throughput (pairs per second) of re-po's DPO against TRL's DPOTrainer.

Same model (the same random weights, LoRA r=16 on the same modules), same pairs,
batch size, maximum length (no pair is truncated by either), precision (float32;
TRL's configs default to bf16 autocast even on the CPU, which is turned off here),
device (CPU) and no gradient checkpointing (TRL turns it on by default, which
re-runs the forward in the backward; the full run reports that default too), in
one process. For each reference mode - precomputed reference log-probs, or a
reference forward (adapter disabled) in every step - TRL trains ``steps`` steps,
then re-po's DPO, then its RE-DPO; the full run repeats the blocks twice,
alternating, so that drift in the machine's load hits every system. The figure
per system is the median of the seconds between consecutive optimizer steps
after ``warmup`` steps (data loading, forward, backward, optimizer and logging
included; tokenisation and precomputation not), in CPU time of the process (one
torch thread: what wall time is on an idle machine; see ``common.clock``; the
wall-time ratio is reported beside it), as pairs per second; the ratio
is re-po's DPO over TRL's (target >= 1.0, aim 1.25; the headline is the smallest
over reference modes and data sets). Data: synthetic rule pairs (short prompts)
and, in the full run, pairs of the shipped HH-RLHF subsample (real multi-turn
prompts, longer than the responses) that fit 512 tokens.

re-po's edge comes from its batch layout: one block ``[prompt | A | B]`` per pair
with B masked from A (``repo.policy.collate_shared_prompt``), so the prompt runs
through the model once instead of twice, and the forward padding-free: the blocks'
tokens, no padding, run as one row with per-block positions and block attention
(``repo.policy.attention``: each block attends within itself, at the cost of a
separate sequence), and the vocabulary projection only where a response token is
scored; the log-probs are the same (``tests/test_packing.py``). TRL 1.16 pads its 2B
sequences to the longest (it disables ``padding_free`` for DPO).

The machine's load average (1, 5 and 15 minutes) is recorded at the start and the end:
on a shared machine CPU times drift with it (caches and hyper-threads are shared),
which the alternating blocks spread over every system.

    pip install 're-po[bench]'                # TRL
    python benchmarks/vs_trl.py --quick        # under a minute
    python benchmarks/vs_trl.py                # more steps
    python benchmarks/vs_trl.py --repeats 1    # one block per system (a busy machine)

The last line printed is one JSON object with the figures; it is also written
to ``benchmarks/results/`` (``-quick`` for the quick run).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from common import LORA, clock, config, emit, gaps, machine, make_policy, median, rule_records

from repo.train import Trainer

TARGET = 1.0
AIM = 1.25


def trl_step_seconds(
    model: str, records, *, batch_size, max_length, steps, warmup, precompute, checkpointing=False
):
    """Seconds of each optimizer step of TRL's DPOTrainer after ``warmup`` (``checkpointing``:
    TRL's default gradient checkpointing, which re-runs the forward in the backward)."""
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
            self.stamps.append(clock())

    stopwatch = StepClock()
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
            bf16=False,  # TRL's configs default to bf16 autocast, also on the CPU
        )
        trainer = DPOTrainer(
            base,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=policy.tokenizer,
            peft_config=LORA.to_peft(),
            callbacks=[stopwatch],
        )
        trainer.train()
    return gaps(stopwatch.stamps)[warmup:]


def repo_step_seconds(
    model: str, records, *, batch_size, max_length, steps, warmup, precompute, em
):
    """Seconds of each optimizer step of re-po's trainer after ``warmup`` (DPO, or RE-DPO
    with ``em``)."""
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
        stamps = [clock()]
        for step in range(steps + warmup):
            trainer.train_step(step)
            stamps.append(clock())
    return gaps(stamps)[warmup - 1 :]


def hh_records(count: int, max_length: int):
    """The first ``count`` pairs of the shipped HH-RLHF subsample (real multi-turn
    prompts) whose prompt and longer response fit ``max_length`` tiny-model tokens
    with room to spare, so that neither trainer truncates anything."""
    from repo.data.hh_rlhf import load_hh_rlhf
    from repo.data.records import PreferenceData
    from repo.policy import PairTokenizer

    tokenizer = make_policy("tiny").tokenizer
    measure = PairTokenizer(tokenizer, 100_000, min_response_tokens=1)
    kept = []
    for record in load_hh_rlhf():
        pair = measure(record.prompt, record.response_a, record.response_b)
        longest = max(len(pair.response_a_ids), len(pair.response_b_ids))
        if len(pair.prompt_ids) + longest <= max_length - 8:
            kept.append(record)
        if len(kept) == count:
            break
    return PreferenceData(kept)


def compare(model: str, records, *, batch_size, max_length, steps, warmup, repeats, default):
    """Pairs per second of TRL, re-po DPO and re-po RE-DPO in both reference modes."""
    times: dict[tuple[bool, str], list[tuple[float, float]]] = {}
    for _ in range(repeats):  # alternate blocks, so drift in the load hits every system
        for precompute in (True, False):
            common = dict(
                batch_size=batch_size,
                max_length=max_length,
                steps=steps,
                warmup=warmup,
                precompute=precompute,
            )
            runs = {
                "trl": lambda c=common: trl_step_seconds(model, records, **c),
                "dpo": lambda c=common: repo_step_seconds(model, records, em=False, **c),
                "re_dpo": lambda c=common: repo_step_seconds(model, records, em=True, **c),
            }
            if default:  # TRL's own default: gradient checkpointing on
                runs["trl_default"] = lambda c=common: trl_step_seconds(
                    model, records, checkpointing=True, **c
                )
            for system, run in runs.items():
                times.setdefault((precompute, system), []).extend(run())
    modes = {}
    for precompute in (True, False):
        mine = {system: t for (p, system), t in times.items() if p == precompute}
        cpu = {system: median([x[1] for x in t]) for system, t in mine.items()}
        wall = {system: median([x[0] for x in t]) for system, t in mine.items()}
        name = "precomputed_reference" if precompute else "reference_forward"
        modes[name] = {
            "trl_pairs_per_s": round(batch_size / cpu["trl"], 2),
            "repo_dpo_pairs_per_s": round(batch_size / cpu["dpo"], 2),
            "repo_re_dpo_pairs_per_s": round(batch_size / cpu["re_dpo"], 2),
            "ratio": round(cpu["trl"] / cpu["dpo"], 3),
            "ratio_wall": round(wall["trl"] / wall["dpo"], 3),
        }
        if "trl_default" in cpu:
            modes[name]["trl_default_checkpointing_pairs_per_s"] = round(
                batch_size / cpu["trl_default"], 2
            )
        print(f"{name}: {modes[name]}")
    return {
        "batch_size": batch_size,
        "max_length": max_length,
        "steps": steps * repeats,
        "modes": modes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="30m", choices=["tiny", "30m", "smollm2"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (CPU time = wall time at 1)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating blocks per system (full run)"
    )
    args = parser.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        import trl
    except ImportError:
        raise SystemExit("vs_trl.py needs TRL: pip install 're-po[bench]'") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = {}
    if args.quick:  # short rule pairs, few steps: under a minute
        records = rule_records(4 * 8, seed=2, filler=(3, 6))
        settings = dict(batch_size=4, max_length=128, steps=5, warmup=2, repeats=1)
        datasets["rule_pairs"] = compare(args.model, records, default=False, **settings)
    else:
        records = rule_records(8 * 24, seed=2, filler=(8, 14))
        settings = dict(batch_size=8, max_length=128, steps=20, warmup=3, repeats=args.repeats)
        datasets["rule_pairs"] = compare(args.model, records, default=True, **settings)
        records = hh_records(4 * 14, max_length=512)
        settings = dict(batch_size=4, max_length=512, steps=10, warmup=3, repeats=args.repeats)
        datasets["hh_rlhf"] = compare(args.model, records, default=True, **settings)
    ratios = [m["ratio"] for d in datasets.values() for m in d["modes"].values()]
    emit(
        {
            "benchmark": "vs_trl",
            "ratio": min(ratios),
            "target": TARGET,
            "aim": AIM,
            "meets_target": min(ratios) >= TARGET,
            "model": args.model,
            "precision": "float32",
            "gradient_checkpointing": False,
            "device": "cpu",
            "layout": make_policy("tiny").layout,
            "trl": trl.__version__,
            "quick": args.quick,
            "datasets": datasets,
            "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
            "machine": machine(),
        },
        "vs_trl",
    )


if __name__ == "__main__":
    main()
