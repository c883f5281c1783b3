"""``re-po diagnose``: one markdown report with PNG figures comparing one or more fits.

Every path is a fit to the same labels (other noise models, or other methods). The
report has, in this order:

1. **warnings** of every fit (:mod:`repo.diagnostics.checks`: R-hat, ESS,
   divergences, tree depth, improper or boundary Laplace fits), each with the
   annotators concerned and a remedy;
2. the fits side by side: model, method, posterior, convergence, timings, and each
   annotator's ``eta`` with its 90% interval under every fit;
3. PSIS-LOO: the **sampled posteriors** (NUTS) ranked by ``elpd_loo`` with the
   standard error of each difference; the **approximations** (EM and MAP Laplace,
   SVI's variational posterior) in their own table, not ranked: their ``elpd_loo``
   and ``p_loo`` describe the approximation as much as the model;
4. EM against full Bayes (:func:`~repo.diagnostics.compare.compare_em_bayes`) for
   each EM fit beside a NUTS/SVI fit of the same model;
5. a section per fit: its facts, reliability table, ArviZ's summary (``r_hat``,
   ``ess_bulk``, ``ess_tail``), PSIS-LOO with Pareto k, posterior predictive checks
   (agreement rate, label balance) and its figures: forest plot, posterior of
   ``w``, trace and rank plots of every annotator (paged, worst R-hat first),
   Pareto k, predictive checks, the scorer's calibration curve, EM trajectories.

A single fit's figures are named ``forest.png``, ``trace.png`` (further pages
``trace-2.png``, ...); with several fits each fit's names start ``fitN-``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from repo.diagnostics import plots
from repo.diagnostics.checks import SAMPLED, FitWarning, run_warnings
from repo.diagnostics.compare import compare_em_bayes
from repo.diagnostics.compat import Loo, group
from repo.diagnostics.io import Run, load_run
from repo.diagnostics.summary import compare_models, loo, predictive_checks, summary_table


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


def _method(run: Run) -> str:
    return run.result.get("method", "em")


def posterior_kind(run: Run) -> str:
    """What the fit's draws are: ``"NUTS draws"``, or the approximation they come from."""
    method = _method(run)
    if method in SAMPLED:
        return "NUTS draws"
    if method == "svi":
        return "SVI (mean-field normal approximation)"
    approximation = (run.result.get("inference") or {}).get("approximation") or "laplace"
    if approximation != "laplace":
        return str(approximation)
    if run.result.get("training"):
        return "Laplace approximation at the trained estimate"
    if method == "map":
        return "Laplace approximation at the MAP mode"
    return "Laplace approximation at the EM estimate"


class _Names:
    """Distinct display names and figure-file prefixes of the fits."""

    def __init__(self, runs: list[Run]) -> None:
        names = [run.name for run in runs]
        self.names = [
            name if names.count(name) == 1 else f"{name} #{i + 1}" for i, name in enumerate(names)
        ]
        self.prefixes = [""] if len(runs) == 1 else [f"fit{i + 1}-" for i in range(len(runs))]


def _warning_lines(names: list[str], warnings: list[list[FitWarning]]) -> list[str]:
    lines = ["## Warnings", ""]
    if not any(warnings):
        return [*lines, "No warnings: every check passed for every fit.", ""]
    for name, found in zip(names, warnings, strict=True):
        if not found:
            lines.append(f"- **{name}**: none")
            continue
        for warning in found:
            lines.append(
                f"- **{name}** · `{warning.check}`: {warning.message}. *Remedy:* {warning.remedy}."
            )
    return [*lines, ""]


def _seconds(result: dict) -> float:
    inference = result.get("inference") or {}
    total = (inference.get("seconds") or {}).get("total", 0.0)
    return float(total) + float(inference.get("em_seconds", 0.0))


