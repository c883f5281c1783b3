"""The 200-interval calibration study of NUTS against known reliabilities.

Four replications of 50 annotators with 2,000 down to 20 labels (Zipf-like
counts), ``eta_k ~ Beta(4, 1.5)``, scores ``s ~ N(0, 3^2)`` given, per-label truth,
the symmetric flip under the same prior; NUTS with 4 chains of 100 warm-up + 1,000
draws (chains started near the EM estimate, Laplace variances as the metric).
Targets (issue 4): the 90% intervals cover the true eta for >= 85% of the 200;
R-hat <= 1.01 and bulk ESS >= 400 for every eta; the EM estimate inside the 90%
interval for >= 85%. ``tests/test_bayes.py`` asserts the same thresholds on one
replication (the part that fits the test suite's time).

``--quick``: one replication, 2 chains of 100 + 300 (within a minute; the R-hat
and ESS targets are not expected to hold there). The last line printed is one JSON
object; it is also written to ``benchmarks/results/``.

Run: ``python benchmarks/calibration.py [--quick]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _results import record

from repo.diagnostics.calibration import coverage_figures, coverage_study
from repo.inference.bayes import BayesSettings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small replication")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    replications, chains, draws = (1, 2, 300) if args.quick else (4, 4, 1000)
    settings = BayesSettings(num_chains=chains, warmup=100, draws=draws, adapt_mass_matrix=False)
    start = time.perf_counter()
    study = coverage_study(replications, settings, seed=0)
    figures = coverage_figures(study)
    targets = {
        "coverage90": figures["coverage90"] >= 0.85,
        "max_r_hat": figures["max_r_hat"] <= 1.01,
        "min_ess_bulk": figures["min_ess_bulk"] >= 400,
        "em_inside90": figures["em_inside90"] >= 0.85,
    }
    result = record(
        "calibration",
        args.quick,
        {
            "replications": replications,
            "chains": chains,
            "warmup": 100,
            "draws": draws,
            "wall_s": time.perf_counter() - start,
            **figures,
            "targets": targets,
            "targets_met": all(targets.values()),
        },
        args.out,
    )
    return result


if __name__ == "__main__":
    main()
