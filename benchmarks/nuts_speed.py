"""NUTS on a small fit: where the seconds go, and ESS per second beside NumPyro.

The case is the CLI's ``re-po fit-noise --format scored --method nuts`` with its
defaults (symmetric flip under Beta(1, 1), EM first, then 4 chains of 500 warm-up
+ 500 draws, split over as many processes as there are cores, started near the EM
estimate with the Laplace variances as initial metric) on 300 labels from 3
annotators (per-label truth, known scores; ``repo.data.simulate.simulate_labels``,
seed 12). Recorded:

* ``cli_s``: wall time of the whole CLI process (``python -m repo.cli fit-noise``),
  the median of ``--repeats`` runs; ``cli_sequential_s`` the same with
  ``--chain-processes 1`` (all chains batched in the CLI's process rather than
  split over as many processes as there are cores); with ``--baseline DIR`` (another checkout, e.g.
  the code before a change) the same command from there, the runs alternated, and
  the medians of the paired ratios (``speedup``: baseline over ours);
* ``import_s``: a fresh process importing ``repo.cli`` and ``repo.fit``;
* ``phases_s``: in this process, EM, NUTS (setup, warm-up and sampling of the four
  chains batched in this process), the enumeration of the truth at every
  draw (Rao-Blackwellised posteriors and pointwise log-likelihood; vectorised over
  draws, ``enumeration_vectorised``) and the ArviZ summaries (R-hat, ESS; the first
  call imports ArviZ);
* ``potential_grad_ms``: one potential-and-gradient call for the chains of a batch
  (``benchmarks/_potential_cost.py``): Pyro's own potential (``initialize_model``)
  chain by chain, and the batch NUTS runs
  (:class:`repo.inference.batched_nuts.BatchedPotential`) without and with
  ``jit_compile``, and the seconds to compile it;
* ``anchor``: min bulk ESS over annotators per second of the sampler call (warm-up,
  sampling, tracing or compilation included), wall and CPU seconds, of our NUTS on
  the Pyro program (``repo.inference.bayes.infer``, key ``pyro``) and of NumPyro's
  NUTS on the same model written in NumPyro (``benchmarks/_numpyro_flip.py``), run
  back to back, and their ratio.

The machine's load average is recorded at the start and the end: on a shared
machine absolute seconds vary with the load, ratios measured side by side less so.

``--quick``: 2 chains of 100 + 100 and one CLI run (with the defaults). The last line printed is one
JSON object with the figures, also written to ``benchmarks/results/``.

Run: ``python benchmarks/nuts_speed.py [--quick] [--repeats 3] [--baseline DIR]``
(NumPyro comes with the ``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro.distributions as dist
import torch
from _numpyro_flip import run_numpyro_nuts
from _potential_cost import potential_cost
from _results import record

from repo.data.simulate import simulate_labels
from repo.inference.bayes import BayesSettings, infer, summarise_draws
from repo.noise import LabelData, SymmetricFlip
from repo.scorers import FixedLogits

ROOT = Path(__file__).resolve().parents[1]
NUM_LABELS, NUM_ANNOTATORS, SEED = 300, 3, 12


def simulate():
    """The small case's labels (per-label truth) as arrays."""
    sim = simulate_labels(
        num_items=NUM_LABELS, num_annotators=NUM_ANNOTATORS, shared_truth=False, seed=SEED
    )
    return sim.annotator, sim.label.astype(float), sim.scores


def write_csv(path: Path) -> Path:
    """The small case as the CLI reads it (``--format scored``)."""
    annotator, label, scores = simulate()
    rows = ["annotator,label,score"]
    rows += [
        f"ann{a},{int(o)},{float(s)!r}" for a, o, s in zip(annotator, label, scores, strict=True)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(root)
    return env


def _timed(command: list[str], root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=root, env=_environment(root), check=True, capture_output=True)
    return time.perf_counter() - start


def cli_times(
    csv: Path,
    out: Path,
    chains: int,
    warmup: int,
    draws: int,
    repeats: int,
    baseline: Path | None,
    sequential: bool = True,
) -> dict:
    """Wall seconds of the whole ``fit-noise`` process: with its defaults (chains in
    as many processes as there are cores), with ``--chain-processes 1`` (one after
    the other) and, given ``baseline``, that checkout's with its defaults."""
    command = [
        sys.executable, "-m", "repo.cli", "fit-noise", str(csv), "--format", "scored",
        "--method", "nuts", "--chains", str(chains), "--warmup", str(warmup),
        "--draws", str(draws), "--out", str(out),
    ]  # fmt: skip
    runs: dict[str, list[float]] = {"default": [], "sequential": [], "baseline": []}
    for _ in range(repeats):
        runs["default"].append(_timed(command, ROOT))
        if sequential:
            runs["sequential"].append(_timed([*command, "--chain-processes", "1"], ROOT))
        if baseline is not None:
            runs["baseline"].append(_timed(command, baseline))
    figures = {"cli_s": statistics.median(runs["default"]), "cli_runs_s": runs["default"]}
    if sequential:
        figures["cli_sequential_s"] = statistics.median(runs["sequential"])
        figures["cli_sequential_runs_s"] = runs["sequential"]
    if baseline is not None:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=baseline, capture_output=True, text=True
        ).stdout.strip()  # empty for an exported tree (git archive)
        figures["baseline"] = {
            "path": str(baseline),
            "commit": commit,
            "cli_s": statistics.median(runs["baseline"]),
            "cli_runs_s": runs["baseline"],
            "speedup": statistics.median(
                b / d for b, d in zip(runs["baseline"], runs["default"], strict=True)
            ),
        }
        if sequential:
            figures["baseline"]["speedup_sequential"] = statistics.median(
                b / s for b, s in zip(runs["baseline"], runs["sequential"], strict=True)
            )
    return figures