def _fits_table(runs: list[Run], names: list[str], warnings: list[list[FitWarning]]) -> str:
    rows = []
    for run, name, found in zip(runs, names, warnings, strict=True):
        frame = pd.DataFrame(run.result["annotators"])
        rows.append(
            {
                "fit": name,
                "source": run.source.name,
                "posterior": posterior_kind(run),
                "divergences": int(run.result.get("divergences", 0)),
                "max r_hat": f"{frame['r_hat'].max():.4g}" if "r_hat" in frame else "-",
                "min ess_bulk": f"{frame['ess_bulk'].min():.0f}" if "ess_bulk" in frame else "-",
                "seconds": _seconds(run.result),
                "warnings": ", ".join(w.check for w in found) or "none",
            }
        )
    return markdown_table(pd.DataFrame(rows))


def _interval(row: pd.Series) -> str:
    if "eta_lo90" not in row or pd.isna(row.get("eta_lo90")):
        return f"{row['eta']:.3f}"
    return f"{row['eta']:.3f} [{row['eta_lo90']:.3f}, {row['eta_hi90']:.3f}]"


def _reliability_across(runs: list[Run], names: list[str]) -> str:
    first = pd.DataFrame(runs[0].result["annotators"])
    table = pd.DataFrame({"id": first["id"].astype(str), "n_labels": first["n_labels"]})
    for run, name in zip(runs, names, strict=True):
        frame = pd.DataFrame(run.result["annotators"])
        table[name] = [_interval(row) for _, row in frame.iterrows()]
    return markdown_table(table)


def _has_log_likelihood(run: Run) -> bool:
    return run.idata is not None and group(run.idata, "log_likelihood") is not None


def _loo_sections(runs: list[Run], names: list[str], elpds: dict[int, Loo]) -> list[str]:
    """Ranked PSIS-LOO of the sampled posteriors; the approximations' own table."""
    lines = ["## Model comparison (PSIS-LOO)", ""]
    with_ll = [(run, name) for run, name in zip(runs, names, strict=True) if id(run) in elpds]
    missing = [name for run, name in zip(runs, names, strict=True) if run.idata is None]
    if missing:
        lines += [
            f"_Without InferenceData (write it with `--idata`), not scored: {', '.join(missing)}._",
            "",
        ]
    sampled = [(run, name) for run, name in with_ll if _method(run) in SAMPLED]
    approximate = [(run, name) for run, name in with_ll if _method(run) not in SAMPLED]
    lines += ["### Sampled posteriors (ranked)", ""]
    if len(sampled) >= 2:
        try:
            table = compare_models({name: run.idata for run, name in sampled})
        except ValueError as error:
            lines += [f"_Not ranked: {error}._", ""]
        else:
            lines += [
                "Ranked by elpd_loo; elpd_diff is the best fit's elpd_loo minus this one's, "
                "dse its standard error (a difference under about 2 dse is not a preference).",
                "",
                markdown_table(table.reset_index(names="fit")),
                "",
            ]
    elif sampled:
        lines += [f"Only one sampled posterior ({sampled[0][1]}): nothing to rank.", ""]
    else:
        lines += ["No sampled posterior (NUTS) among the fits: nothing is ranked.", ""]
    if approximate:
        rows = []
        for run, name in approximate:
            elpd = elpds[id(run)]
            rows.append(
                {
                    "fit": name,
                    "posterior": posterior_kind(run),
                    "elpd_loo": elpd.elpd_loo,
                    "se": elpd.se,
                    "p_loo": elpd.p_loo,
                    "units with Pareto k > limit": int((elpd.pareto_k > elpd.good_k).sum()),
                    "k limit": elpd.good_k,
                }
            )
        lines += [
            "### Approximate posteriors (not ranked)",
            "",
            "PSIS-LOO on draws from an approximation (Laplace at a point estimate, SVI's "
            "variational family) scores the approximation, not the model: a flat or "
            "improper direction inflates p_loo, and these rows are not models to rank "
            "against the sampled posteriors above.",
            "",
            markdown_table(pd.DataFrame(rows)),
            "",
        ]
    return lines


