"""Warnings a statistician expects from a fit, computed from its draws and diagnostics.

Each check returns :class:`FitWarning` records (empty when the fit passes it), each
naming the parameters and annotators concerned and suggesting a remedy:

==================  ========================================================  ==============
check               warns when                                                 methods
==================  ========================================================  ==============
``r_hat``           rank-normalised split R-hat > :data:`RHAT_MAX`             NUTS
``ess_bulk``        bulk effective sample size < :data:`ESS_MIN`               NUTS
``ess_tail``        tail effective sample size (5% and 95% quantiles)          NUTS
                    < :data:`ESS_MIN`
``divergences``     any divergent transition after warm-up                     NUTS
``tree_depth``      a draw's trajectory stopped at ``max_tree_depth``          NUTS
``laplace``         the Laplace approximation is improper: the observed        EM, MAP
                    information has (almost) no curvature in some direction
                    (:data:`repo.inference.laplace.MIN_CURVATURE`)
``boundary``        an estimate on the boundary of the parameter space         EM, MAP
                    (``eta`` within :data:`BOUNDARY_DISTANCE` of 0 or 1) or
                    a 90% interval of no width (< :data:`MIN_INTERVAL_WIDTH`)
``optimisation``    SVI's ELBO (or MAP's objective) still moving when the      SVI, MAP
                    step limit stopped it
``identification``  one annotator's ``eta`` is poorly identified: its 95%      training
                    profile-likelihood interval is wider than                  (K = 1)
                    :data:`IDENTIFICATION_WIDTH`, or the learned ``eta``
                    lies outside it (:func:`identification_warnings`)
==================  ========================================================  ==============

The thresholds are those of Vehtari, Gelman, Simpson, Carpenter and Bürkner
(2021), "Rank-normalization, folding, and localization: an improved R-hat for
assessing convergence of MCMC", and Stan's defaults for divergences and tree depth.

:func:`fit_warnings` runs every check on a fitted :class:`~repo.fit.NoiseFit` (it is
called where fits are made, and the result keeps the list; :func:`~repo.fit.fit_noise`
also issues them as Python warnings, :func:`emit`); :func:`run_warnings`
does the same for a saved result that has none recorded (an older RESULT.json).
The checks themselves take plain inputs: :func:`convergence_warnings` an ArviZ
posterior (an :class:`xarray.Dataset` of ``(chain, draw, ...)`` draws, dims named
after plates), :func:`sampler_warnings` the sampler's per-draw statistics, and
:func:`laplace_warnings` the per-annotator summary table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

RHAT_MAX = 1.01
"""R-hat above this: the chains have not mixed (Vehtari et al., 2021)."""

ESS_MIN = 400
"""Bulk or tail ESS below this (100 per chain for four chains): too few effective
draws for the reported intervals and R-hat to be trusted (Vehtari et al., 2021)."""

BOUNDARY_DISTANCE = 1e-3
"""An ``eta`` estimate within this of 0 or 1 sits on the boundary: its Laplace
interval is not an interval (the likelihood is still rising at the edge)."""

MIN_INTERVAL_WIDTH = 1e-6
"""A 90% interval narrower than this is degenerate (every draw the same)."""

MAX_NAMED = 10
"""At most this many parameters or annotators are named in a warning's message."""

IDENTIFICATION_WIDTH = 0.1
"""A 95% profile-likelihood interval of one annotator's ``eta`` wider than this: the
labels fix ``eta`` only to within several hundredths either way (``docs/math.md``
section 9), so a point estimate alone misleads."""

CHECKS = (
    "r_hat", "ess_bulk", "ess_tail", "divergences", "tree_depth", "laplace", "boundary",
    "optimisation", "identification",
)  # fmt: skip
"""The checks, in the order warnings are listed."""

SAMPLED = ("nuts",)
"""Methods whose draws come from Markov chains (the convergence checks apply)."""

LAPLACE = ("em", "map")
"""Methods whose posterior is a Laplace approximation at a point estimate."""


