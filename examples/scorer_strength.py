"""How strong RE-DPO's cross-fitted scorers are, seed by seed, and what that allows for eta.

One annotator, LoRA, four passes (``one_annotator_lora.py --epochs 4``): RE-DPO's E-step
reads cross-fitted scores (``docs/math.md`` section 13; asked for, ``[em] cross_fit =
true``, which is what ``"auto"`` gives from 4,096 pairs up), by the default's scorers
(DPO's on two folds when the committed tables ran; IPO's over several passes since
2026-12-07, on four folds since later that day), and ``eta`` is identified only as
far as those scores tell the truths apart (section 9). This script measures, for each
seed, the scorers that ``re-po train`` trained, against the truths the rule task knows:

* ``scorer_accuracy``: the share of the 8,192 training pairs whose score's sign is the
  true preference, each scored by the fold's scorer that never trained on it (out of
  sample, what the E-step reads);
* ``spread``: the standard deviation of the scores once calibrated on the truths,
  :math:`a^\\ast\\,\\mathrm{rms}(c)` with :math:`a^\\ast` the Platt scale fitted to the
  true preferences (:func:`repo.scorers.calibration_scale`, ``q`` the truths): the
  quantity ``ridge_refit.py`` varies (``sd of logits``), where it measures the error
  of ``eta`` for a scorer calibrated by construction;
* ``top_accuracy``: the same share among the 5% of the pairs scored most confidently
  (largest ``|c|``): how far the scores' tail, which identifies ``eta``, is right;
* ``fold_accuracy``: each fold scorer's accuracy on the 500 clean held-out pairs
  (``re-po eval``);
* ``eta``, ``profile_interval``: ``reliability.json``'s; ``eta_true``: the realised share
  of correct labels.

``--calibration`` also writes, per seed and tenth of the pairs by ``|c|``
(:func:`calibration`), the share of the pairs whose score's sign is the truth beside
what the fitted Platt scale says of it, :math:`\\sigma(\\hat a |c|)`, and the share whose
sign is the label beside what the fit says of that, :math:`(1 - \\hat\\eta) + (2\\hat\\eta -
1)\\,\\sigma(\\hat a |c|)`: where the scorer's accuracy levels off below 1 (a share of
its most confident pairs wrong), the Platt family, whose accuracy goes to 1, reads the
labels' agreement there as labels less reliable than they are. ``--markers`` trains on
another rule task (marker words a side; ``rule_pairs``).

    python examples/scorer_strength.py --seeds 1 2 3 4 5 6 7 8 9 10 11 12 13 14 \
        --runs /tmp/lora-runs --out docs/experiments
    python examples/ridge_refit.py --sizes 8192 --reliabilities 0.6 \
        --spreads 1.25 1.5 1.75 2.25 --seeds 20 --out /tmp/ridge   # what each spread allows
    python examples/scorer_strength.py --markers 8 --seeds 102 --calibration \
        --runs /tmp/lora-runs-8 --out docs/experiments         # a scorer whose accuracy levels off

``--runs`` keeps each seed's folder (``s<seed>/``: the pairs, ``run/`` and its scorers
under ``run/cross-fit/``) and reuses a finished run found there; without it the runs go
to a temporary folder. Writes ``scorer-strength.csv`` (a row per seed) and prints the
table of ``scorer-strength-table.md`` (``scorer-strength-markers8.csv`` and so on for another
task; ``scorer-calibration[-markersM].csv`` with ``--calibration``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import one_annotator_lora as lora  # noqa: E402

from repo.data.rule_pairs import rule_pairs  # noqa: E402
from repo.diagnostics.report import markdown_table  # noqa: E402
from repo.scorers import calibration_scale  # noqa: E402
from repo.train.run_dir import RunDir  # noqa: E402


def calibration(
    c: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, scale: float, eta: float
) -> list[dict]:
    r"""Per tenth of the pairs by ``|c|`` (module docstring): the range of ``|c|``, the
    share of pairs whose score's sign is the truth (``right``) and the fitted Platt
    scale's :math:`\sigma(\hat a |c|)` (``platt``), the share whose sign is the label
    (``agree``) and the fit's :math:`(1 - \hat\eta) + (2\hat\eta - 1)\,\mathrm{platt}`
    (``fit_agree``)."""
    said = (c > 0).to(torch.float64)
    order = c.abs().argsort()
    out = []
    for k, part in enumerate(order.tensor_split(10)):
        platt = float(torch.sigmoid(scale * c[part].abs()).mean())
        out.append(
            {
                "tenth": k + 1,
                "abs_c_low": round(float(c[part].abs().min()), 3),
                "abs_c_high": round(float(c[part].abs().max()), 3),
                "right": round(float((said[part] == truth[part]).double().mean()), 3),
                "platt": round(platt, 3),
                "agree": round(float((said[part] == labels[part]).double().mean()), 3),
                "fit_agree": round((1 - eta) + (2 * eta - 1) * platt, 3),
            }
        )
    return out


def measure(folder: Path, run: Path, rows: list[dict]) -> dict:
    """The scorers' strength in a finished cross-fitted run (module docstring), with its
    :func:`calibration` table (``"calibration"``)."""
    run_dir = RunDir(run)
    c, labels, truth = lora.cross_fitted_scores(run, rows)  # c in units of their rms
    scale = calibration_scale(c, truth, bounds=(1e-3, 1e3))
    report = run_dir.read_reliability()
    folds = []
    for k in range(report["e_step"]["cross_fit_folds"]):
        scores = subprocess.run(
            [sys.executable, "-m", "repo.cli", "eval", str(run_dir.cross_fit_scorer(k)),
             "--data", "held.jsonl"],
            cwd=folder, check=True, capture_output=True, text=True,
        )  # fmt: skip
        folds.append(json.loads(scores.stdout.strip().splitlines()[-1])["accuracy"])
    right = (c > 0).to(torch.float64) == truth
    top = c.abs().argsort(descending=True)[: max(1, len(c) // 20)]
    return {
        "scorer_accuracy": round(float(right.double().mean()), 4),
        "top_accuracy": round(float(right[top].double().mean()), 4),
        "spread": round(scale * float(c.pow(2).mean().sqrt()), 3),
        "fold_accuracy": folds,
        "eta": round(report["annotators"][0]["eta"], 4),
        "profile_interval": [round(v, 4) for v in report["eta_profile"]["interval"]],
        "calibration": calibration(
            c, truth, labels, report["e_step_scale"], report["annotators"][0]["eta"]
        ),
    }


def run_seed(root: Path, seed: int, rho: float, pairs: int, epochs: int, markers: int = 4) -> dict:
    """RE-DPO as ``one_annotator_lora.py`` trains it, in ``root/s<seed>`` (a finished run
    there is reused), then :func:`measure`."""
    folder = root / f"s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    data = rule_pairs(pairs, [1 - rho], seed=seed, markers=markers)
    held = rule_pairs(500, [1.0], seed=10_000 + seed, markers=markers)
    lora._write(folder / "train.jsonl", data.rows)
    lora._write(folder / "held.jsonl", held.rows)
    run = folder / "run"
    if not (run / "reliability.json").exists():  # cross-fitted, as "auto" is at 4,096 pairs up
        run, _ = lora._train_and_eval(
            folder, True, seed, "dpo", epochs, asked={"cross_fit": "true"}
        )
    row = {"seed": seed, "pairs": pairs, "epochs": epochs, "flip_rate": rho, "markers": markers}
    row["eta_true"] = round(float(data.realised_eta[0]), 4)
    return row | measure(folder, run, data.rows)


def table(rows: pd.DataFrame) -> str:
    """The rows by spread, with ``eta``'s error and whether the interval reaches 1."""
    out = rows.sort_values("spread").assign(
        eta_off=lambda f: (f.eta - f.eta_true).abs().round(3),
        identified=lambda f: [high < 1.0 for _, high in f.profile_interval],
    )
    columns = ["seed", "scorer_accuracy", "top_accuracy", "spread", "fold_accuracy"]
    columns += ["eta", "eta_true"]
    return markdown_table(out[[*columns, "eta_off", "profile_interval", "identified"]])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--flip-rate", type=float, default=0.4)
    parser.add_argument("--runs", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--markers", type=int, default=4, help="marker words a side")
    parser.add_argument(
        "--calibration", action="store_true", help="write each seed's calibration table"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="re-po-scorers-") as tmp:
        root = args.runs or Path(tmp)
        rows = [
            run_seed(root, s, args.flip_rate, args.pairs, args.epochs, args.markers)
            for s in args.seeds
        ]
    task = "" if args.markers == 4 else f"-markers{args.markers}"
    tables = [{"seed": r["seed"], **t} for r in rows for t in r.pop("calibration")]
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / f"scorer-strength{task}.csv", index=False)
    print(table(frame))
    if args.calibration:
        calibrated = pd.DataFrame(tables)
        calibrated.to_csv(args.out / f"scorer-calibration{task}.csv", index=False)
        print(markdown_table(calibrated))
    return frame


if __name__ == "__main__":
    main()
