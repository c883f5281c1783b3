"""Shared set-up of the benchmarks: models built from configs, data, trainers, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from repo.data.loaders import load_preferences  # noqa: E402
from repo.data.rule_pairs import rule_pairs  # noqa: E402
from repo.policy import LoraSettings, Policy, build_random_model, load_model_and_tokenizer  # noqa: E402
from repo.train import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: a Llama of about 30M parameters over the tiny model's 512-token vocabulary: big
#: enough that the forward and backward dominate a step, as with real models.
LLAMA_30M = dict(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=9,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)

LORA = LoraSettings(
    r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
)


def make_policy(model: str, seed: int = 0) -> Policy:
    """``"tiny"`` (models/tiny-llama), ``"30m"`` (random weights from :data:`LLAMA_30M`,
    tiny tokenizer) or ``"smollm2"`` (SmolLM2-135M-Instruct from its GGUF), with LoRA."""
    torch.manual_seed(seed)
    if model == "tiny":
        return Policy.from_recipe("tiny-llama", device="cpu")
    if model == "smollm2":
        return Policy.from_recipe("smollm2-135m-instruct", device="cpu")
    if model == "30m":
        _, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu")
        network = build_random_model(LLAMA_30M, seed=seed, device="cpu")
        return Policy(network, tokenizer, lora=LORA)
    raise ValueError(f"unknown model {model!r}: tiny, 30m or smollm2")


def rule_records(num_pairs: int, seed: int = 0, filler: tuple[int, int] = (8, 14)):
    """Noisy rule pairs (five annotators) as validated records; ``filler`` words per
    response (about 3.5 tokens each with the tiny tokenizer)."""
    pairs = rule_pairs(num_pairs, [0.95, 0.9, 0.8, 0.65, 0.5], seed=seed, filler=filler)
    return load_preferences(pairs.rows, annotator_column="annotator")


def config(output_dir: str, **sections) -> TrainConfig:
    """A CPU configuration for benchmark trainers (no progress bar, no posteriors)."""
    base = {
        "model": {"recipe": "tiny-llama", "device": "cpu", "max_length": 128},
        "data": {"train": "unused", "annotator_column": "annotator"},
        "loss": {"family": "dpo", "beta": 0.1},
        "optim": {"batch_size": 8, "learning_rate": 1e-4, "lr_scheduler": "constant"},
        "run": {"output_dir": output_dir, "progress": False, "posteriors": False},
    }
    for name, fields in sections.items():
        base.setdefault(name, {}).update(fields)
    return TrainConfig.from_dict(base)


def clock() -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)``.

    This machine is shared: other jobs make wall-clock times swing by tens of per
    cent from one minute to the next. With one torch thread the process's CPU time
    is what the wall time would be on an idle machine, so the benchmarks' headline
    figures use CPU time and report wall time beside it.
    """
    return time.perf_counter(), time.process_time()


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall, CPU)`` seconds taken by ``fn()``."""
    wall, cpu = clock()
    fn()
    wall2, cpu2 = clock()
    return wall2 - wall, cpu2 - cpu


def gaps(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(wall, CPU)`` seconds between consecutive :func:`clock` stamps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def emit(result: dict, name: str) -> None:
    """Record the result in ``benchmarks/results/<name>[-quick].json`` and print it as the
    last line (one JSON object)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'-quick' if result.get('quick') else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