def _em_bayes_sections(runs: list[Run], names: list[str]) -> tuple[list[str], dict[int, int]]:
    """EM against NUTS/SVI for every pair of one model; the EM fit paired with each
    Bayesian fit (by position)."""
    lines: list[str] = []
    pairs: dict[int, int] = {}
    for b, bayes in enumerate(runs):
        if _method(bayes) not in ("nuts", "svi"):
            continue
        for e, em in enumerate(runs):
            if _method(em) != "em" or em.result["model"] != bayes.result["model"]:
                continue
            comparison = compare_em_bayes(em, bayes)
            pairs.setdefault(b, e)
            lines += [
                f"## EM against {comparison.bayes_method.upper()}: {names[e]} and {names[b]}",
                "",
                f"EM estimate inside the posterior 90% interval for "
                f"{comparison.share_inside:.1%} of annotators; time EM "
                f"{comparison.seconds['em']:.2f} s, {comparison.bayes_method} "
                f"{comparison.seconds['bayes']:.2f} s.",
                "",
                markdown_table(comparison.table),
                "",
            ]
    return lines, pairs


def _order(annotators: pd.DataFrame) -> list[str]:
    """Annotator ids, worst R-hat first (NUTS), else most labels first."""
    if "r_hat" in annotators:
        key = annotators["r_hat"].fillna(np.inf)
        return annotators.assign(key=key).sort_values("key", ascending=False)["id"].tolist()
    return annotators.sort_values("n_labels", ascending=False)["id"].tolist()


def _flagged(warnings: list[FitWarning], num_annotators: int) -> set[str]:
    """Annotators named by a warning, except by an improper Laplace approximation
    that couples every annotator (no one annotator is to blame there)."""
    return {
        a
        for w in warnings
        if not (w.check == "laplace" and len(w.annotators) == num_annotators > 1)
        for a in w.annotators
    }


def extreme_annotators(checks: pd.DataFrame) -> pd.DataFrame:
    """The annotators' rows of :func:`~repo.diagnostics.summary.predictive_checks` whose
    posterior predictive p-value is below 0.05 or above 0.95, without the ``pooled``
    column. The pooled rows (every label at once, the report's table above the count)
    are not annotators: with one annotator they repeat its own rows."""
    per = checks[~checks.pooled].drop(columns="pooled")
    return per[(per.p_value < 0.05) | (per.p_value > 0.95)]


def _paged(out: Path, stem: str, count: int) -> list[Path]:  # trace.png, trace-2.png, ...
    return [out / (f"{stem}.png" if i == 0 else f"{stem}-{i + 1}.png") for i in range(count)]


def _fit_section(
    run: Run,
    name: str,
    prefix: str,
    out: Path,
    reference: pd.DataFrame | None,
    ppc_draws: int,
    elpd: Loo | None,
    warnings: list[FitWarning],
) -> list[str]:
    result = run.result
    annotators = pd.DataFrame(result["annotators"])
    annotators["id"] = annotators["id"].astype(str)
    inference = result.get("inference") or {}
    lines = [
        f"## {name}",
        "",
        f"Source: `{run.source.name}`",
        "",
        f"- model: **{result['model']}**, method: **{_method(run)}**, format: {result['format']}",
        f"- posterior: {posterior_kind(run)}",
        f"- annotators: {len(annotators)}, labels: {int(annotators['n_labels'].sum())}",
        _convergence_line(result),
        f"- divergences: {int(result.get('divergences', 0))}",
    ]
    lines += [f"- note: {note}" for note in run.notes]
    if inference.get("seconds"):
        timing = ", ".join(f"{k} {v:.2f} s" for k, v in inference["seconds"].items())
        lines.append(f"- timings: {timing}")
    lines.append("")

    columns = [
        c for c in ("id", "n_labels", "eta", "mean", "sd", "lo90", "hi90") if c in annotators
    ]
    columns += [c for c in ("r_hat", "ess_bulk") if c in annotators]
    columns += [c for c in annotators if str(c).endswith("_training")]
    lines += ["### Annotator reliability (eta)", "", markdown_table(annotators[columns]), ""]

    figures: list[tuple[str, str]] = []
    if "eta_lo90" in annotators:
        flagged = _flagged(warnings, len(annotators))
        ordered = annotators.sort_values("n_labels", ascending=False)
        chunks = plots.pages(range(len(ordered)), plots.FOREST_PAGE)
        for page, path in zip(chunks, _paged(out, f"{prefix}forest", len(chunks)), strict=True):
            title = f"{name}: eta_k, 90% interval" + (
                " with the EM estimate" if reference is not None else ""
            )
            if len(chunks) > 1:
                title += f" (page {chunks.index(page) + 1} of {len(chunks)})"
            figure = plots.plot_forest(ordered.iloc[page], reference, title, flagged)
            figures.append(
                ("Forest plot of eta_k (most labels first)", plots.save(figure, path).name)
            )
    labels = pd.DataFrame(result["labels"])
    if "w" in labels and len(labels):
        path = plots.save(plots.plot_w(labels), out / f"{prefix}w.png")
        figures.append(("Posterior of w", path.name))

    if run.idata is None:
        lines += [
            "_No InferenceData with this fit (write it with `--idata`): no draws-based "
            "diagnostics, LOO or predictive checks._",
            "",
        ]
    else:
        lines += _draws_sections(run, name, prefix, out, annotators, figures, ppc_draws, elpd)

    trajectory = run.trajectory
    if trajectory is not None and len(trajectory):
        path = plots.save(plots.plot_trajectories(trajectory), out / f"{prefix}trajectories.png")
        figures.append(("EM trajectories of eta_k", path.name))
    if figures:
        lines += [f"### Figures: {name}", ""]
        for caption, file in figures:
            lines += [f"#### {caption}", "", f"![{caption}]({file})", ""]
    return lines


