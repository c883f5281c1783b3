"""EM against full Bayes, annotator by annotator.

:func:`compare_em_bayes` lines up an EM fit (estimate and Laplace 90% interval)
and a Bayesian fit (NUTS or SVI: posterior mean and 90% interval) of the same
model on the same data, says for each annotator whether the EM estimate falls
inside the posterior interval, and reports both methods' wall-clock times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from repo.diagnostics.io import Run


@dataclass
class EMBayesComparison:
    """The per-annotator table, the share of EM estimates inside the posterior
    interval, and timings in seconds (``em``, ``bayes``)."""

    table: pd.DataFrame
    share_inside: float
    seconds: dict[str, float]
    bayes_method: str


def _parts(fit: Any) -> tuple[pd.DataFrame, dict, str, str]:
    """Annotators frame, inference facts, method and model of a NoiseFit, a
    RESULT.json document or a :class:`Run`."""
    if isinstance(fit, Run):
        fit = fit.result
    if isinstance(fit, dict):
        frame = pd.DataFrame(fit["annotators"])
        return frame, fit.get("inference") or {}, fit.get("method", "em"), fit["model"]
    return fit.annotators, fit.inference, fit.method, fit.model


def _seconds(inference: dict, method: str) -> float:
    if method == "em":
        return float(inference.get("em_seconds", float("nan")))
    seconds = inference.get("seconds", {})
    return float(seconds.get("total", float("nan")))


def compare_em_bayes(em: Any, bayes: Any) -> EMBayesComparison:
    """Compare an EM fit with a NUTS/SVI fit of the same model and data.

    :param em: NoiseFit, RESULT.json document or Run with ``method`` ``"em"``.
    :param bayes: the same for ``"nuts"`` or ``"svi"``.
    :returns: a table with columns ``id``, ``n_labels``, ``em_eta``, ``em_lo90``,
        ``em_hi90`` (Laplace), ``bayes_mean``, ``bayes_sd``, ``bayes_lo90``,
        ``bayes_hi90``, ``em_inside`` (EM estimate within the posterior interval)
        and, for NUTS, ``r_hat``, ``ess_bulk``.
    """
    em_frame, em_info, em_method, em_model = _parts(em)
    by_frame, by_info, by_method, by_model = _parts(bayes)
    if em_method != "em":
        raise ValueError(f"the first fit must be an EM fit, got method {em_method!r}")
    if by_method not in ("nuts", "svi"):
        raise ValueError(f"the second fit must be a NUTS or SVI fit, got {by_method!r}")
    if em_model != by_model:
        raise ValueError(f"different noise models: {em_model!r} and {by_model!r}")
    if list(map(str, em_frame["id"])) != list(map(str, by_frame["id"])):
        raise ValueError("the two fits have different annotators")
    table = pd.DataFrame(
        {
            "id": em_frame["id"].astype(str),
            "n_labels": em_frame["n_labels"],
            "em_eta": em_frame["eta"],
            "em_lo90": em_frame.get("eta_lo90"),
            "em_hi90": em_frame.get("eta_hi90"),
            "bayes_mean": by_frame["eta_mean"],
            "bayes_sd": by_frame["eta_sd"],
            "bayes_lo90": by_frame["eta_lo90"],
            "bayes_hi90": by_frame["eta_hi90"],
        }
    )
    table["em_inside"] = (table["em_eta"] >= table["bayes_lo90"]) & (
        table["em_eta"] <= table["bayes_hi90"]
    )
    for column in ("r_hat", "ess_bulk"):
        if f"eta_{column}" in by_frame:
            table[column] = by_frame[f"eta_{column}"].to_numpy()
    seconds = {"em": _seconds(em_info, "em"), "bayes": _seconds(by_info, by_method)}
    return EMBayesComparison(table, float(table["em_inside"].mean()), seconds, by_method)
