"""The ``re-po`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from repo.data.labels import FORMATS
from repo.noise import NOISE_MODELS


def _fit_noise(args: argparse.Namespace) -> int:
    from repo.fit import fit_noise

    fit = fit_noise(
        args.labels,
        format=args.format,
        model=args.model,
        shared_truth=True if args.shared_truth else None,
        prior=args.prior,
        eta_init=args.eta_init,
        tie_value=None if args.tie_value.lower() == "none" else args.tie_value,
        duplicates=args.duplicates,
        tol=args.tol,
        max_iter=args.max_iter,
        progress=True,
    )
    fit.to_json(args.out)
    state = "converged" if fit.converged else "NOT converged"
    print(
        f"[re-po] {fit.model} on {len(fit.annotators)} annotators: {state} after "
        f"{fit.iterations} iterations, log-likelihood {fit.log_likelihood:.4f}; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from repo.demo import pandalm_noise_demo

    pandalm_noise_demo(top=args.top, out=args.out)
    return 0


def _train(args: argparse.Namespace) -> int:
    import json

    from repo.train import Trainer, describe_config, load_config

    if args.describe_config:
        print(describe_config(), end="")
        return 0
    if args.config is None:
        raise ValueError("re-po train needs a CONFIG.toml (or --describe-config)")
    config = load_config(args.config)
    if args.resume:
        config = config.replace("run", resume=True)
    if args.output_dir is not None:
        config = config.replace("run", output_dir=str(Path(args.output_dir).resolve()))
    trainer = Trainer(config)
    metrics = trainer.train()
    if trainer.is_main:
        print(f"[re-po] {trainer.step} steps; run directory {trainer.output_dir}", file=sys.stderr)
        print(json.dumps(metrics))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from repo.train.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.data, batch_size=args.batch_size, bins=args.bins)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from repo.train.export import export_run

    path, counts = export_run(args.run_dir, args.out, mode=args.mode, threshold=args.threshold)
    print(
        f"[re-po] wrote {counts['written']} of {counts['labels']} labels to {path} "
        f"({counts['flipped']} with w < {args.threshold})",
        file=sys.stderr,
    )
    return 0


def _add_training_commands(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a policy by RE-DPO / RE-IPO / RE-SimPO / RE-CPO from a TOML configuration",
        description="Train a policy as CONFIG.toml says (re-po train --describe-config lists "
        "every field). Several processes: torchrun --nproc_per_node N -m repo.cli train ...",
    )
    train.add_argument("config", nargs="?", help="the training configuration (TOML)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--output-dir", default=None, help="override [run] output_dir")
    train.add_argument(
        "--describe-config", action="store_true", help="print every configuration field and exit"
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval",
        help="preference accuracy, margins and calibration of a trained run on labelled pairs",
    )
    evaluate.add_argument("run_dir", help="a finished run directory")
    evaluate.add_argument("--data", required=True, help="labelled pairs (the run's data format)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--bins", type=int, default=10, help="calibration bins")
    evaluate.add_argument("--out", default=None, help="also write the JSON result here")
    evaluate.set_defaults(run=_eval)

    export = commands.add_parser(
        "export",
        help="the run's data with per-label posteriors (TRL layout): annotated, relabelled or "
        "filtered",
    )
    export.add_argument("run_dir", help="a finished run directory")
    export.add_argument("--mode", default="annotate", choices=["annotate", "relabel", "filter"])
    export.add_argument(
        "--threshold", type=float, default=0.5, help="w below this counts as flipped"
    )
    export.add_argument("--out", default=None, help="JSONL file (default: in RUN_DIR)")
    export.set_defaults(run=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="re-po",
        description="Noise-robust preference alignment (RE-PO) as a probabilistic program.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser(
        "fit-noise",
        help="fit an annotator noise model to a label table by EM",
        description="Fit an annotator noise model to LABELS (CSV, TSV, JSONL or Parquet).",
    )
    fit.add_argument("labels", help="label table with a header")
    fit.add_argument("--format", required=True, choices=sorted(FORMATS))
    fit.add_argument("--model", default="symmetric", choices=list(NOISE_MODELS))
    fit.add_argument(
        "--shared-truth",
        action="store_true",
        help="an item's labels share one truth (always for binary; scored needs 'item')",
    )
    fit.add_argument("--prior", default="none", help="'beta:A,B' (MAP-EM) or 'none'")
    fit.add_argument("--eta-init", type=float, default=0.9)
    fit.add_argument(
        "--tie-value",
        default="auto",
        help="binary: the label value of a tie, dropped and counted; 'auto' (default): with "
        "three label values, the one spelled 0 or 'tie'; 'none': no ties",
    )
    fit.add_argument("--duplicates", default="error", choices=["error", "first"])
    fit.add_argument("--tol", type=float, default=1e-6, help="relative log-likelihood tolerance")
    fit.add_argument("--max-iter", type=int, default=1000)
    fit.add_argument("--out", required=True, help="RESULT.json to write")
    fit.set_defaults(run=_fit_noise)

    demo = commands.add_parser(
        "demo",
        help="the main job: noise models fitted to PandaLM's three human annotators",
    )
    demo.add_argument("--top", type=int, default=10, help="how many suspect labels to list")
    demo.add_argument("--out", default=None, help="directory for the RESULT.json files")
    demo.set_defaults(run=_demo)
    _add_training_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``re-po`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # DataError is a ValueError
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"re-po: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
