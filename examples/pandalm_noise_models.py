"""Noise models fitted to PandaLM's three human annotators (the first main job of re-po).

PandaLM's human test set has 999 comparisons of two responses, each labelled by
the same three annotators (ties dropped and counted). Under shared truth (the
three labels of a comparison share one latent preference) with a learned class
prior, every flip model is identifiable; the demo fits them all by EM, prints each
annotator's estimated reliability under each model and the labels most likely to
be wrong (lowest posterior ``w``), and writes each model's RESULT.json.

Run: ``python examples/pandalm_noise_models.py [--top 10] [--out DIR]`` (seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from repo.data.pandalm import pandalm_label_table
from repo.fit import NoiseFit, fit_noise

DEMO_MODELS = ("symmetric", "two-coin", "spammer", "hierarchical")


def pandalm_noise_demo(top: int = 10, out: str | Path | None = None) -> dict[str, NoiseFit]:
    """Fit :data:`DEMO_MODELS` to PandaLM and print the report; returns the fits."""
    table, ties = pandalm_label_table()
    print(
        f"PandaLM human test set: {len(table)} labels from {table.annotator.nunique()} "
        f"annotators on {table.item.nunique()} comparisons ({ties} ties dropped)"
    )
    fits = {}
    for model in DEMO_MODELS:
        print(f"fitting {model} ...", file=sys.stderr)
        fits[model] = fit_noise(table, format="binary", model=model)
    etas = pd.DataFrame({m: f.annotators.set_index("id")["eta"] for m, f in fits.items()})
    etas.insert(0, "n_labels", fits["symmetric"].annotators.set_index("id")["n_labels"])
    print("\nReliability eta_k (probability that a label is correct), by noise model:")
    print(etas.round(4).to_string())
    print("\nLog-likelihood (marginal, EM fit):")
    for model, fit in fits.items():
        state = "converged" if fit.converged else "not converged"
        print(f"  {model:13s} {fit.log_likelihood:12.3f}  ({fit.iterations} iterations, {state})")
    two = fits["two-coin"].annotators.set_index("id")[["eta_a", "eta_b"]]
    print("\nTwo-coin: reliability when response2 (eta_a) / response1 (eta_b) is truly better:")
    print(two.round(4).to_string())

    sym = fits["symmetric"]
    labels = sym.labels.merge(
        table.reset_index().rename(columns={"index": "row"}), on="row", how="left"
    )
    suspects = labels.sort_values("w").head(top)
    print(f"\nThe {top} labels most likely mislabelled (symmetric model, lowest w):")
    print(suspects[["item", "annotator", "label", "w"]].round(4).to_string(index=False))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for model, fit in fits.items():
            fit.to_json(out / f"pandalm-{model}.json")
        print(f"\nwrote {', '.join(f'pandalm-{m}.json' for m in fits)} to {out}")
    return fits


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10, help="how many suspect labels to list")
    parser.add_argument("--out", default=None, help="directory for the RESULT.json files")
    args = parser.parse_args(argv)
    pandalm_noise_demo(top=args.top, out=args.out)


if __name__ == "__main__":
    main()