def import_seconds() -> float:
    """A fresh process importing the CLI and the fitting module."""
    code = "import repo.cli, repo.fit"
    return _timed([sys.executable, "-c", code], ROOT) - _timed([sys.executable, "-c", ""], ROOT)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def in_process(chains: int, warmup: int, draws: int) -> dict:
    """Phases of the fit in this process, and its NUTS beside NumPyro's."""
    from repo.diagnostics.compat import ess_bulk, rhat
    from repo.inference.em import fit_em

    annotator, label, scores = simulate()
    data = LabelData.from_labels(annotator, label, num_annotators=NUM_ANNOTATORS)
    scorer = FixedLogits(torch.as_tensor(scores))
    one = torch.ones((), dtype=torch.float64)
    model = SymmetricFlip(NUM_ANNOTATORS, prior=dist.Beta(one, one))
    phases = {}
    start = time.perf_counter()
    fit_em(model, scorer, data)
    phases["em"] = time.perf_counter() - start
    settings = BayesSettings(num_chains=chains, warmup=warmup, draws=draws)
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = infer("nuts", model, scorer, data, settings)
    pyro_wall, pyro_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    phases["nuts"] = result.draws.seconds
    start = time.perf_counter()
    vectorised = result.enumeration().vectorised
    phases["enumeration"] = time.perf_counter() - start
    start = time.perf_counter()
    summarise_draws(result)
    phases["summaries"] = time.perf_counter() - start

    eta = result.draws.samples["eta"]
    cpu = _cpu_seconds()
    numpyro = run_numpyro_nuts(
        annotator, label, scores, NUM_ANNOTATORS, (1.0, 1.0), model.eta.detach().numpy(),
        chains=chains, warmup=warmup, draws=draws,
    )  # fmt: skip
    numpyro_cpu = _cpu_seconds() - cpu
    sides = {}
    for name, draws_, wall, cpu_s, divergences in (
        ("pyro", eta, pyro_wall, pyro_cpu, result.draws.num_divergences),
        ("numpyro", numpyro["eta"], numpyro["seconds"], numpyro_cpu, numpyro["divergences"]),
    ):
        ess = float(ess_bulk(draws_).min())
        sides[name] = {
            "wall_s": wall,
            "cpu_s": cpu_s,
            "min_ess_bulk": ess,
            "max_r_hat": float(rhat(draws_).max()),
            "divergences": divergences,
            "min_ess_per_s": ess / wall,
            "min_ess_per_cpu_s": ess / cpu_s,
            "eta_mean": draws_.mean(axis=(0, 1)).tolist(),
        }
    anchor = {
        **sides,
        "numpyro_over_pyro_ess_per_s": sides["numpyro"]["min_ess_per_s"]
        / sides["pyro"]["min_ess_per_s"],
        "numpyro_over_pyro_ess_per_cpu_s": sides["numpyro"]["min_ess_per_cpu_s"]
        / sides["pyro"]["min_ess_per_cpu_s"],
    }
    gradients = potential_cost(model, scorer(data).detach(), data, chains, repeats=50)
    return {
        "phases_s": phases,
        "enumeration_vectorised": vectorised,
        "anchor": anchor,
        "potential_grad_ms": gradients,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 chains of 100 + 100, one run")
    parser.add_argument("--repeats", type=int, default=3, help="CLI runs (pairs with --baseline)")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to compare with")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chains, warmup, draws = (2, 100, 100) if args.quick else (4, 500, 500)
    repeats = 1 if args.quick else args.repeats
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_csv(Path(tmp) / "labels.csv")
        cli = cli_times(
            csv, Path(tmp) / "fit.json", chains, warmup, draws, repeats, args.baseline,
            sequential=not args.quick,
        )  # fmt: skip
    figures = {
        "labels": NUM_LABELS,
        "annotators": NUM_ANNOTATORS,
        "chains": chains,
        "warmup": warmup,
        "draws": draws,
        **cli,
        "import_s": import_seconds(),
        **in_process(chains, warmup, draws),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
    }
    return record("nuts_speed", args.quick, figures, args.out)


if __name__ == "__main__":
    main()
