"""GLAD in re-po against crowd-kit's GLAD, on simulated crowds with known truth.

Crowds follow GLAD itself (Whitehill et al., 2009): ``K`` annotators with abilities
``alpha_k`` spread from adversarial (-1) to expert (3), ``I`` items with ease
``beta_i ~ LogNormal(0, 0.75)`` and balanced binary truth; each item is labelled by
``L`` annotators drawn at random, a label correct with probability
``sigmoid(alpha_k beta_i)``. Both tools start from the same table (annotator, item,
label) and use the same priors (``alpha ~ Normal(1, 1)``, ``log beta ~ Normal(1, 1)``:
crowd-kit's defaults, the mode taken in ``(alpha, log beta)`` by both); re-po runs
``fit_noise(model="glad", method="map")`` (MAP-EM and its Laplace intervals),
crowd-kit ``GLAD(n_iter=100, tol=1e-5)``.
Recorded per replication and as medians: the share of items whose truth each
recovers, the Pearson correlation of the fitted ``alpha`` with the true one and of
``log beta`` with the true one, and the seconds. The anchor is agreement: re-po's
accuracy within 0.01 of crowd-kit's and its ``alpha`` correlation no lower than
crowd-kit's minus 0.02.

Run: ``python benchmarks/glad.py [--quick]`` (crowd-kit comes with the ``bench``
extra). ``--quick`` runs one small crowd (seconds); the full run three replications
of 2,000 items. The last line printed is one JSON object with the figures; it is
also written to ``benchmarks/results/glad[-quick].json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _results import record

from repo.fit import fit_noise


def simulate_crowd(num_annotators: int, num_items: int, labels_per_item: int, seed: int):
    """A GLAD crowd: (table, alpha, beta, truth), items and annotators as strings."""
    rng = np.random.default_rng(seed)
    alpha = np.linspace(-1.0, 3.0, num_annotators)
    beta = np.exp(rng.normal(0.0, 0.75, num_items))
    truth = (rng.random(num_items) < 0.5).astype(int)
    item = np.repeat(np.arange(num_items), labels_per_item)
    annotator = np.concatenate(
        [rng.choice(num_annotators, labels_per_item, replace=False) for _ in range(num_items)]
    )
    correct = rng.random(item.size) < 1 / (1 + np.exp(-alpha[annotator] * beta[item]))
    label = np.where(correct, truth[item], 1 - truth[item])
    table = pd.DataFrame(
        {
            "annotator": [f"w{k}" for k in annotator],
            "item": [f"t{i}" for i in item],
            "label": label,
        }
    )
    return table, alpha, beta, truth


def _index(ids, prefix: str) -> np.ndarray:
    return np.asarray([int(str(x)[len(prefix) :]) for x in ids])


def run_repo(table: pd.DataFrame, alpha, beta, truth) -> dict:
    start = time.perf_counter()
    fit = fit_noise(table, format="binary", model="glad", method="map")
    seconds = time.perf_counter() - start
    items = _index(fit.items["id"], "t")
    annotators = _index(fit.annotators["id"], "w")
    value = fit.truth_values.index("1")
    p_one = fit.items[f"p_{fit.truth_values[value]}"].to_numpy()
    return {
        "seconds": seconds,
        "accuracy": float(np.mean((p_one > 0.5) == truth[items])),
        "alpha_corr": float(np.corrcoef(fit.annotators["alpha"], alpha[annotators])[0, 1]),
        "log_beta_corr": float(np.corrcoef(np.log(fit.items["beta"]), np.log(beta[items]))[0, 1]),
        "em_iterations": fit.iterations,
    }


def run_crowdkit(table: pd.DataFrame, alpha, beta, truth) -> dict:
    from crowdkit.aggregation import GLAD

    frame = table.rename(columns={"annotator": "worker", "item": "task"})
    start = time.perf_counter()
    model = GLAD(n_iter=100, tol=1e-5)
    labels = model.fit_predict(frame)
    seconds = time.perf_counter() - start
    items = _index(labels.index, "t")
    annotators = _index(model.alphas_.index, "w")
    betas = model.betas_.loc[labels.index]  # crowd-kit keeps log beta
    return {
        "seconds": seconds,
        "accuracy": float(np.mean(labels.to_numpy().astype(int) == truth[items])),
        "alpha_corr": float(np.corrcoef(model.alphas_.to_numpy(), alpha[annotators])[0, 1]),
        "log_beta_corr": float(np.corrcoef(betas.to_numpy(), np.log(beta[items]))[0, 1]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small crowd (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        sizes, seeds = {"num_annotators": 6, "num_items": 40, "labels_per_item": 3}, [0]
    else:
        sizes, seeds = {"num_annotators": 30, "num_items": 2000, "labels_per_item": 5}, [0, 1, 2]
    runs = []
    for seed in seeds:
        table, alpha, beta, truth = simulate_crowd(**sizes, seed=seed)
        runs.append(
            {
                "seed": seed,
                "repo": run_repo(table, alpha, beta, truth),
                "crowdkit": run_crowdkit(table, alpha, beta, truth),
            }
        )

    def median(tool: str, key: str) -> float:
        return statistics.median(run[tool][key] for run in runs)

    figures = {
        "crowd": {
            **sizes,
            "replications": len(seeds),
            "labels": sizes["num_items"] * sizes["labels_per_item"],
        },
        "runs": runs,
    }
    for key in ("accuracy", "alpha_corr", "log_beta_corr", "seconds"):
        figures[f"{key}_repo"] = median("repo", key)
        figures[f"{key}_crowdkit"] = median("crowdkit", key)
    figures["targets_met"] = bool(
        figures["accuracy_repo"] >= figures["accuracy_crowdkit"] - 0.01
        and figures["alpha_corr_repo"] >= figures["alpha_corr_crowdkit"] - 0.02
    )
    return record("glad", args.quick, figures, args.out)


if __name__ == "__main__":
    main()