def _draws_sections(
    run: Run,
    name: str,
    prefix: str,
    out: Path,
    annotators: pd.DataFrame,
    figures: list[tuple[str, str]],
    ppc_draws: int,
    elpd: Loo | None,
) -> list[str]:
    idata = run.idata
    posterior = group(idata, "posterior")
    if posterior.sizes["chain"] > 1:
        lines = ["### Convergence diagnostics (ArviZ)", ""]
    else:
        lines = [
            "### Posterior summary (ArviZ)",
            "",
            "One sequence of independent draws from the approximation: nothing to converge, "
            "no R-hat or ESS.",
            "",
        ]
    table = summary_table(idata).reset_index(names="parameter")
    lines += [markdown_table(table.head(60)), ""]
    if len(table) > 60:
        lines += [f"(first 60 of {len(table)} parameters)", ""]
    if posterior.sizes["chain"] > 1 and "eta" in posterior:
        order = _order(annotators)
        chunks = plots.pages(order, plots.TRACE_PAGE)
        for i, (page, path) in enumerate(
            zip(chunks, _paged(out, f"{prefix}trace", len(chunks)), strict=True)
        ):
            title = f"{name}: eta_k" + (
                f" (page {i + 1} of {len(chunks)})" if len(chunks) > 1 else ""
            )
            plots.save(plots.plot_trace(idata, page, title), path)
            figures.append(
                (f"Trace plots, page {i + 1} of {len(chunks)} (worst R-hat first)", path.name)
            )
        eta = posterior["eta"].transpose("chain", "draw", "annotator")
        ids = [str(a) for a in eta["annotator"].values]
        values = eta.values
        r_hat = annotators.set_index("id")["r_hat"] if "r_hat" in annotators else None
        chunks = plots.pages(order, plots.RANK_PAGE)
        for i, (page, path) in enumerate(
            zip(chunks, _paged(out, f"{prefix}rank", len(chunks)), strict=True)
        ):
            columns = [ids.index(a) for a in page]
            stats = None if r_hat is None else {"r_hat": r_hat.reindex(page).tolist()}
            title = f"{name}: rank plots of eta_k (flat = chains agree)" + (
                f", page {i + 1} of {len(chunks)}" if len(chunks) > 1 else ""
            )
            figure = plots.plot_rank(values[:, :, columns], page, stats, title=title)
            plots.save(figure, path)
            figures.append(
                (f"Rank plots, page {i + 1} of {len(chunks)} (worst R-hat first)", path.name)
            )
    if elpd is not None:
        k = np.asarray(elpd.pareto_k)
        unit = "item" if "o_item" in group(idata, "log_likelihood") else "label"
        lines += [
            "### PSIS-LOO",
            "",
            f"elpd_loo {elpd.elpd_loo:.2f} (SE {elpd.se:.2f}), p_loo {elpd.p_loo:.2f}; "
            f"Pareto k > {elpd.good_k:.2f} for {int((k > elpd.good_k).sum())} of {k.size} "
            f"{unit}s",
            "",
        ]
        path = plots.save(
            plots.plot_pareto_k(k, elpd.good_k, unit, title=f"{name}: PSIS-LOO Pareto k "
                                f"({int((k > elpd.good_k).sum())} of {k.size} {unit}s above "
                                f"{elpd.good_k:.2f})"),
            out / f"{prefix}pareto_k.png",
        )  # fmt: skip
        figures.append(("PSIS-LOO Pareto k", path.name))
    checks = predictive_checks(idata, num_draws=ppc_draws)
    shown = checks.drop(columns="pooled")
    extreme = extreme_annotators(checks)
    lines += [
        "### Posterior predictive checks",
        "",
        "Agreement rate (with the score's sign, or the item's other labels) and label "
        "balance (share saying A); p = P(T(o_rep) >= T(o)).",
        "",
        markdown_table(shown[checks.pooled]),
        "",
        f"Annotators with p < 0.05 or > 0.95: {len(extreme)}",
        "",
    ]
    if len(extreme):
        lines += [markdown_table(extreme.head(30)), ""]
    figure = plots.plot_predictive(checks, title=f"{name}: posterior predictive checks")
    path = plots.save(figure, out / f"{prefix}predictive.png")
    figures.append(("Posterior predictive checks", path.name))
    calibration = _truth_probability(run)
    if calibration is not None:
        curve = plots.calibration_curve(*calibration)
        path = plots.save(plots.plot_calibration(curve), out / f"{prefix}calibration.png")
        figures.append(("Scorer calibration", path.name))
    return lines


