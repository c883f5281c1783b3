"""Posterior diagnostics: warnings, ArviZ conversion, summaries, model comparison, plots,
reports.

:func:`diagnose` (the report, which draws with matplotlib) is imported on first use,
so that a fit, which records its warnings through :mod:`repo.diagnostics.checks`,
does not load matplotlib.
"""

from repo.diagnostics.checks import FitWarning, fit_warnings
from repo.diagnostics.compare import EMBayesComparison, compare_em_bayes
from repo.diagnostics.inference_data import to_inference_data
from repo.diagnostics.io import Run, load_run
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


def __getattr__(name: str):
    if name == "diagnose":
        from repo.diagnostics.report import diagnose

        return diagnose
    raise AttributeError(f"module 'repo.diagnostics' has no attribute {name!r}")
