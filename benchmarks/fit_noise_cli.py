"""``re-po fit-noise`` as a whole process against crowd-kit's, and ``--idata`` at scale.

1. **Against crowd-kit, whole process** (600,000 labels: 200,000 items, 2,000
   annotators, 3 labels each, shared truth, 5% adversarial annotators; the
   simulation of ``benchmarks/noise_fit.py``), written once as a CSV. Each side
   is one fresh Python process timed from start to exit:

   * ours: ``python -m repo.cli fit-noise labels.csv --format binary --out DIR``
     (defaults: symmetric model, EM and its Laplace posterior; writes the saved
     :class:`~repo.fit.NoiseFit`: ``fit.json`` and Parquet tables);
   * theirs: import crowd-kit, ``pandas.read_csv``, ``OneCoinDawidSkene(n_iter=100,
     tol=1e-5).fit_predict``, write the item labels as a CSV.

   The runs alternate (ours, theirs, ours, ...); the figure is the median of the
   paired wall-time ratios (``--repeats`` pairs). Both sides run with one thread
   (``OMP_NUM_THREADS=1`` and friends). Item accuracy against the simulated truth
   is checked: ours may trail crowd-kit's by at most 0.002. Target: ratio <= 0.5.
2. **``--idata`` at scale**: 2,000,000 labels (666,667 items, 2,000 annotators, 3
   labels each, shared truth) through ``fit-noise --idata``; the peak resident
   memory of the process (``ru_maxrss``), its wall time and the netCDF file's size
   are recorded, with the number of draws whose pointwise log-likelihood was kept
   (:data:`repo.fit.LOG_LIKELIHOOD_VALUES`). Target: peak under 4 GB.

``--quick`` shrinks both by 10x. The figures are written to
``benchmarks/results/fit_noise_cli[-quick].json`` and printed as the last line.

Run: ``python benchmarks/fit_noise_cli.py [--quick] [--repeats 5] [--skip-idata]``
(crowd-kit comes with the ``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _results import record

from repo.data.simulate import simulate_labels
from repo.fit import LOG_LIKELIHOOD_VALUES, NoiseFit

CROWDKIT = """
import sys
import pandas as pd
from crowdkit.aggregation import OneCoinDawidSkene
frame = pd.read_csv(sys.argv[1]).rename(columns={"item": "task", "annotator": "worker"})
predicted = OneCoinDawidSkene(n_iter=100, tol=1e-5).fit_predict(frame)
predicted.rename("label").to_csv(sys.argv[2])
"""

MAX_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
SINGLE_THREAD = dict.fromkeys(THREAD_VARIABLES, "1")


def _environment() -> dict[str, str]:
    env = dict(os.environ, **SINGLE_THREAD)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def crowd_table(
    num_items: int, num_annotators: int, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """The crowd of this benchmark and ``benchmarks/noise_fit.py``: labels 1/2 (3 an item,
    5% adversarial annotators) and each item's truth (0/1)."""
    sim = simulate_labels(
        num_items=num_items,
        num_annotators=num_annotators,
        labels_per_item=3,
        shared_truth=True,
        adversarial_fraction=0.05,
        seed=seed,
    )
    table = pd.DataFrame({"annotator": sim.annotator, "item": sim.item, "label": sim.label + 1})
    return table, np.asarray(sim.item_truth)


