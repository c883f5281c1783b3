"""``re-po diagnose``: a markdown report with PNG figures for one or more fits.

The first path is the fit reported on; further paths are fits of other noise
models (or methods) to the same labels. The report has:

1. the fit: model, method, data size, convergence, **divergences** (a warning
   line whenever there are any), timings;
2. per-annotator reliability with intervals (and R-hat, bulk ESS for NUTS);
3. convergence diagnostics from the draws (ArviZ summary: r_hat, ess_bulk,
   ess_tail), when the fit wrote its InferenceData;
4. PSIS-LOO, and the comparison across the fits given (elpd differences with
   their standard errors);
5. EM against full Bayes (:func:`~repo.diagnostics.compare.compare_em_bayes`) when
   an EM fit and a NUTS/SVI fit of one model are among the paths;
6. posterior predictive checks (agreement rates, label balance);
7. figures: forest plot, posterior of w, trace plots, the scorer's calibration
   curve, EM trajectories.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from repo.diagnostics import plots
from repo.diagnostics.compare import compare_em_bayes
from repo.diagnostics.compat import group
from repo.diagnostics.io import Run, load_run
from repo.diagnostics.summary import (
    ESS_MIN,
    RHAT_MAX,
    compare_models,
    loo,
    predictive_checks,
    summary_table,
)


def _cell(value: object, float_format: str) -> str:
    if isinstance(value, float | np.floating):
        return format(value, float_format) if np.isfinite(value) else str(value)
    return str(value)


def markdown_table(frame: pd.DataFrame, float_format: str = ".4g") -> str:
    """A markdown (pipe) table of ``frame``; floats written with ``float_format``."""
    if not len(frame):
        return "(none)"
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(_cell(v, float_format) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def _num_labels(run: Run) -> int:
    return len(run.result["labels"]) or int(sum(a["n_labels"] for a in run.result["annotators"]))


def _check_same_data(runs: list[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        same = (
            run.result["format"] == first.result["format"]
            and _num_labels(run) == _num_labels(first)
            and [a["id"] for a in run.result["annotators"]]
            == [a["id"] for a in first.result["annotators"]]
        )
        if not same:
            raise ValueError(
                f"{run.source} and {first.source} are not fits to the same labels "
                "(format, label count or annotators differ)"
            )


def _truth_probability(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Scores and posterior truth per unit for the calibration curve, or None."""
    if run.idata is None:
        return None
    constant = group(run.idata, "constant_data")
    observed = group(run.idata, "observed_data")
    logit = constant["logit"].values
    if np.unique(logit).size < 2:
        return None  # a class prior: no per-unit scores to calibrate
    items = run.result.get("items") or []
    if items and "posterior" in items[0]:
        first = list(items[0]["posterior"])[0]
        truth = np.array([item["posterior"][first] for item in items])
        return logit, truth
    w = np.array([label["w"] for label in sorted(run.result["labels"], key=lambda x: x["row"])])
    o = observed["o"].values
    if w.shape != o.shape:
        return None
    return logit, np.where(o == 1, w, 1 - w)


def _convergence_line(result: dict) -> str:
    """How the fit ended: EM's convergence, or a training run's steps and loss."""
    training = result.get("training")
    if training is not None:
        loss = training.get("loss", {})
        return (
            f"- training run: {loss.get('family', '?')} ({loss.get('variant', '?')} variant), "
            f"{training.get('total_steps')} optimizer steps, online EM "
            f"{'on' if training.get('em_enabled') else 'off'}; the trained annotator "
            f"parameters at the final policy's logits: log-likelihood "
            f"{result.get('log_likelihood'):.4f}"
        )
    return (
        f"- EM converged: {result.get('converged')} after {result.get('iterations')} "
        f"iterations; log-likelihood {result.get('log_likelihood'):.4f}"
    )