class FitCheckWarning(UserWarning):
    """A fit failed one of the checks (:func:`emit` raises one per :class:`FitWarning`)."""


@dataclass(frozen=True)
class FitWarning:
    """One failed check of a fit.

    :param check: which check (one of :data:`CHECKS`).
    :param message: what is wrong, with the worst value and the names concerned.
    :param remedy: what to try.
    :param annotators: the annotators concerned (ids), when the check is per annotator.
    :param parameters: the parameters concerned (``eta[ann3]``, ``mu``, ...).
    :param value: the worst value (largest R-hat, smallest ESS, number of
        divergences or of draws at the maximal tree depth, ...).
    """

    check: str
    message: str
    remedy: str
    annotators: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    value: float | None = None

    def __str__(self) -> str:
        return f"{self.message}. Remedy: {self.remedy}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists; a non-finite value as its string)."""
        record = asdict(self)
        record["annotators"] = list(self.annotators)
        record["parameters"] = list(self.parameters)
        if self.value is not None and not math.isfinite(self.value):
            record["value"] = str(self.value)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> FitWarning:
        """Read what :meth:`to_dict` wrote."""
        missing = [k for k in ("check", "message", "remedy") if k not in record]
        if missing:
            raise ValueError(f"a fit warning without {', '.join(missing)}: {dict(record)}")
        value = record.get("value")
        return cls(
            check=str(record["check"]),
            message=str(record["message"]),
            remedy=str(record["remedy"]),
            annotators=tuple(map(str, record.get("annotators", ()))),
            parameters=tuple(map(str, record.get("parameters", ()))),
            value=None if value is None else float(value),
        )


