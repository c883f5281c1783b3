"""EM against NUTS on PandaLM's three human annotators (docs/em-vs-nuts.md).

Fits the shipped PandaLM human test set (binary labels, truth shared by the three
labels of a comparison, a learned class prior as scorer) with

* the symmetric flip by EM (with its Laplace posterior) and by NUTS
  (4 chains of 500 warm-up + 500 draws), under a Beta(2, 1) prior on eta;
* the two-coin and spammer models by NUTS, for model comparison by PSIS-LOO;

writes each fit's RESULT.json, InferenceData and EM trajectory, and runs
``re-po diagnose`` on them: ``docs/pandalm/report.md`` and its PNG figures, which
the walk-through shows. Prints the EM-against-NUTS table and the LOO comparison.

Run: ``python examples/pandalm_em_vs_nuts.py [--out docs/pandalm] [--draws 500]``
(about two minutes on two cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from repo.data.pandalm import pandalm_label_table
from repo.diagnostics import compare_em_bayes, compare_models, diagnose
from repo.diagnostics.io import write_inference_data, write_trajectory
from repo.fit import fit_noise
from repo.inference.bayes import BayesSettings

PRIOR = "beta:2,1"


def fit_and_write(table, model: str, method: str, settings: BayesSettings, folder: Path):
    """Fit, then write RESULT.json with its InferenceData and trajectory beside it."""
    print(f"fitting {model} by {method} ...", file=sys.stderr)
    fit = fit_noise(table, format="binary", model=model, prior=PRIOR, method=method, bayes=settings)
    stem = f"{model}-{method}"
    write_inference_data(fit.to_inference_data(), folder / f"{stem}.nc")
    write_trajectory(fit.trajectory, folder / f"{stem}.jsonl")
    fit.files = {"inference_data": f"{stem}.nc", "trajectory": f"{stem}.jsonl"}
    fit.to_json(folder / f"{stem}.json")
    return fit, folder / f"{stem}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/pandalm"))
    parser.add_argument("--draws", type=int, default=500, help="NUTS draws (and warm-up) per chain")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table, ties = pandalm_label_table()
    print(f"PandaLM: {len(table)} labels, {table.item.nunique()} items, {ties} ties dropped")
    settings = BayesSettings(num_chains=4, warmup=args.draws, draws=args.draws, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        em, em_path = fit_and_write(table, "symmetric", "em", settings, folder)
        nuts, nuts_path = fit_and_write(table, "symmetric", "nuts", settings, folder)
        others = [
            fit_and_write(table, m, "nuts", settings, folder) for m in ("two-coin", "spammer")
        ]
        comparison = compare_em_bayes(em, nuts)
        print("\nEM (Laplace 90%) against NUTS (posterior 90%):")
        print(comparison.table.round(4).to_string(index=False))
        print(
            f"times: EM {comparison.seconds['em']:.2f} s, NUTS {comparison.seconds['bayes']:.1f} s"
        )
        idatas = {"symmetric": nuts.to_inference_data()}
        idatas.update({fit.model: fit.to_inference_data() for fit, _ in others})
        print("\nPSIS-LOO (per item):")
        print(compare_models(idatas).round(2).to_string())
        paths = [nuts_path, em_path, *(path for _, path in others)]
        report = diagnose(paths, args.out)
    print(f"\nwrote {report} and its figures")


if __name__ == "__main__":
    main()
