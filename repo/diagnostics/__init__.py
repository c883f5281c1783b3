"""Posterior diagnostics: warnings, ArviZ conversion, summaries, model comparison, plots,
reports."""

from repo.diagnostics.checks import FitWarning, fit_warnings
from repo.diagnostics.compare import EMBayesComparison, compare_em_bayes
from repo.diagnostics.inference_data import to_inference_data
from repo.diagnostics.io import Run, load_run
from repo.diagnostics.report import diagnose
from repo.diagnostics.summary import compare_models, loo, predictive_checks, summary_table

__all__ = [
    "EMBayesComparison",
    "FitWarning",
    "Run",
    "compare_em_bayes",
    "compare_models",
    "diagnose",
    "fit_warnings",
    "load_run",
    "loo",
    "predictive_checks",
    "summary_table",
    "to_inference_data",
]
