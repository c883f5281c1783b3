"""Seconds per optimizer step of RE-DPO against plain DPO, on the same batches.

Two trainers share one policy (LoRA): one with EM (E-step by enumeration, the
policy step as the gradient of the marginal likelihood, the annotator M-step), one
with the plain DPO loss. For each step ``s`` both run step ``s`` (the same units:
their batch order depends on the seed only), in alternating order, and the ratio
of their times is taken; the figure is the median of these paired ratios, in CPU
time of the process (one torch thread; see ``common.clock``), with the wall-time
ratio beside it.

Models: ``30m`` (a Llama of about 30M parameters with random weights built from a
config: big enough that the forward and backward dominate, as in real use; the
target is a ratio <= 1.03), ``tiny`` (models/tiny-llama: overhead-dominated, no
target) and ``smollm2`` (SmolLM2-135M-Instruct; not in ``--quick``). The paper's
implementation: about 1.11x on average, up to 1.40x (SimPO).

    python benchmarks/estep_overhead.py --quick      # 30m + tiny, under a minute
    python benchmarks/estep_overhead.py              # all three

The last line printed is one JSON object with the figures; it is also written
to ``benchmarks/results/`` (``-quick`` for the quick run).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import config, emit, machine, make_policy, median, rule_records, timed

from repo.train import Trainer

TARGET = 1.03


def measure(
    model: str, steps: int, batch_size: int, filler: tuple[int, int], family: str = "dpo"
) -> dict:
    """Paired step times of RE-<family> and <family> on ``model``."""
    policy = make_policy(model)
    records = rule_records(batch_size * (steps + 1), seed=1, filler=filler)
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/reference"
        optim = {"batch_size": batch_size, "epochs": 1}
        model_section = {"reference_cache_dir": cache, "max_length": 128}
        trainers = {
            em: Trainer(
                config(
                    f"{tmp}/{em}",
                    model=model_section,
                    loss={"family": family},
                    em={"enabled": em},
                    optim=optim,
                ),
                policy=policy,
                records=records,
            )
            for em in (True, False)
        }
        for trainer in trainers.values():  # warm-up step (allocations, first-call costs)
            trainer.train_step(0)
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for step in range(1, steps + 1):
            order = (True, False) if step % 2 else (False, True)
            for em in order:
                times[em].append(timed(lambda em=em, s=step: trainers[em].train_step(s)))
    cpu_ratios = [r[1] / p[1] for r, p in zip(times[True], times[False], strict=True)]
    wall_ratios = [r[0] / p[0] for r, p in zip(times[True], times[False], strict=True)]
    cpu = {em: median([t[1] for t in times[em]]) for em in times}
    wall = {em: median([t[0] for t in times[em]]) for em in times}
    return {
        "model": model,
        "parameters_m": round(sum(p.numel() for p in policy.lm.parameters()) / 1e6, 1),
        "family": family,
        "batch_size": batch_size,
        "filler_words": list(filler),
        "steps": steps,
        "ratio": round(median(cpu_ratios), 4),
        "ratio_wall": round(median(wall_ratios), 4),
        "cpu_seconds_re": round(cpu[True], 4),
        "cpu_seconds_plain": round(cpu[False], 4),
        "wall_seconds_re": round(wall[True], 4),
        "wall_seconds_plain": round(wall[False], 4),
        "overhead_ms": round(1000 * (cpu[True] - cpu[False]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30m and tiny, few steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (CPU time = wall time at 1)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # short responses (3-6 filler words), few steps: under a minute
        runs = [("30m", 8, 4, (3, 6)), ("tiny", 20, 8, (3, 6))]
    else:
        runs = [("30m", 30, 8, (8, 14)), ("tiny", 60, 8, (8, 14)), ("smollm2", 12, 4, (8, 14))]
    results = [measure(model, steps, batch, filler) for model, steps, batch, filler in runs]
    for r in results:
        print(
            f"{r['model']:>8} ({r['parameters_m']}M): RE-DPO {r['cpu_seconds_re']:.3f} CPU s/step, "
            f"DPO {r['cpu_seconds_plain']:.3f}, median paired ratio {r['ratio']:.3f} "
            f"(wall: {r['ratio_wall']:.3f})"
        )
    headline = next(r for r in results if r["model"] == "30m")
    emit(
        {
            "benchmark": "estep_overhead",
            "ratio": headline["ratio"],
            "target": TARGET,
            "meets_target": headline["ratio"] <= TARGET,
            "quick": args.quick,
            "models": results,
            "machine": machine(),
        },
        "estep_overhead",
    )


if __name__ == "__main__":
    main()