def diagnose(paths: list[str | Path], out_dir: str | Path, *, ppc_draws: int = 200) -> Path:
    """Write ``report.md`` and figures for the fits at ``paths`` into ``out_dir``."""
    runs = [load_run(p) for p in paths]
    _check_same_data(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = runs[0]
    result = main.result
    annotators = pd.DataFrame(result["annotators"])
    lines = [f"# re-po diagnostics: {main.name}", "", f"Source: `{main.source.name}`", ""]
    divergences = int(result.get("divergences", 0))
    inference = result.get("inference") or {}
    lines += [
        f"- model: **{result['model']}**, method: **{result.get('method', 'em')}**, "
        f"format: {result['format']}",
        f"- annotators: {len(annotators)}, labels: {int(annotators['n_labels'].sum())}",
        _convergence_line(result),
        f"- divergences: {divergences}",
    ]
    lines += [f"- note: {note}" for note in main.notes]
    if divergences:
        lines += [
            "",
            f"> **WARNING: {divergences} divergent transition(s) after warm-up.** The "
            "posterior summaries may be biased; raise target_accept or reparametrise.",
        ]
    if inference.get("seconds"):
        timing = ", ".join(f"{k} {v:.2f} s" for k, v in inference["seconds"].items())
        lines.append(f"- timings: {timing}")
    if inference.get("approximation"):
        lines.append(f"- posterior: {inference['approximation']} approximation")
    lines.append("")

    columns = [
        c for c in ("id", "n_labels", "eta", "mean", "sd", "lo90", "hi90") if c in annotators
    ]
    columns += [c for c in ("r_hat", "ess_bulk") if c in annotators]
    columns += [c for c in annotators if str(c).endswith("_training")]
    lines += ["## Annotator reliability (eta)", "", markdown_table(annotators[columns]), ""]
    if "r_hat" in annotators:
        bad_r = annotators.loc[annotators["r_hat"] > RHAT_MAX, "id"].tolist()
        bad_e = annotators.loc[annotators["ess_bulk"] < ESS_MIN, "id"].tolist()
        lines.append(
            f"- r_hat > {RHAT_MAX}: {bad_r or 'none'}; ess_bulk < {ESS_MIN}: {bad_e or 'none'}"
        )
        lines.append("")

    figures: list[tuple[str, str]] = []
    em_runs = [r for r in runs if r.result.get("method", "em") == "em"]
    bayes_runs = [r for r in runs if r.result.get("method") in ("nuts", "svi")]
    em_frame = None
    pair = next(
        ((e, b) for b in bayes_runs for e in em_runs if e.result["model"] == b.result["model"]),
        None,
    )
    if pair is not None:
        comparison = compare_em_bayes(*pair)
        em_frame = pd.DataFrame(pair[0].result["annotators"])
        lines += [
            f"## EM against {comparison.bayes_method.upper()}",
            "",
            f"EM estimate inside the posterior 90% interval for "
            f"{comparison.share_inside:.1%} of annotators; time EM "
            f"{comparison.seconds['em']:.2f} s, {comparison.bayes_method} "
            f"{comparison.seconds['bayes']:.2f} s.",
            "",
            markdown_table(comparison.table),
            "",
        ]
    if "eta_lo90" in annotators:
        reference = em_frame if main.result.get("method") != "em" else None
        title = f"eta_k: {result.get('method', 'em')} 90% interval" + (
            " with EM estimate" if reference is not None else ""
        )
        path = plots.save(plots.plot_forest(annotators, reference, title), out / "forest.png")
        figures.append(("Forest plot of eta_k", path.name))
    labels = pd.DataFrame(result["labels"])
    if "w" in labels and len(labels):
        figures.append(("Posterior of w", plots.save(plots.plot_w(labels), out / "w.png").name))

    if main.idata is not None:
        lines += ["## Convergence diagnostics (ArviZ)", ""]
        table = summary_table(main.idata).reset_index(names="parameter")
        lines += [markdown_table(table.head(60)), ""]
        if group(main.idata, "posterior").sizes["chain"] > 1:
            top = annotators.sort_values("n_labels").id.astype(str).tolist()
            chosen = list(dict.fromkeys([top[0], top[len(top) // 2], top[-1]]))
            path = plots.save(plots.plot_trace(main.idata, chosen), out / "trace.png")
            figures.append(("Trace plots (fewest, median and most labels)", path.name))
        if group(main.idata, "log_likelihood") is not None:
            elpd = loo(main.idata)
            k = np.asarray(elpd.pareto_k)
            lines += [
                "## PSIS-LOO",
                "",
                f"elpd_loo {elpd.elpd_loo:.2f} (SE {elpd.se:.2f}), p_loo {elpd.p_loo:.2f}; "
                f"Pareto k > 0.7 for {int((k > 0.7).sum())} of {k.size} units",
                "",
            ]
        checks = predictive_checks(main.idata, num_draws=ppc_draws)
        extreme = checks[(checks.p_value < 0.05) | (checks.p_value > 0.95)]
        lines += [
            "## Posterior predictive checks",
            "",
            "Agreement rate (with the score's sign, or the item's other labels) and label "
            "balance (share saying A); p = P(T(o_rep) >= T(o)).",
            "",
            markdown_table(checks[checks.annotator == "all"]),
            "",
            f"Annotators with p < 0.05 or > 0.95: {len(extreme)}",
            "",
        ]
        if len(extreme):
            lines += [markdown_table(extreme.head(30)), ""]
        calibration = _truth_probability(main)
        if calibration is not None:
            curve = plots.calibration_curve(*calibration)
            path = plots.save(plots.plot_calibration(curve), out / "calibration.png")
            figures.append(("Scorer calibration", path.name))
    else:
        lines += [
            "_No InferenceData with this fit (write it with `--idata`): no draws-based "
            "diagnostics, LOO or predictive checks._",
            "",
        ]

    if len(runs) > 1:
        missing = [str(r.source) for r in runs if r.idata is None]
        if missing:
            raise ValueError(f"model comparison needs the InferenceData of every fit: {missing}")
        table = compare_models({r.name: r.idata for r in runs})
        lines += [
            "## Model comparison (PSIS-LOO)",
            "",
            markdown_table(table.reset_index(names="model")),
            "",
        ]

    trajectory = (
        main.trajectory
        if main.trajectory is not None
        else next((r.trajectory for r in runs if r.trajectory is not None), None)
    )
    if trajectory is not None and len(trajectory):
        path = plots.save(plots.plot_trajectories(trajectory), out / "trajectories.png")
        figures.append(("EM trajectories of eta_k", path.name))
    if figures:
        lines += ["## Figures", ""]
        for caption, name in figures:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
