"""Seconds one annotator's calibrated refit takes with its profile grid on one thread and on all.

The looks of the noise test and the refits run under
:func:`repo.inference.online.single_thread` (the E-step's few hundred numbers are
faster on one thread). The profile likelihood of ``eta``
(:meth:`repo.noise.NoiseModel.eta_profile`) inside
:func:`repo.inference.online.fit_calibrated` is not small: a grid of 201 values of
``eta`` by 121 scales over every label, tens of millions of logarithms at 8,192 labels.
It takes the threads back (:func:`repo.inference.online.all_threads`). This script
times ``fit_calibrated`` under ``single_thread`` as shipped and with ``all_threads``
made a no-op (the grid on one thread), on the same labels, alternating, and reports
the median of the paired ratios of wall time (one thread over all), per size. It also
checks that both give the same fit.

    python benchmarks/profile_threads.py --quick     # 8,192 labels, 3 pairs
    python benchmarks/profile_threads.py             # 8,192 and 60,000 labels, 5 pairs

The last line printed is one JSON object with the figures; it is also written to
``benchmarks/results/`` (``-quick`` for the quick run). The ratio is bounded by the
cores torch may use (``machine.threads``), and falls on a machine whose cores are busy.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
from common import emit, machine, median, timed

import repo.inference.online as online
from repo.data.simulate import simulate_labels
from repo.inference.online import _copy_state, fit_calibrated, single_thread
from repo.noise import SymmetricFlip
from repo.noise.layout import LabelData


def labels(num: int, eta: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, LabelData]:
    """One annotator's labels of reliability ``eta`` over truths drawn from the scores."""
    sim = simulate_labels(
        num_items=num, num_annotators=1, shared_truth=False, eta_range=(eta, eta), seed=seed
    )
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=1)
    return torch.as_tensor(sim.scores, dtype=torch.float64), data


def refit(c: torch.Tensor, data: LabelData, one_thread: bool) -> float:
    """``fit_calibrated`` under ``single_thread`` (its profile on every thread, or on one
    with ``one_thread``); the fit's objective."""
    noise = SymmetricFlip(1)
    starts = [_copy_state(noise)]
    shipped = online.all_threads
    if one_thread:
        online.all_threads = contextlib.nullcontext
    try:
        with single_thread():
            result, _ = fit_calibrated(noise, c, data, starts)
    finally:
        online.all_threads = shipped
    return float(result.objective)


def measure(num: int, pairs: int) -> dict:
    """Paired wall times of the refit with its grid on all threads and on one."""
    c, data = labels(num)
    objective = {False: refit(c, data, False), True: refit(c, data, True)}  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for k in range(pairs):
        for one in (False, True) if k % 2 else (True, False):
            times[one].append(timed(lambda one=one: refit(c, data, one))[0])
    ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
    return {
        "labels": num,
        "pairs": pairs,
        "all_threads_s": round(median(times[False]), 3),
        "one_thread_s": round(median(times[True]), 3),
        "ratio": round(median(ratios), 3),
        "same_fit": abs(objective[False] - objective[True]) <= 1e-9 * abs(objective[True]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = [8192] if args.quick else [8192, 60_000]
    pairs = 3 if args.quick else 5
    result = {
        "benchmark": "profile_threads",
        "quick": args.quick,
        "machine": machine(),
        "sizes": {str(n): measure(n, pairs) for n in sizes},
    }
    emit(result, "profile_threads")
    return result


if __name__ == "__main__":
    main()
