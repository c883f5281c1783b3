"""The ``re-po`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from repo.data.labels import FORMATS
from repo.noise import NOISE_MODELS


def _chain_processes(value: str) -> int | str:
    """``--chain-processes``: ``auto`` or a positive count."""
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count >= 1, got {value!r}")
    return count


def _bayes_settings(args: argparse.Namespace):
    from repo.inference.bayes import BayesSettings

    return BayesSettings(
        num_chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        seed=args.seed,
        jit_compile=not args.no_jit,
        target_accept=args.target_accept,
        svi_steps=args.svi_steps,
        chain_processes=args.chain_processes,
        max_enumeration_draws=args.loo_draws,
    )


def _write_side_files(fit, args: argparse.Namespace, base: Path) -> None:
    """Write --idata / --trajectory and record them (relative to ``base``) in the fit."""
    for option, key in (("idata", "inference_data"), ("trajectory", "trajectory")):
        target = getattr(args, option)
        if target is None:
            continue
        target = Path(target).resolve()
        if option == "idata":
            from repo.diagnostics.io import write_inference_data

            write_inference_data(fit.to_inference_data(), target)
        else:
            from repo.diagnostics.io import write_trajectory

            write_trajectory(fit.trajectory, target)
        fit.files[key] = os.path.relpath(target, base)


def _fit_noise(args: argparse.Namespace) -> int:
    import warnings

    from repo.data.errors import describe_skipped
    from repo.diagnostics.checks import FitCheckWarning
    from repo.fit import fit_noise

    out = Path(args.out)
    single_file = out.suffix.lower() == ".json"
    with warnings.catch_warnings():  # printed below as [re-po] lines instead
        warnings.simplefilter("ignore", FitCheckWarning)
        fit = fit_noise(
            args.labels,
            format=args.format,
            model=args.model,
            shared_truth=True if args.shared_truth else None,
            prior=args.prior,
            eta_init=args.eta_init,
            tie_value=None if args.tie_value.lower() == "none" else args.tie_value,
            duplicates=args.duplicates,
            on_invalid=args.on_invalid,
            tol=args.tol,
            max_iter=args.max_iter,
            progress=True,
            method=args.method,
            bayes=_bayes_settings(args),
        )
    line = describe_skipped(fit.skipped)
    if line:
        print(line, file=sys.stderr)
    _write_side_files(fit, args, (out.parent if single_file else out).resolve())
    if single_file:
        fit.to_json(out)
    else:
        fit.save(out)
    _print_warnings(fit.warnings)  # also recorded in the result
    state = "converged" if fit.converged else "NOT converged"
    em = (
        "MAP-EM (posterior mode under the prior)"
        if fit.estimate == "map"
        else ("EM (maximum likelihood)")
    )
    ran = {
        "em": f"{em}, Laplace intervals",
        "map": f"{em}, Laplace intervals at the mode",
        "nuts": f"NUTS, started at {em}",
        "svi": f"SVI (mean-field Normal), started at {em}",
    }[args.method]
    print(
        f"[re-po] {fit.model} on {len(fit.annotators)} annotators: ran {ran}; EM {state} after "
        f"{fit.iterations} iterations, log-likelihood {fit.log_likelihood:.4f}; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


def _print_warnings(warnings: list) -> None:
    """Each failed check of a fit or run on stderr, one ``[re-po] WARNING:`` line each."""
    for warning in warnings:
        print(f"[re-po] WARNING: {warning}", file=sys.stderr)


def _diagnose(args: argparse.Namespace) -> int:
    from repo.diagnostics.report import diagnose

    report = diagnose(args.results, args.out, ppc_draws=args.ppc_draws)
    print(f"[re-po] wrote {report}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from repo.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    changes = {
        name: getattr(args, name)
        for name in ("train_pairs", "test_pairs", "epochs", "seed")
        if getattr(args, name) is not None
    }
    run_demo(args.out, dataclasses.replace(settings, **changes), device=args.device)
    return 0


def _train(args: argparse.Namespace) -> int:
    import json

    from repo.data.errors import describe_skipped
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
    if args.dry_run:
        return _dry_run(config)
    trainer = Trainer(config)
    skipped = describe_skipped(trainer.data.skipped)
    if skipped and trainer.is_main:
        print(skipped, file=sys.stderr)
    metrics = trainer.train()
    if trainer.is_main:
        _print_warnings(trainer.warnings)  # also in reliability.json
        print(f"[re-po] {trainer.step} steps; run directory {trainer.output_dir}", file=sys.stderr)
        print(json.dumps(metrics))
    return 0


def _dry_run(config) -> int:
    """``re-po train --dry-run``: the configuration and every data row checked, the data
    summary printed (JSON on stdout, one line per data set on stderr); no model loads."""
    import json

    from repo.data.errors import describe_skipped
    from repo.train.build import dry_run

    summary = dry_run(config)
    for name in ("train", "eval"):
        part = summary[name]
        if part is None:
            continue
        print(
            f"[re-po] {name}: {part['pairs']} pairs, {part['items']} items, "
            f"{part['annotators']} annotators",
            file=sys.stderr,
        )
        skipped = describe_skipped(part["skipped"])
        if skipped:
            print(skipped.replace("[re-po]", f"[re-po] {name}:", 1), file=sys.stderr)
    print("[re-po] dry run: the configuration and every data row are valid", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from repo.train.evaluate import evaluate_run

    result = evaluate_run(
        args.run_dir, args.data, batch_size=args.batch_size, bins=args.bins, split=args.split
    )
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
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check the configuration and every data row (train and eval), print the data "
        "summary (pairs, items, annotators, skipped rows by reason) and exit; no model loads",
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval",
        help="preference accuracy, margins and calibration of a trained run on labelled pairs",
    )
    evaluate.add_argument("run_dir", help="a finished run directory")
    evaluate.add_argument(
        "--data",
        required=True,
        help="labelled pairs (the run's data format): a file, a data set folder or a Hugging "
        "Face data set name",
    )
    evaluate.add_argument(
        "--split",
        default=None,
        help="the split of a data set read by name (default: the run's [data] eval_split)",
    )
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
    fit.add_argument(
        "--prior",
        default="none",
        help="'beta:A,B' on the reliability probabilities (EM then estimates the posterior "
        "mode, MAP-EM) or 'none' (maximum-likelihood EM unless --method map)",
    )
    fit.add_argument("--eta-init", type=float, default=0.9)
    fit.add_argument(
        "--tie-value",
        default="auto",
        help="binary: the label value of a tie, dropped and counted; 'auto' (default): with "
        "three label values, the one spelled 0 or 'tie'; 'none': no ties",
    )
    fit.add_argument(
        "--duplicates",
        default="error",
        choices=["error", "first"],
        help="a second label of one (annotator, item): an error naming both rows, or keep "
        "the first",
    )
    fit.add_argument(
        "--on-invalid",
        default="error",
        choices=["error", "skip"],
        help="a malformed row (missing id or label, winner == loser): an error naming the row "
        "and field, or skip it (counted by reason in the result and on one stderr line)",
    )
    fit.add_argument("--tol", type=float, default=1e-6, help="relative log-likelihood tolerance")
    fit.add_argument("--max-iter", type=int, default=1000)
    fit.add_argument(
        "--out",
        required=True,
        help="the result directory (fit.json, labels.parquet, items.parquet: NoiseFit.save); "
        "a path ending in .json writes the whole fit as one JSON document instead (small fits)",
    )
    bayes = fit.add_argument_group("posterior (after EM; the scorer is held at its EM fit)")
    bayes.add_argument(
        "--method",
        default="em",
        choices=["em", "map", "nuts", "svi"],
        help="em: Laplace at the EM estimate; map: MAP-EM under the model's priors + "
        "Laplace at the mode; nuts: NUTS; svi: AutoNormal",
    )
    bayes.add_argument("--chains", type=int, default=4, help="NUTS chains")
    bayes.add_argument("--warmup", type=int, default=500, help="NUTS warm-up steps per chain")
    bayes.add_argument("--draws", type=int, default=500, help="NUTS draws per chain")
    bayes.add_argument(
        "--chain-processes",
        type=_chain_processes,
        default="auto",
        help="processes the NUTS chains are split over, each batch of chains run at once "
        "on one thread (auto: as many as there are cores, at most --chains; 1: all in this "
        "process); the draws do not depend on it",
    )
    bayes.add_argument("--seed", type=int, default=0)
    bayes.add_argument(
        "--no-jit",
        action="store_true",
        help="NUTS without jit_compile: the model's potential and autograd chain by chain "
        "rather than one compiled graph for a batch of chains (slower; for a potential "
        "that cannot be traced)",
    )
    bayes.add_argument("--target-accept", type=float, default=0.8)
    bayes.add_argument("--svi-steps", type=int, default=3000, help="SVI/MAP optimisation steps")
    bayes.add_argument("--idata", default=None, help="also write the ArviZ InferenceData (.nc)")
    bayes.add_argument(
        "--loo-draws",
        type=int,
        default=None,
        help="draws whose pointwise log-likelihood (per item under shared truth, else per "
        "label) is kept for PSIS-LOO; default: all, up to 50M values in all",
    )
    bayes.add_argument("--trajectory", default=None, help="also write EM's eta trajectory (.jsonl)")
    fit.set_defaults(run=_fit_noise)

    diagnose = commands.add_parser(
        "diagnose",
        help="one report (markdown + PNG) on one or more fits: warnings, diagnostics, LOO, "
        "predictive checks",
        description="Diagnose one or more fits to the same labels (RESULT.json files or run "
        "directories) in one report: every fit's warnings first, the fits side by side, "
        "PSIS-LOO ranking the NUTS fits (EM/MAP/SVI approximations in their own, unranked "
        "table), EM against NUTS/SVI for each model fitted both ways, then each fit's "
        "diagnostics and figures.",
    )
    diagnose.add_argument("results", nargs="+", metavar="RUN_DIR_OR_RESULT")
    diagnose.add_argument("--out", required=True, help="directory for report.md and figures")
    diagnose.add_argument("--ppc-draws", type=int, default=200, help="draws for predictive checks")
    diagnose.set_defaults(run=_diagnose)

    demo = commands.add_parser(
        "demo",
        help="the main job: DPO against RE-DPO on HH-RLHF pairs with simulated noisy annotators",
        description="Simulate an annotator pool (reliable, adversarial, spammer) over real "
        "HH-RLHF pairs shipped with re-po, train DPO and RE-DPO from the same start "
        "(SmolLM2-135M-Instruct with LoRA; the tiny test model with --quick), and report "
        "held-out accuracy, eta recovery, flagged-label precision/recall and the "
        "diagnostics of the RE-DPO run. Uses a GPU when there is one.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument(
        "--quick", action="store_true", help="the tiny test model and fewer pairs (under a minute)"
    )
    demo.add_argument("--device", default="auto", help="'auto' (CUDA, MPS, CPU) or a device")
    demo.add_argument("--train-pairs", type=int, default=None, help="training pairs")
    demo.add_argument("--test-pairs", type=int, default=None, help="held-out pairs")
    demo.add_argument("--epochs", type=int, default=None, help="passes over the training pairs")
    demo.add_argument("--seed", type=int, default=None, help="seed (default 0)")
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


def console() -> NoReturn:
    """The ``re-po`` console script and ``python -m repo.cli``: :func:`main`, then
    :func:`repo.train.launch.exit_process` with its status, which closes the process
    group a launcher (torchrun, ``accelerate launch``) had opened and, in a
    multi-process run, leaves without interpreter finalization, where gloo's threads
    can abort a finished run (the launcher would report a failure of a complete run
    directory). :func:`main` itself leaves the group open, for callers that go on using
    it."""
    from repo.train.launch import exit_process

    exit_process(main())


if __name__ == "__main__":
    console()