def diagnose(paths: list[str | Path], out_dir: str | Path, *, ppc_draws: int = 200) -> Path:
    """Write ``report.md`` and figures for the fits at ``paths`` into ``out_dir``
    (see the module docstring); returns the report's path."""
    runs = [load_run(p) for p in paths]
    _check_same_data(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _Names(runs)
    warnings = [run_warnings(run.result, run.idata) for run in runs]
    title = names.names[0] if len(runs) == 1 else f"{len(runs)} fits to the same labels"
    lines = [f"# re-po diagnostics: {title}", ""]
    lines += _warning_lines(names.names, warnings)
    lines += ["## Fits", "", _fits_table(runs, names.names, warnings), ""]
    if len(runs) > 1:
        lines += [
            "## eta_k under each fit",
            "",
            "Point summary and 90% interval (posterior mean for NUTS and SVI, the estimate "
            "for EM and MAP).",
            "",
            _reliability_across(runs, names.names),
            "",
        ]
        with_intervals = {
            name: pd.DataFrame(run.result["annotators"])
            for run, name in zip(runs, names.names, strict=True)
            if "eta_lo90" in run.result["annotators"][0]
        }
        if len(with_intervals) > 1:
            first = pd.DataFrame(runs[0].result["annotators"])
            ids = first.sort_values("n_labels", ascending=False)["id"].astype(str).tolist()
            chunks = plots.pages(ids, plots.FOREST_PAGE)
            lines += ["Figures:", ""]
            for i, (page, path) in enumerate(
                zip(chunks, _paged(out, "forest-fits", len(chunks)), strict=True)
            ):
                more = f" (page {i + 1} of {len(chunks)})" if len(chunks) > 1 else ""
                figure = plots.plot_forest_fits(with_intervals, page, f"eta_k under each fit{more}")
                plots.save(figure, path)
                lines += [f"![eta_k under each fit{more}]({path.name})", ""]
    elpds = {id(run): loo(run.idata) for run in runs if _has_log_likelihood(run)}
    if len(runs) > 1:
        lines += _loo_sections(runs, names.names, elpds)
    em_lines, pairs = _em_bayes_sections(runs, names.names)
    lines += em_lines
    for i, (run, name, prefix) in enumerate(zip(runs, names.names, names.prefixes, strict=True)):
        reference = None
        if i in pairs:
            reference = pd.DataFrame(runs[pairs[i]].result["annotators"])
            reference["id"] = reference["id"].astype(str)
        elpd = elpds.get(id(run))
        lines += _fit_section(run, name, prefix, out, reference, ppc_draws, elpd, warnings[i])
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
