"""GPU training throughput and memory: re-po's trainer against TRL's DPOTrainer.

Models are built from a config with random weights (speed does not depend on the
weights, and the GPU machines reach no model hub): Llama networks with the
dimensions of Qwen2.5-0.5B and Qwen2.5-1.5B (:data:`SHAPES`), in bfloat16, with the
tiny model's tokenizer (its ids are a subset of the large vocabulary, whose
embedding and output layer keep their full cost). For each shape, LoRA (r=16 on every
projection) and the full fine-tune (a frozen copy as the reference), with gradient
checkpointing, it trains:

* ``ours/dpo`` and ``ours/re-dpo``: :class:`repo.train.Trainer` on a
  :class:`repo.policy.Policy` - the code ``re-po train`` runs - with the reference
  log-probs on the fly (the adapter disabled, or the frozen copy);
* ``trl/dpo``: TRL's ``DPOTrainer`` with the same model, pairs, batch size, maximum
  length, precision and reference (``precompute_ref_log_probs=False``).

Each configuration runs ``warmup`` optimizer steps and then ``steps`` timed ones; its
figures are the median seconds per step (``torch.cuda.synchronize`` before every
stamp), pairs per second (``batch_size`` / step), tokens per second (the mean prompt +
A + B tokens of the pairs times ``batch_size``, per second: the same numerator for
every system, whatever it pads or repeats) and the peak of
``torch.cuda.max_memory_allocated`` over the configuration (model, optimizer state and
activations). A configuration that runs out of memory (or fails otherwise) is recorded
as such and the next one runs; once ``--budget-s`` seconds have passed the remaining
ones are recorded as skipped, so the whole run stays within one lent machine's time.

    python benchmarks/gpu.py            # on a CUDA machine, about 5 minutes on an H200
    python benchmarks/gpu.py --quick    # the same code on the CPU, a tiny model, seconds

The last line printed is one JSON object with the figures; it is also written to
``benchmarks/results/gpu.json`` (``gpu-quick.json`` for the quick run).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import config, emit, machine, rule_records

from repo.policy import (
    LoraSettings,
    PairTokenizer,
    Policy,
    build_random_model,
    load_model_and_tokenizer,
)
from repo.train import Trainer

#: :data:`repo.policy.RANDOM_CONFIGS` names of the timed shapes, by their short name:
#: Llama networks with Qwen2.5's dimensions (0.49B and 1.54B parameters).
SHAPES = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b"}
#: the ``--quick`` model: a two-layer Llama over the tiny tokenizer's vocabulary.
QUICK_SHAPE = "tiny"
LORA = LoraSettings(
    r=16,
    alpha=32,
    dropout=0.0,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
SYSTEMS = ("ours/dpo", "ours/re-dpo", "trl/dpo")


@dataclass(frozen=True)
class Settings:
    """What every configuration of one run shares."""

    device: str
    dtype: torch.dtype
    batch_size: int
    max_length: int
    warmup: int
    steps: int
    gradient_checkpointing: bool
    filler: tuple[int, int]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def stamp(device: str) -> float:
    synchronize(device)
    return time.perf_counter()


def build_network(shape: str, s: Settings, *, trainable: bool):
    """A random-weight network of the :data:`~repo.policy.RANDOM_CONFIGS` entry ``shape``
    (seed 0, so every copy is the same)."""
    network = build_random_model(shape, seed=0, device=s.device, dtype=s.dtype)
    network.requires_grad_(trainable)
    return network


def ours_step_seconds(shape, tuning, loss, records, tokenizer, s: Settings, tmp: str):
    """Seconds of each timed optimizer step of re-po's trainer."""
    network = build_network(shape, s, trainable=True)
    reference = None if tuning == "lora" else build_network(shape, s, trainable=False)
    policy = Policy(
        network,
        tokenizer,
        lora=LORA if tuning == "lora" else None,
        reference_model=reference,
        gradient_checkpointing=s.gradient_checkpointing,
    )
    cfg = config(
        tmp,
        model={
            "device": s.device,
            "max_length": s.max_length,
            "reference": "on-the-fly",
            "use_lora": tuning == "lora",
        },
        em={"enabled": loss == "re-dpo"},
        optim={"batch_size": s.batch_size, "max_steps": s.warmup + s.steps},
    )
    trainer = Trainer(cfg, policy=policy, records=records)
    stamps = []
    for step in range(s.warmup + s.steps):
        trainer.train_step(step)
        stamps.append(stamp(s.device))
    return [b - a for a, b in zip(stamps[s.warmup - 1 :], stamps[s.warmup :], strict=False)]