def _named(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    more = len(names) - MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def emit(found: Sequence[FitWarning], stacklevel: int = 3) -> None:
    """Issue each warning as a Python :class:`FitCheckWarning` (shown on stderr once
    per place by default; the CLI silences them and prints its own lines)."""
    for warning in found:
        warnings.warn(f"{warning.check}: {warning}", FitCheckWarning, stacklevel=stacklevel)


def _element_names(array) -> tuple[list[str], list[str | None]]:
    """``name[coord, ...]`` of each element of a ``(chain, draw, ...)`` DataArray, and
    the element's annotator id (None for a parameter not over annotators)."""
    dims = [d for d in array.dims if d not in ("chain", "draw")]
    shape = [array.sizes[d] for d in dims]
    coords = [
        [str(v) for v in array[d].values] if d in array.coords else list(map(str, range(n)))
        for d, n in zip(dims, shape, strict=True)
    ]
    names, annotators = [], []
    for index in np.ndindex(*shape):
        labels = [coords[j][i] for j, i in enumerate(index)]
        names.append(f"{array.name}[{', '.join(labels)}]" if labels else str(array.name))
        annotators.append(labels[dims.index("annotator")] if "annotator" in dims else None)
    return names, annotators


def _threshold_warning(
    check: str,
    values: np.ndarray,
    names: list[str],
    annotators: list[str | None],
    bad: np.ndarray,
    worst: int,
    message: str,
    remedy: str,
) -> FitWarning:
    order = np.argsort(values[bad]) if check != "r_hat" else np.argsort(-values[bad])
    chosen = [names[i] for i in np.flatnonzero(bad)[order]]
    who = [annotators[i] for i in np.flatnonzero(bad)[order] if annotators[i] is not None]
    who = list(dict.fromkeys(who))
    text = f"{message} for {len(chosen)} parameter(s) (worst {values[worst]:.4g}: {names[worst]})"
    if who:
        text += f"; annotators: {_named(who)}"
    return FitWarning(check, text, remedy, tuple(who), tuple(chosen), float(values[worst]))


def convergence_warnings(
    posterior, *, rhat_max: float = RHAT_MAX, ess_min: float = ESS_MIN
) -> list[FitWarning]:
    """R-hat and bulk and tail ESS of every element of every variable of ``posterior``.

    :param posterior: an :class:`xarray.Dataset` of ``(chain, draw, ...)`` draws (the
        ``posterior`` group of ArviZ data); element names use its coordinates, and
        a dim named ``annotator`` names the annotators concerned.
    :returns: up to three warnings (``r_hat``, ``ess_bulk``, ``ess_tail``); none for
        one chain or fewer than four draws.
    """
    from repo.diagnostics.compat import ess_bulk, ess_tail, rhat

    if posterior.sizes.get("chain", 1) < 2 or posterior.sizes.get("draw", 0) < 4:
        return []
    names: list[str] = []
    annotators: list[str | None] = []
    stats: dict[str, list[np.ndarray]] = {"r_hat": [], "ess_bulk": [], "ess_tail": []}
    for variable in posterior.data_vars.values():
        array = variable.transpose("chain", "draw", ...)
        values = np.asarray(array.values, dtype=np.float64)
        element, who = _element_names(array)
        names += element
        annotators += who
        with warnings.catch_warnings():  # a constant chain: 0 / 0, reported below
            warnings.simplefilter("ignore", RuntimeWarning)
            stats["r_hat"].append(np.ravel(rhat(values)))
            stats["ess_bulk"].append(np.ravel(ess_bulk(values)))
            stats["ess_tail"].append(np.ravel(ess_tail(values)))
    out = []
    r = np.concatenate(stats["r_hat"])
    r = np.where(np.isnan(r), np.inf, r)  # a constant chain: R-hat undefined, not fine
    bad = r > rhat_max
    if bad.any():
        out.append(
            _threshold_warning(
                "r_hat", r, names, annotators, bad, int(np.argmax(r)),
                f"R-hat above {rhat_max}: the chains disagree",
                "run longer chains (--warmup, --draws) or more chains; a parameter the data "
                "barely inform may need a prior (--prior beta:A,B)",
            )
        )  # fmt: skip
    for kind, label in (("ess_bulk", "bulk"), ("ess_tail", "tail")):
        ess = np.concatenate(stats[kind])
        ess = np.where(np.isnan(ess), 0.0, ess)
        bad = ess < ess_min
        if bad.any():
            out.append(
                _threshold_warning(
                    kind, ess, names, annotators, bad, int(np.argmin(ess)),
                    f"{label} ESS under {ess_min:g}: too few effective draws for the "
                    f"{'posterior mean and sd' if label == 'bulk' else '90% interval'}",
                    "more draws per chain (--draws) or more chains (--chains)",
                )
            )  # fmt: skip
    return out


def sampler_warnings(
    sample_stats: Mapping[str, Any], max_tree_depth: int | None = None
) -> list[FitWarning]:
    """Divergent transitions, and draws whose trajectory hit ``max_tree_depth``.

    :param sample_stats: per-draw ``(chain, draw)`` statistics: ``diverging`` and
        ``tree_depth`` (either may be absent).
    """
    out = []
    diverging = sample_stats.get("diverging")
    if diverging is not None:
        mask = np.asarray(diverging, dtype=bool)
        count = int(mask.sum())
        if count:
            chains = [int(c) for c in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(-1))]
            out.append(
                FitWarning(
                    "divergences",
                    f"{count} divergent transition(s) after warm-up (of {mask.size} draws; "
                    f"chains {chains}): the sampler missed part of the posterior, and its "
                    "summaries (R-hat too) may be biased",
                    "raise the target acceptance (--target-accept 0.95); if they persist, "
                    "a prior on the parameters concerned or a reparametrisation",
                    value=float(count),
                )
            )
    depth = sample_stats.get("tree_depth")
    if depth is not None and max_tree_depth is not None:
        hits = np.asarray(depth) >= max_tree_depth
        count = int(hits.sum())
        if count:
            out.append(
                FitWarning(
                    "tree_depth",
                    f"{count} of {hits.size} draws ({count / hits.size:.1%}) stopped at the "
                    f"maximum tree depth {max_tree_depth}: NUTS cut its trajectories short, "
                    "so the chains explore slowly",
                    "raise BayesSettings.max_tree_depth, or give a flat direction (an "
                    "annotator with few labels) a prior",
                    value=float(count),
                )
            )
    return out