def large_crowd_table(num_items: int, num_annotators: int, seed: int = 1) -> pd.DataFrame:
    """The same kind of crowd drawn directly (3 distinct annotators an item, a
    uniform eta in [0.55, 0.98], 5% adversarial), in memory linear in the labels."""
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, num_annotators, size=(num_items, 3))
    while True:  # redraw an item's repeated annotators until the three differ
        repeated = (slots[:, 0] == slots[:, 1]) | (slots[:, 0] == slots[:, 2])
        repeated |= slots[:, 1] == slots[:, 2]
        if not repeated.any():
            break
        slots[repeated] = rng.integers(0, num_annotators, size=(int(repeated.sum()), 3))
    eta = rng.uniform(0.55, 0.98, size=num_annotators)
    adversarial = rng.permutation(num_annotators)[: num_annotators // 20]
    eta[adversarial] = 1 - eta[adversarial]
    truth = rng.random(num_items) < 0.5
    correct = rng.random(slots.shape) < eta[slots]
    label = np.where(correct, truth[:, None], ~truth[:, None]).astype(np.int64) + 1
    item = np.repeat(np.arange(num_items), 3)
    return pd.DataFrame({"annotator": slots.reshape(-1), "item": item, "label": label.reshape(-1)})


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    return seconds


def _ours(csv: Path, out: Path) -> float:
    command = [sys.executable, "-m", "repo.cli", "fit-noise", str(csv), "--format", "binary"]
    return _timed([*command, "--out", str(out)])


def _theirs(csv: Path, out: Path) -> float:
    return _timed([sys.executable, "-c", CROWDKIT, str(csv), str(out)])


def _accuracies(ours: Path, theirs: Path, truth: np.ndarray) -> tuple[float, float]:
    fit = NoiseFit.load(ours)
    a, b = fit.truth_values
    items = fit.items["id"].astype(np.int64).to_numpy()
    predicted = np.where(fit.items[f"p_{a}"].to_numpy() > 0.5, int(a), int(b)) - 1
    ours_accuracy = float((predicted == truth[items]).mean())
    crowd = pd.read_csv(theirs).set_index("task")["label"].sort_index()
    theirs_accuracy = float(((crowd.to_numpy() - 1) == truth[crowd.index.to_numpy()]).mean())
    return ours_accuracy, theirs_accuracy


def crowdkit_benchmark(num_items: int, num_annotators: int, repeats: int, tmp: Path) -> dict:
    """Whole ``re-po fit-noise`` against whole crowd-kit, alternating."""
    table, truth = crowd_table(num_items, num_annotators)
    csv = tmp / "labels.csv"
    table.to_csv(csv, index=False)
    ours_s, theirs_s, ratios = [], [], []
    for repeat in range(repeats):
        ours_s.append(_ours(csv, tmp / "fit"))
        theirs_s.append(_theirs(csv, tmp / "crowdkit.csv"))
        ratios.append(ours_s[-1] / theirs_s[-1])
        print(
            f"pair {repeat + 1}: ours {ours_s[-1]:.2f} s, crowd-kit {theirs_s[-1]:.2f} s",
            file=sys.stderr,
        )
    ours_accuracy, theirs_accuracy = _accuracies(tmp / "fit", tmp / "crowdkit.csv", truth)
    written = sum(p.stat().st_size for p in (tmp / "fit").iterdir())
    return {
        "labels": int(len(table)),
        "items": num_items,
        "annotators": num_annotators,
        "repeats": repeats,
        "ours_s": [round(s, 3) for s in ours_s],
        "theirs_s": [round(s, 3) for s in theirs_s],
        "ours_median_s": round(statistics.median(ours_s), 3),
        "theirs_median_s": round(statistics.median(theirs_s), 3),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_target": 0.5,
        "ours_accuracy": round(ours_accuracy, 4),
        "theirs_accuracy": round(theirs_accuracy, 4),
        "accuracy_margin": round(ours_accuracy - theirs_accuracy, 4),
        "accuracy_margin_target": -0.002,
        "ours_output_bytes": written,
    }


def idata_benchmark(num_items: int, num_annotators: int, tmp: Path) -> dict:
    """Peak memory, time and file size of ``fit-noise --idata`` on a large crowd."""
    table = large_crowd_table(num_items, num_annotators)
    csv = tmp / "labels-large.csv"
    table.to_csv(csv, index=False)
    idata = tmp / "large.nc"
    command = [sys.executable, "-m", "repo.cli", "fit-noise", str(csv), "--format", "binary"]
    command += ["--out", str(tmp / "fit-large"), "--idata", str(idata)]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MAX_RSS, *command],
        env=_environment(),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"fit-noise --idata failed:\n{result.stderr[-2000:]}")
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    units = num_items  # shared truth: one log-likelihood per item
    return {
        "labels": int(len(table)),
        "items": num_items,
        "annotators": num_annotators,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_kib / 2**20, 3),
        "peak_rss_target_gb": 4.0,
        "idata_bytes": idata.stat().st_size,
        "idata_mb": round(idata.stat().st_size / 2**20, 1),
        "log_likelihood_draws": min(2000, max(1, LOG_LIKELIHOOD_VALUES // units)),
        "log_likelihood": "per item (shared truth), float64, draws thinned to "
        "LOG_LIKELIHOOD_VALUES values in all",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller")
    parser.add_argument("--repeats", type=int, default=5, help="paired runs against crowd-kit")
    parser.add_argument("--skip-idata", action="store_true", help="only the crowd-kit pairs")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    figures: dict = {"threads": "1 (OMP, MKL, OpenBLAS) in every timed process"}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        print(f"against crowd-kit: {600_000 // scale} labels ...", file=sys.stderr)
        figures["crowdkit"] = crowdkit_benchmark(200_000 // scale, 2_000, args.repeats, tmp)
        print(json.dumps(figures["crowdkit"]), file=sys.stderr)
        if not args.skip_idata:
            print(f"--idata: {2_000_000 // scale} labels ...", file=sys.stderr)
            figures["idata"] = idata_benchmark(2_000_001 // 3 // scale, 2_000, tmp)
            print(json.dumps(figures["idata"]), file=sys.stderr)
    row = figures["crowdkit"]
    checks = [row["ratio"] <= row["ratio_target"]]
    checks.append(row["accuracy_margin"] >= row["accuracy_margin_target"])
    if "idata" in figures:
        checks.append(figures["idata"]["peak_rss_gb"] < figures["idata"]["peak_rss_target_gb"])
    figures["targets_met"] = all(checks)
    return record("fit_noise_cli", args.quick, figures, args.out)


if __name__ == "__main__":
    main()