def trl_step_seconds(shape, tuning, records, tokenizer, s: Settings, tmp: str):
    """Seconds of each timed optimizer step of TRL's DPOTrainer."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    network = build_network(shape, s, trainable=True)
    reference = None if tuning == "lora" else build_network(shape, s, trainable=False)
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]
    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(stamp(s.device))

    args = DPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=s.batch_size,
        max_steps=s.warmup + s.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=s.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=s.gradient_checkpointing,
        bf16=s.dtype == torch.bfloat16,
        use_cpu=s.device == "cpu",
        logging_steps=10_000,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        network,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LORA.to_peft() if tuning == "lora" else None,
        callbacks=[StepClock()],
    )
    trainer.train()
    return [b - a for a, b in zip(stamps[s.warmup - 1 :], stamps[s.warmup :], strict=False)]


def pair_tokens(records, tokenizer, max_length: int) -> float:
    """Mean prompt + A + B tokens of a pair, as re-po tokenises them."""
    measure = PairTokenizer(tokenizer, max_length)
    sizes = []
    for r in records:
        pair = measure(r.prompt, r.response_a, r.response_b)
        sizes.append(len(pair.prompt_ids) + len(pair.response_a_ids) + len(pair.response_b_ids))
    return statistics.mean(sizes)


def run_one(shape, tuning, system, records, tokenizer, s: Settings, tokens: float) -> dict:
    """One configuration's figures, or ``{"status": "out of memory" | "error", "error": ...}``
    (the run goes on with the next configuration)."""
    if s.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    failure = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if system == "trl/dpo":
                seconds = trl_step_seconds(shape, tuning, records, tokenizer, s, tmp)
            else:
                loss = system.split("/")[1]
                seconds = ours_step_seconds(shape, tuning, loss, records, tokenizer, s, tmp)
    except torch.OutOfMemoryError as error:
        failure = {"status": "out of memory", "error": str(error).splitlines()[0]}
    except Exception as error:  # noqa: BLE001 - one failed configuration must not end the run
        failure = {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
    # the exception (and the frames holding the models) is gone here: free the memory
    gc.collect()
    if s.device == "cuda":
        torch.cuda.empty_cache()
    if failure is not None:
        return failure
    step = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None
    return {
        "status": "ok",
        "step_s": round(step, 4),
        "pairs_per_s": round(s.batch_size / step, 2),
        "tokens_per_s": round(s.batch_size * tokens / step, 1),
        "peak_memory_gb": None if peak is None else round(peak, 2),
        "timed_steps": len(seconds),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = str(torch.version.cuda)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, seconds")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what starts later")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of results/")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        shapes = {"tiny": QUICK_SHAPE}
        s = Settings("cpu", torch.float32, 2, 128, 1, 2, not args.no_checkpointing, (3, 6))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu.py needs a CUDA device (or --quick for the CPU smoke run)")
        shapes = SHAPES
        s = Settings("cuda", torch.bfloat16, 8, 512, 2, 5, not args.no_checkpointing, (40, 60))
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("gpu.py needs TRL: pip install 're-po[bench]'") from None
    records = rule_records(s.batch_size * (s.warmup + s.steps) * 2, seed=2, filler=s.filler)
    _, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu")
    tokens = pair_tokens(records, tokenizer, s.max_length)
    runs = []
    for name, shape in shapes.items():
        for tuning in ("lora", "full"):
            for system in SYSTEMS:
                row = {"model": name, "tuning": tuning, "system": system}
                if time.perf_counter() - started > args.budget_s:
                    row["status"] = "skipped (time budget)"
                else:
                    row.update(run_one(shape, tuning, system, records, tokenizer, s, tokens))
                print(row, flush=True)
                runs.append(row)
    device = torch.cuda.get_device_name() if s.device == "cuda" else "cpu"
    result = {
        "benchmark": "gpu",
        "quick": args.quick,
        "device": device,
        "versions": versions(),
        "settings": {
            "dtype": str(s.dtype).removeprefix("torch."),
            "batch_size": s.batch_size,
            "max_length": s.max_length,
            "warmup_steps": s.warmup,
            "timed_steps": s.steps,
            "gradient_checkpointing": s.gradient_checkpointing,
            "reference": "on the fly (LoRA: adapter disabled; full: a frozen copy)",
            "lora": {"r": LORA.r, "alpha": LORA.alpha, "modules": list(LORA.target_modules)},
            "mean_pair_tokens": round(tokens, 1),
            "parameters": {
                name: sum(p.numel() for p in build_random_model(shape, device="meta").parameters())
                for name, shape in shapes.items()
            },
        },
        "runs": runs,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    if args.out is None:
        emit(result, "gpu")
    else:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
