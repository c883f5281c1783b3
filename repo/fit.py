"""Fit a noise model to a label table: the Python face of ``re-po fit-noise``.

:func:`fit_noise` reads (or takes) a label table in one of the formats of
:mod:`repo.data.labels`, builds the truth layout and the scorer the format implies,
refuses combinations that cannot be identified, runs EM and returns a
:class:`NoiseFit`: plain data whose estimates are data frames, saved as a directory
(:meth:`NoiseFit.save`: ``fit.json`` and Parquet tables; :meth:`NoiseFit.load`) or
as one JSON document (:meth:`NoiseFit.to_json`, RESULT.json ``version`` 1).

=========  ===========  =======================================================
format     truth        scorer
=========  ===========  =======================================================
binary     shared       :class:`~repo.scorers.ClassPrior` (crowd aggregation)
pairwise   per label    :class:`~repo.scorers.BradleyTerry` (Crowd-BT)
scored     either       :class:`~repo.scorers.FixedLogits` (the ``score`` column)
=========  ===========  =======================================================
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch

from repo.data.errors import DataError
from repo.data.labels import EncodedLabels, encode_labels, read_label_table
from repo.inference.bayes import METHODS, BayesResult, BayesSettings, infer, summarise_plates
from repo.inference.em import EMResult, fit_em
from repo.inference.enumeration import EnumPosterior, enumerate_posterior
from repo.noise import (
    ANNOTATORS,
    ITEMS,
    NOISE_MODELS,
    LabelData,
    NoiseModel,
    Sizes,
    make_noise_model,
)
from repo.noise.base import REPORTED
from repo.scorers import BradleyTerry, ClassPrior, FixedLogits, Scorer

if TYPE_CHECKING:
    from repo.diagnostics.checks import FitWarning

RESULT_VERSION = 1

LOG_LIKELIHOOD_VALUES = 50_000_000
"""At most this many pointwise log-likelihood values (draws x truth units) are
enumerated from a posterior's draws (the ``log_likelihood`` group of the
InferenceData, PSIS-LOO, the Rao-Blackwellised averages of NUTS and SVI) unless
``BayesSettings.max_enumeration_draws`` says otherwise: 400 MB of float64 (kept
at float64: ArviZ's PSIS gives NaN on some float32 log-likelihoods).
Up to 25,000 units every draw is kept (2,000 Laplace draws); 2M labels in 667k
items under shared truth keep 74 draws, evenly thinned."""


def parse_prior(spec: str | dist.Beta | None) -> dist.Beta | None:
    """``"beta:A,B"`` -> ``Beta(A, B)``; ``"none"`` or None -> no prior."""
    if spec is None or isinstance(spec, dist.Beta):
        return spec
    text = spec.strip().lower()
    if text == "none":
        return None
    if not text.startswith("beta:"):
        raise ValueError(f"prior must be 'beta:A,B' or 'none', got {spec!r}")
    try:
        a, b = (float(x) for x in text[len("beta:") :].split(","))
    except ValueError:
        raise ValueError(f"prior must be 'beta:A,B' with two numbers, got {spec!r}") from None
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta prior parameters must be positive, got {spec!r}")
    f64 = torch.float64
    return dist.Beta(torch.tensor(a, dtype=f64), torch.tensor(b, dtype=f64))


def _as_table(table: pd.DataFrame | str | Path | Mapping) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, str | Path):
        return read_label_table(table)
    if isinstance(table, Mapping):
        lengths = {name: len(values) for name, values in table.items()}
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise DataError(f"columns have different lengths ({described})", reason="length")
        return pd.DataFrame(dict(table))
    raise TypeError(
        f"expected a DataFrame, a path or a dict of columns, got {type(table).__name__}"
    )


def check_identifiable(model: str, fmt: str, shared_truth: bool, labels: EncodedLabels) -> None:
    """Raise ValueError with the reason for a model/format pair that cannot be fitted."""
    if model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {model!r}; choose from {', '.join(NOISE_MODELS)}")
    cls = NOISE_MODELS[model]
    if fmt == "binary" and not shared_truth:
        raise ValueError(
            "per-label truth with no scorer is not identifiable: binary labels carry no "
            "per-item score, so each label's truth would be free; use shared truth"
        )
    if fmt == "pairwise" and shared_truth:
        raise ValueError("pairwise rows are separate comparisons: shared truth does not apply")
    if fmt == "scored" and shared_truth and labels.item is None:
        raise ValueError("shared truth needs an 'item' column in the scored format")
    if not cls.has_truth and fmt == "binary":
        raise ValueError(
            "the boltzmann model needs per-item scores: binary labels have only a class prior"
        )
    if not cls.has_truth and fmt == "pairwise":
        raise ValueError(
            "the boltzmann model with learned Bradley-Terry scores is not identifiable: "
            "the scale of the scores and tau trade off exactly"
        )
    if cls.reads_position and fmt == "pairwise":
        raise ValueError(
            f"the {model} model reads the A/B position, and pairwise rows record only "
            "winner and loser (no position); use symmetric or hierarchical"
        )
    if cls.reads_position and np.unique(labels.label).shape[0] < 2:
        raise ValueError(
            f"the {model} model reads the A/B position, but every label says "
            f"{'A' if labels.label[0] == 1 else 'B'}: A is not an order the annotator saw "
            "(A = chosen?), so a position bias cannot be told from the truth"
        )


@dataclass
class NoiseFit:
    """A fitted noise model and its estimates: plain data, saved and loaded whole.

    :param annotators: one row per annotator: ``id``, ``n_labels``, ``eta`` (the
        probability that their label is correct) and the model's own parameters
        (with a posterior, their ``_mean``, ``_sd``, ``_lo90``, ``_hi90``, ...).
    :param items: per item: ``id``, the posterior of the truth ``p_<value>`` for
        both label values and the item's ``log_likelihood`` (binary, scored with
        shared truth), or ``id`` and the Bradley-Terry ``score`` (pairwise).
    :param labels: per kept label: ``row`` (its row in the input) and ``w``, the
        posterior that it is correct; under per-label truth also its
        ``log_likelihood``.
    :param skipped: rows left out of the fit, by reason (``tie``, ``duplicate``,
        and under ``on_invalid="skip"`` ``missing_id``, ``missing_label``,
        ``self_comparison``, ...; :mod:`repo.data.labels`).
    :param settings: what the fit was asked (format options, tolerance, ...).
    :param truth_values: the input's two label values, A first, whose posteriors
        the ``p_<value>`` item columns hold (None without shared truth).
    :param warnings: the checks the posterior failed (R-hat, ESS, divergences, tree
        depth, improper or boundary Laplace fits: :mod:`repo.diagnostics.checks`).
    :param estimate: what EM estimated: ``"ml"`` (maximum likelihood) or ``"map"``
        (the posterior mode under the prior).
    :param plates: parameters on plates other than annotators and items, one table
        per plate (``index`` and the parameters' columns). Per-annotator parameters
        are columns of ``annotators``; per-item ones (on the ``items`` plate) columns
        of ``items`` under shared truth and of ``labels`` under per-label truth
        (where each label is its own item); global ones entries of ``population``.

    The last five fields (``noise_model``, ``scorer``, ``data``, ``em``,
    ``posterior``) are the live objects of a fit made in this process, for
    :meth:`to_inference_data` and further inference; they are never saved, and a
    loaded fit has None there.

    On disk (:meth:`save`, :meth:`load`) a fit is a directory:

    * ``fit.json``: the summary, :meth:`summary` (every field above but the item
      and label tables; annotators as one record each), ``version``
      :data:`RESULT_VERSION`;
    * ``labels.parquet`` and ``items.parquet``: the two tables, as they are.

    :meth:`to_dict` is the whole fit as one JSON document (the tables as records:
    the single-file RESULT.json, for small fits); :meth:`from_dict` reads it back.
    """

    model: str
    format: str
    method: str
    converged: bool
    iterations: int
    log_likelihood: float
    annotators: pd.DataFrame
    items: pd.DataFrame
    labels: pd.DataFrame
    population: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    prior: str | None = None
    divergences: int = 0
    inference: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    trajectory: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    truth_values: tuple[str, str] | None = None
    warnings: list[FitWarning] = field(default_factory=list)
    estimate: str = "ml"
    plates: dict[str, pd.DataFrame] = field(default_factory=dict)
    noise_model: NoiseModel | None = field(default=None, repr=False, compare=False)
    scorer: Scorer | None = field(default=None, repr=False, compare=False)
    data: LabelData | None = field(default=None, repr=False, compare=False)
    em: EMResult | None = field(default=None, repr=False, compare=False)
    posterior: BayesResult | None = field(default=None, repr=False, compare=False)

    @property
    def pointwise_log_likelihood(self) -> np.ndarray | None:
        """Per truth unit (label, or item under shared truth), every latent summed
        out: the input to PSIS-LOO."""
        for frame in (self.items, self.labels):
            if "log_likelihood" in frame:
                return frame["log_likelihood"].to_numpy()
        return None

    # -- the summary and the whole document --------------------------------------

    def summary(self) -> dict:
        """Everything but the item and label tables, as JSON-ready values."""
        return {
            "version": RESULT_VERSION,
            "model": self.model,
            "format": self.format,
            "method": self.method,
            "estimate": self.estimate,
            "prior": self.prior,
            "converged": bool(self.converged),
            "iterations": int(self.iterations),
            "log_likelihood": float(self.log_likelihood),
            "divergences": int(self.divergences),
            "inference": self.inference,
            "settings": dict(self.settings),
            "files": dict(self.files),
            "population": {k: float(v) for k, v in self.population.items()},
            "skipped": {k: int(v) for k, v in self.skipped.items()},
            "truth_values": None if self.truth_values is None else list(self.truth_values),
            "counts": {
                "annotators": len(self.annotators),
                "items": len(self.items),
                "labels": len(self.labels),
            },
            "annotators": _records(self.annotators),
            "warnings": [w.to_dict() for w in self.warnings],
            "plates": {name: _records(frame) for name, frame in self.plates.items()},
        }

    def to_dict(self) -> dict:
        """The whole fit as one document (RESULT.json): :meth:`summary` plus
        ``items`` (the ``p_<value>`` columns as one ``posterior`` dict) and
        ``labels`` as records."""
        return {**self.summary(), "items": self._item_records(), "labels": _records(self.labels)}

    def _item_records(self) -> list[dict]:
        if self.truth_values is None:
            return _records(self.items)
        columns = [f"p_{value}" for value in self.truth_values]
        rest = self.items.drop(columns=columns)
        probabilities = self.items[columns].to_numpy().tolist()
        records = _records(rest)
        for record, row in zip(records, probabilities, strict=True):
            record["posterior"] = dict(zip(self.truth_values, row, strict=True))
        return records

    @classmethod
    def from_dict(
        cls,
        document: Mapping,
        *,
        items: pd.DataFrame | None = None,
        labels: pd.DataFrame | None = None,
    ) -> NoiseFit:
        """A fit from :meth:`to_dict`'s document, or from :meth:`summary`'s with the
        ``items`` and ``labels`` tables given."""
        version = document.get("version")
        if version != RESULT_VERSION:
            raise ValueError(
                f"a noise fit of version {version!r}; this re-po reads version {RESULT_VERSION}"
            )
        truth = document.get("truth_values")
        truth_values = None if truth is None else (str(truth[0]), str(truth[1]))
        if items is None:
            records = []
            for record in document.get("items", []):
                record = dict(record)
                posterior = record.pop("posterior", None)
                if posterior is not None:  # p_<value> columns after the id, as fitted
                    truth_values = truth_values or tuple(str(v) for v in posterior)
                    record = {
                        "id": record.pop("id"),
                        **{f"p_{k}": v for k, v in posterior.items()},
                        **record,
                    }
                records.append(record)
            items = pd.DataFrame(records, columns=None if records else ["id"])
        if labels is None:
            labels = pd.DataFrame(document.get("labels", []), columns=None)
            if labels.empty:
                labels = pd.DataFrame({"row": pd.Series([], dtype=np.int64), "w": []})
        annotators = pd.DataFrame(document["annotators"])
        annotators["id"] = annotators["id"].astype(str)
        items["id"] = items["id"].astype(str)
        return cls(
            model=document["model"],
            format=document["format"],
            method=document.get("method", "em"),
            converged=bool(document["converged"]),
            iterations=int(document["iterations"]),
            log_likelihood=float(document["log_likelihood"]),
            annotators=annotators,
            items=items,
            labels=labels,
            population=dict(document.get("population", {})),
            skipped=dict(document.get("skipped", document.get("dropped", {}))),
            prior=document.get("prior"),
            divergences=int(document.get("divergences", 0)),
            inference=dict(document.get("inference", {})),
            settings=dict(document.get("settings", {})),
            files=dict(document.get("files", {})),
            truth_values=truth_values,
            warnings=_read_warnings(document.get("warnings", [])),
            estimate=document.get("estimate", "ml"),
            plates={k: pd.DataFrame(v) for k, v in document.get("plates", {}).items()},
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise :meth:`to_dict` (one line); write it to ``path`` when given."""
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> NoiseFit:
        """Read what :meth:`to_json` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- the directory -------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the fit to ``directory`` (created; existing files of a fit replaced):
        ``fit.json`` (:meth:`summary`), ``labels.parquet``, ``items.parquet``.
        Returns the directory."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, frame in (("labels", self.labels), ("items", self.items)):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            pq.write_table(table, directory / TABLES[name])
        summary = {**self.summary(), "tables": dict(TABLES)}
        (directory / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> NoiseFit:
        """Read a fit that :meth:`save` wrote (``directory`` or its ``fit.json``)."""
        import pyarrow.parquet as pq

        directory = Path(directory)
        if directory.is_file():
            directory = directory.parent
        summary_path = directory / SUMMARY
        if not summary_path.is_file():
            raise ValueError(f"{directory}: not a saved noise fit (no {SUMMARY})")
        try:
            document = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{summary_path}: not valid JSON ({error.msg})") from None
        tables = {}
        for name, filename in document.get("tables", TABLES).items():
            path = directory / filename
            if not path.is_file():
                raise ValueError(f"{directory}: the fit's {name} table {filename} is missing")
            tables[name] = pq.read_table(path).to_pandas()
        return cls.from_dict(document, items=tables["items"], labels=tables["labels"])

    def to_inference_data(self, log_likelihood: bool = True):
        """ArviZ data of the attached posterior (:mod:`repo.diagnostics`)."""
        from repo.diagnostics.inference_data import to_inference_data

        if self.posterior is None:
            raise ValueError("this fit has no posterior attached")
        units = self.items["id"].tolist() if self.data.shared_truth else None
        return to_inference_data(
            self.posterior,
            annotator_ids=self.annotators["id"].astype(str).tolist(),
            unit_ids=units,
            model_name=self.model,
            log_likelihood=log_likelihood,
        )


def _read_warnings(records: list) -> list[FitWarning]:
    from repo.diagnostics.checks import FitWarning

    return [FitWarning.from_dict(record) for record in records]


SUMMARY = "fit.json"
"""The summary's file name in a saved fit's directory."""

TABLES = {"labels": "labels.parquet", "items": "items.parquet"}
"""The tables' file names in a saved fit's directory."""


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts of Python scalars (numpy scalars converted)."""
    columns = {}
    for name in frame.columns:
        values = frame[name]
        if pd.api.types.is_numeric_dtype(values.dtype) or values.dtype == bool:
            columns[name] = values.to_numpy().tolist()
        else:
            columns[name] = values.tolist()
    names = list(columns)
    return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def _build(labels: EncodedLabels, shared_truth: bool) -> tuple[LabelData, Scorer]:
    k = len(labels.annotator_ids)
    if labels.format == "binary":
        data = LabelData.from_labels(
            labels.annotator, labels.label, labels.item, shared_truth=True, num_annotators=k
        )
        return data, ClassPrior()
    if labels.format == "pairwise":
        data = LabelData.from_labels(labels.annotator, labels.label, num_annotators=k)
        scorer = BradleyTerry(labels.object_a, labels.object_b, len(labels.object_ids))
        return data, scorer
    if shared_truth:
        data = LabelData.from_labels(
            labels.annotator, labels.label, labels.item, shared_truth=True, num_annotators=k
        )
        item_scores = np.zeros(len(labels.item_ids))
        item_scores[labels.item] = labels.score
        return data, FixedLogits(torch.as_tensor(item_scores))
    data = LabelData.from_labels(labels.annotator, labels.label, num_annotators=k)
    return data, FixedLogits(torch.as_tensor(labels.score))


def fit_noise(
    table: pd.DataFrame | str | Path | Mapping,
    *,
    format: str,  # noqa: A002  (the CLI's word)
    model: str = "symmetric",
    shared_truth: bool | None = None,
    prior: str | dist.Beta | None = None,
    eta_init: float = 0.9,
    tie_value: str | None = "auto",
    duplicates: str = "error",
    on_invalid: str = "error",
    tol: float = 1e-6,
    max_iter: int = 1000,
    accelerate: bool = True,
    progress: bool = False,
    method: str | None = None,
    bayes: BayesSettings | None = None,
) -> NoiseFit:
    """Fit ``model`` to a label table by EM, then, by ``method``, attach a posterior:
    ``"em"`` the Laplace approximation at the EM estimate, ``"map"`` the posterior
    mode (MAP-EM, then AutoDelta from there) with its Laplace approximation,
    ``"nuts"`` or ``"svi"`` full Bayes with the scorer held at its EM fit
    (:mod:`repo.inference.bayes`; ``bayes`` holds their settings). ``None`` (the
    default) is EM alone, with no uncertainty (the cheapest; ``re-po fit-noise``
    defaults to ``"em"``).

    The EM estimate is chosen, not inferred from the model's priors: ``"map"`` is the
    posterior mode under the model's priors (its declared ``priors()``, and the Beta
    ``prior`` on reliability probabilities); every other method starts from
    maximum-likelihood EM, or MAP-EM when a Beta ``prior`` is given (the fit's
    ``estimate`` records which).

    :param table: a DataFrame, a path (CSV, TSV, JSONL, Parquet) or a dict of
        equal-length columns.
    :param format: ``"binary"``, ``"pairwise"`` or ``"scored"``.
    :param shared_truth: binary: always; pairwise: never; scored: when True (needs
        an ``item`` column). None picks the format's default.
    :param prior: ``"beta:A,B"``, a ``Beta`` or None (maximum likelihood).
    :param eta_init: initial reliability (> 0.5 breaks the label-swap symmetry).
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    frame = _as_table(table)
    labels = encode_labels(
        frame, format, tie_value=tie_value, duplicates=duplicates, on_invalid=on_invalid
    )
    if shared_truth is None:
        shared_truth = format == "binary"
    check_identifiable(model, format, shared_truth, labels)
    beta = parse_prior(prior)
    data, scorer = _build(labels, shared_truth)
    noise = make_noise_model(model, Sizes.of(data), beta, eta_init=eta_init)
    estimate = "map" if method == "map" or beta is not None else "ml"

    trajectory: list[dict] = []
    counts = data.label_counts().clamp_min(1)

    def report(iteration: int, value: float) -> None:
        with torch.no_grad():
            implied = noise.implied_eta(scorer(data).detach(), data).expand_as(data.label)
            eta = (data.per_annotator_sum(implied) / counts).tolist()
        trajectory.append({"step": iteration, "objective": value, "eta": eta})
        if progress:
            print(f"[re-po] EM iteration {iteration}: objective {value:.6f}", file=sys.stderr)

    em_start = time.perf_counter()
    result = fit_em(
        noise,
        scorer,
        data,
        tol=tol,
        max_iter=max_iter,
        accelerate=accelerate,
        callback=report,
        estimate=estimate,
    )
    em_seconds = time.perf_counter() - em_start
    fit = summarise(noise, scorer, data, labels, result, prior=prior)
    fit.estimate = estimate
    fit.trajectory = trajectory
    fit.settings = {
        "shared_truth": bool(shared_truth),
        "eta_init": float(eta_init),
        "tie_value": tie_value,
        "duplicates": duplicates,
        "on_invalid": on_invalid,
        "tol": float(tol),
        "max_iter": int(max_iter),
    }
    if method is None:
        fit.inference = {"method": "em", "estimate": estimate, "em_seconds": em_seconds}
        return fit
    if progress and method != "em":
        print(f"[re-po] {method}: sampling the posterior ...", file=sys.stderr)
    settings = enumeration_budget(bayes, data.num_units)
    posterior = infer(method, noise, scorer, data, settings, estimate=estimate)
    fit = attach_posterior(fit, posterior, labels)
    fit.estimate = estimate
    fit.inference["estimate"] = estimate
    fit.inference["em_seconds"] = em_seconds
    from repo.diagnostics.checks import emit

    emit(fit.warnings)  # on stderr now; kept in fit.warnings
    return fit


def enumeration_budget(settings: BayesSettings | None, num_units: int) -> BayesSettings:
    """``settings`` with ``max_enumeration_draws`` set by :data:`LOG_LIKELIHOOD_VALUES`
    when it is None (an explicit number is kept)."""
    settings = settings or BayesSettings()
    if settings.max_enumeration_draws is not None:
        return settings
    budget = max(1, LOG_LIKELIHOOD_VALUES // max(1, num_units))
    return dataclasses.replace(settings, max_enumeration_draws=budget)


def attach_posterior(fit: NoiseFit, posterior: BayesResult, labels: EncodedLabels) -> NoiseFit:
    """``fit`` with the posterior's summaries (:func:`summarise_plates`) added.

    NUTS and SVI replace the per-label ``w`` and the items' posteriors by their
    Rao-Blackwellised averages over draws and the pointwise log-likelihood by the
    log pointwise predictive density ``log mean_s p(o_i | theta_s)``; MAP reports
    them at the mode; EM keeps them at the estimate.
    """
    noise, scorer, data = fit.noise_model, fit.scorer, fit.data
    em = fit.em
    if posterior.method in ("nuts", "svi"):
        enumeration = posterior.enumeration()
        log_lik = enumeration.log_likelihood.reshape(-1, enumeration.log_likelihood.shape[-1])
        lppd = np.logaddexp.reduce(log_lik, axis=0) - np.log(log_lik.shape[0])
        averaged = EnumPosterior(enumeration.marginals, torch.as_tensor(lppd))
        result = EMResult(em.converged, em.iterations, em.objective, em.trace, em.logits, averaged)
        out = summarise(
            noise, scorer, data, labels, result, prior=fit.prior, method=posterior.method
        )
    elif posterior.method == "map":
        mode = posterior.point_model
        with torch.no_grad():
            at_mode = enumerate_posterior(mode.e_step_model(), posterior.logits, data)
        value = float((at_mode.log_likelihood.sum() + mode.log_prior()).detach())
        result = EMResult(em.converged, em.iterations, value, em.trace, em.logits, at_mode)
        out = summarise(mode, scorer, data, labels, result, prior=fit.prior, method="map")
    else:
        out = fit
    tables, population = summarise_plates(posterior, eta_point=out.annotators["eta"].to_numpy())
    place_plate_columns(out, tables)
    out.population.update(population)
    out.posterior = posterior
    out.trajectory = fit.trajectory
    out.settings = fit.settings
    out.divergences = posterior.draws.num_divergences
    out.inference = _inference_facts(posterior)
    from repo.diagnostics.checks import fit_warnings

    out.warnings = fit_warnings(out)
    return out


def _inference_facts(posterior: BayesResult) -> dict:
    info = {k: v for k, v in posterior.draws.info.items() if k not in ("elbo", "optimisation")}
    if "elbo" in posterior.draws.info:
        info["elbo_final"] = float(np.mean(posterior.draws.info["elbo"][-100:]))
    if "optimisation" in posterior.draws.info:
        opt = posterior.draws.info["optimisation"]
        info["optimisation"] = {"converged": opt["converged"], "steps": opt["steps"]}
    info.pop("unconstrained_sd", None)
    return {
        "method": posterior.method,
        "num_chains": posterior.draws.num_chains,
        "num_draws": posterior.draws.num_draws,
        "seconds": {k: float(v) for k, v in posterior.draws.seconds.items()},
        **info,
    }


def summarise(
    noise: NoiseModel,
    scorer: Scorer,
    data: LabelData,
    labels: EncodedLabels,
    result: EMResult,
    *,
    prior: str | dist.Beta | None = None,
    method: str = "em",
) -> NoiseFit:
    """Turn a fitted model into a :class:`NoiseFit` with the input's ids."""
    logits, marginals = result.logits, result.posterior.marginals
    counts = data.label_counts()
    implied = noise.implied_eta(logits, data)
    eta = (data.per_annotator_sum(implied) / counts.clamp_min(1)).numpy()
    annotators = pd.DataFrame(
        {"id": labels.annotator_ids, "n_labels": counts.long().numpy(), "eta": eta}
    )
    for name, value in noise.annotator_parameters().items():
        if name != REPORTED:  # the reported eta is implied_eta's, above
            annotators[name] = value.numpy()

    truth = noise.truth_posterior(logits, marginals).numpy()
    pointwise = result.posterior.log_likelihood.numpy()
    w = data.flat(noise.label_correct(logits, data, marginals))
    frame_labels = pd.DataFrame({"row": labels.row, "w": w.numpy()})
    if not data.shared_truth:
        per_label = result.posterior.log_likelihood.unsqueeze(-1)
        frame_labels["log_likelihood"] = data.flat(per_label).numpy()

    truth_values = None
    if labels.format == "pairwise":
        items = pd.DataFrame({"id": labels.object_ids, "score": scorer.centred().detach().numpy()})
    elif data.shared_truth:
        ids = np.asarray(labels.item_ids, dtype=object)[data.unit.numpy()]
        truth_values = labels.label_values if labels.format == "binary" else ("1", "0")
        a, b = truth_values
        items = pd.DataFrame(
            {"id": ids, f"p_{a}": truth, f"p_{b}": 1 - truth, "log_likelihood": pointwise}
        )
    else:
        items = pd.DataFrame({"id": pd.Series([], dtype=str)})
    population = {k: float(v) for k, v in noise.population_parameters().items()}
    if isinstance(scorer, ClassPrior):
        population["pi_a"] = float(torch.sigmoid(scorer.logit_pi.detach()))
    prior_text = prior if isinstance(prior, str) or prior is None else repr(prior)
    fit = NoiseFit(
        model=noise.name,
        format=labels.format,
        method=method,
        converged=result.converged,
        iterations=result.iterations,
        log_likelihood=result.objective,
        annotators=annotators,
        items=items,
        labels=frame_labels,
        population=population,
        skipped=dict(labels.skipped),
        prior=prior_text,
        noise_model=noise,
        scorer=scorer,
        data=data,
        em=result,
        truth_values=truth_values,
    )
    tables = {
        plate: pd.DataFrame({n: v.numpy() for n, v in noise.plate_parameters(plate).items()})
        for plate in noise.plates()
        if plate not in (None, ANNOTATORS)
    }
    place_plate_columns(fit, tables)
    return fit


def place_plate_columns(fit: NoiseFit, tables: dict[str, pd.DataFrame]) -> None:
    """Put per-plate parameter columns where :class:`NoiseFit` keeps them: the
    annotators' in ``annotators``, the items' (one row per item key, ``data.unit``)
    in ``items`` under shared truth or ``labels`` under per-label truth, any other
    plate's in ``plates`` (with an ``index`` column)."""
    data = fit.data
    for plate, frame in tables.items():
        if plate == ANNOTATORS:
            for column in frame.columns:
                fit.annotators[column] = frame[column].to_numpy()
        elif plate == ITEMS:
            for column in frame.columns:
                per_unit = torch.tensor(frame[column].to_numpy())[data.unit]
                if data.shared_truth:
                    fit.items[column] = per_unit.numpy()
                else:
                    fit.labels[column] = data.flat(per_unit.unsqueeze(-1)).numpy()
        else:
            table = fit.plates.get(plate, pd.DataFrame({"index": np.arange(len(frame))}))
            for column in frame.columns:
                table[column] = frame[column].to_numpy()
            fit.plates[plate] = table