def _interval_columns(annotators: pd.DataFrame) -> list[str]:
    """Parameters with a point value and a 90% interval in the summary table."""
    names = []
    for column in annotators.columns:
        if f"{column}_lo90" in annotators and f"{column}_hi90" in annotators:
            names.append(column)
    return names


def laplace_warnings(
    annotators: pd.DataFrame, improper: Sequence[int] = (), hessian: str = "block-diagonal"
) -> list[FitWarning]:
    """Improper and boundary Laplace approximations, naming the annotators.

    :param annotators: the per-annotator table (``id``, ``n_labels``, ``eta`` and the
        ``P``, ``P_lo90``, ``P_hi90`` columns of each parameter).
    :param improper: positions of annotators whose information block had a floored
        curvature (``inference["improper_annotators"]``).
    :param hessian: ``"full"`` when one matrix couples every annotator (then a flat
        direction anywhere makes the whole approximation improper).
    """
    ids = annotators["id"].astype(str).tolist()
    counts = annotators["n_labels"].tolist() if "n_labels" in annotators else ["?"] * len(ids)
    eta = annotators["eta"].to_numpy(dtype=np.float64)

    def described(rows: Sequence[int]) -> str:
        return _named([f"{ids[i]} ({counts[i]} labels, eta {eta[i]:.6g})" for i in rows])

    out = []
    edge = (eta < BOUNDARY_DISTANCE) | (eta > 1 - BOUNDARY_DISTANCE)
    degenerate = np.zeros(len(ids), dtype=bool)
    parameters: list[str] = []
    for name in _interval_columns(annotators):
        width = (annotators[f"{name}_hi90"] - annotators[f"{name}_lo90"]).to_numpy(np.float64)
        flat = width < MIN_INTERVAL_WIDTH
        degenerate |= flat
        parameters += [f"{name}[{ids[i]}]" for i in np.flatnonzero(flat)]
    parameters = [f"eta[{ids[i]}]" for i in np.flatnonzero(edge)] + parameters
    boundary = np.flatnonzero(edge | degenerate).tolist()
    if boundary:
        out.append(
            FitWarning(
                "boundary",
                f"{len(boundary)} annotator(s) on the boundary of the parameter space "
                f"(or with a 90% interval of no width): {described(boundary)}; their "
                "Laplace intervals are not intervals",
                "a prior with both parameters above 1 keeps the estimate inside (0, 1) "
                "(--prior beta:5,2: MAP-EM; beta:2,1 does not, its mode is 1), or --method "
                "nuts for the exact posterior; an annotator with few labels needs more "
                "labels or the hierarchical model",
                annotators=tuple(ids[i] for i in boundary),
                parameters=tuple(dict.fromkeys(parameters)),
                value=float(eta[boundary[0]]),
            )
        )
    improper = sorted(int(i) for i in improper)
    if improper:
        coupled = hessian == "full" and len(improper) == len(ids)
        scope = (
            "the information matrix coupling every annotator has a flat direction, so "
            "the whole approximation is improper"
            if coupled
            else f"{len(improper)} annotator(s) without curvature: {described(improper)}"
        )
        out.append(
            FitWarning(
                "laplace",
                f"improper Laplace approximation: {scope}; their intervals are floored "
                "(an sd of 10 on the logit scale), not estimated",
                "a prior on the annotators' parameters with both Beta parameters above 1 "
                "(--prior beta:5,2), more labels for the annotators named, or --method nuts",
                annotators=tuple(ids[i] for i in improper),
                value=float(len(improper)),
            )
        )
    return out


def optimisation_warnings(method: str, inference: Mapping[str, Any]) -> list[FitWarning]:
    """SVI or MAP stopped at its step limit before its objective settled."""
    facts = inference.get("optimisation") if method == "map" else inference
    if method not in ("svi", "map") or not facts or facts.get("converged", True):
        return []
    steps = facts.get("steps")
    return [
        FitWarning(
            "optimisation",
            f"{method.upper()} stopped after {steps} steps with its objective still moving: "
            f"the {'variational posterior' if method == 'svi' else 'mode'} is not its optimum",
            "more steps (--svi-steps), or --method nuts",
            value=None if steps is None else float(steps),
        )
    ]


def identification_warnings(
    profile: Mapping[str, Any], eta: float, annotator: str
) -> list[FitWarning]:
    """One annotator's learned ``eta`` against what its labels can tell of it.

    ``profile`` is :meth:`repo.inference.profile.EtaProfile.to_dict` (``interval``,
    ``num_labels``; ``from``, the scores it was computed at, as
    :func:`repo.train.summaries.one_annotator_profile` names them); it warns when the
    interval is wider than :data:`IDENTIFICATION_WIDTH` or does not contain ``eta``.
    With one annotator the labels and the scorer cannot tell noisy labels on clear pairs
    from clean labels on unclear ones (``docs/math.md`` section 9): the interval is the
    honest answer.
    """
    low, high = (float(v) for v in profile["interval"])
    outside = not low <= eta <= high
    if not outside and high - low <= IDENTIFICATION_WIDTH:
        return []
    where = "outside" if outside else "inside"
    scores = str(profile.get("from", "first_visit_logits")).removesuffix("_logits")
    return [
        FitWarning(
            "identification",
            f"the labels of one annotator fix its eta only to [{low:.3f}, {high:.3f}] (95% "
            f"profile-likelihood interval at {int(profile['num_labels'])} "
            f"{scores.replace('_', '-')} logits); the learned eta {eta:.3f} lies {where} it",
            "report the interval rather than the point; several annotators, or items "
            "labelled more than once, identify eta, and so does a policy that has learned "
            "more of the task before it scores the labels (more pairs; docs/math.md "
            "section 9)",
            annotators=(annotator,),
            parameters=(f"eta[{annotator}]",),
            value=high - low,
        )
    ]


def _warnings(
    method: str,
    annotators: pd.DataFrame,
    inference: Mapping[str, Any],
    posterior=None,
    sample_stats: Mapping[str, Any] | None = None,
) -> list[FitWarning]:
    out: list[FitWarning] = []
    if method in SAMPLED and posterior is not None:
        out += convergence_warnings(posterior)
    if method in SAMPLED and sample_stats is not None:
        out += sampler_warnings(sample_stats, inference.get("max_tree_depth"))
    if method in LAPLACE and inference.get("approximation") == "laplace":
        out += laplace_warnings(
            annotators,
            inference.get("improper_annotators") or (),
            inference.get("hessian", "block-diagonal"),
        )
    out += optimisation_warnings(method, inference)
    return sorted(out, key=lambda w: CHECKS.index(w.check))


def fit_warnings(fit: Any) -> list[FitWarning]:
    """Every check that applies to ``fit``'s method, on its attached posterior.

    A fit without a posterior (EM alone) has nothing to check.
    """
    if fit.posterior is None:
        return []
    posterior = stats = None
    if fit.method in SAMPLED:
        from repo.diagnostics.compat import group

        idata = fit.to_inference_data(log_likelihood=False)
        posterior = group(idata, "posterior")
        stats = fit.posterior.draws.sample_stats
    return _warnings(fit.method, fit.annotators, fit.inference, posterior, stats)


def run_warnings(result: Mapping[str, Any], idata=None) -> list[FitWarning]:
    """The warnings of a saved result: those it records, else computed from its
    summary table and its InferenceData (when written)."""
    if "warnings" in result:
        return [FitWarning.from_dict(w) for w in result["warnings"]]
    from repo.diagnostics.compat import group

    posterior = stats = None
    if idata is not None:
        posterior = group(idata, "posterior")
        sample = group(idata, "sample_stats")
        stats = None if sample is None else {k: sample[k].values for k in sample.data_vars}
    return _warnings(
        result.get("method", "em"),
        pd.DataFrame(result["annotators"]),
        result.get("inference") or {},
        posterior,
        stats,
    )
