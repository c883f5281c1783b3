r"""Controlled experiments: train one method on noisy labels, score it on clean ones.

The building blocks of ``examples/noise_sweep.py`` and
``examples/reliability_recovery.py`` (``docs/experiments/``):

* :class:`Method` - a loss family with or without RE-PO, and its hyper-parameters;
* :func:`annotator_pool` - reliabilities of a pool whose mean flip rate is given;
* :func:`rule_config` - a CPU configuration of the tiny model (full fine-tuning);
* :func:`train_and_score` - train on labelled rows, score held-out rows whose
  labels are clean, and read off the learned reliabilities;
* :func:`t_interval` - the mean and the half-width of its Student-t interval.

Held-out accuracy is that of the loss family's induced preference
:math:`\mathrm{sign}(s)`, :math:`s = \mathrm{logit}\,p(A \succ^* B)`, against the
clean label; log loss and expected calibration error (``ECE_BINS`` equal-width bins)
are those of :math:`\sigma(s)` against the same labels (see :mod:`repo.train.evaluate`).
"""

from __future__ import annotations

import math
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy import stats

from repo.data.loaders import load_preferences
from repo.data.records import PreferenceData
from repo.inference.noise_test import NoiseTest
from repo.train import TrainConfig, Trainer
from repo.train.build import EStepSettings
from repo.train.evaluate import evaluate_records

__all__ = [
    "ECE_BINS",
    "POOL_SHAPE",
    "Method",
    "RunResult",
    "annotator_pool",
    "held_out_scores",
    "rule_config",
    "scorer_accuracy",
    "t_interval",
    "method_from_text",
    "train_and_score",
    "with_fields",
]

POOL_SHAPE = (0.0, 0.5, 1.5, 2.0)
"""Flip rates of the default pool, as multiples of the mean flip rate."""
ECE_BINS = 15
"""Equal-width bins of sigma(s) for the held-out expected calibration error."""


@dataclass(frozen=True)
class Method:
    """A preference-optimisation method: a loss family, with EM (RE-PO) or without.

    :param name: the name in tables (``"RE-DPO"``).
    :param family: the ``[loss] family`` (``"dpo"``, ``"cdpo"``, ...).
    :param robust: RE-PO (``[em] enabled``) or the plain loss.
    :param loss: ``[loss]`` fields (``beta``, ``gamma``, ``epsilon``, ...).
    :param em: ``[em]`` fields (``temperature``, ``warmup_steps``, ...).
    :param noise: ``[noise]`` fields (``eta_init``, ...).
    """

    name: str
    family: str
    robust: bool
    loss: dict[str, Any] = field(default_factory=dict)
    em: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] = field(default_factory=dict)


def with_fields(method: Method, items: Sequence[str]) -> Method:
    """``method`` with fields of its sections set, renamed after them.

    Each item is ``section.field=value``: ``section`` one of ``em``, ``loss``,
    ``noise``, ``value`` read as TOML (``em.epoch_m_step=true``,
    ``loss.variant="nll"``). The name is ``method.name`` followed by the items, space
    separated, so ``"RE-CPO em.epoch_m_step=true"`` names RE-CPO with
    ``[em] epoch_m_step = true``. No items: ``method`` itself.
    """
    if not items:
        return method
    sections = {"em": dict(method.em), "loss": dict(method.loss), "noise": dict(method.noise)}
    for item in items:
        key, equals, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (equals and dot and name) or section not in sections:
            raise ValueError(
                f"{item!r} for {method.name}: expected section.field=value, section em, "
                "loss or noise"
            )
        try:
            sections[section][name] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{item!r} for {method.name}: {value!r} is not a TOML value") from err
    return replace(method, name=" ".join([method.name, *items]), **sections)


def method_from_text(text: str, known: Mapping[str, Method]) -> Method:
    """The method ``text`` names: a name of ``known``, then optional
    ``section.field=value`` items (:func:`with_fields`), space separated, as an
    experiment script's ``--methods`` takes them (``"RE-CPO em.epoch_m_step=true"``)."""
    base, *items = text.split()
    if base not in known:
        raise ValueError(f"unknown method {base!r}; known: {sorted(known)}")
    return with_fields(known[base], items)


@dataclass
class RunResult:
    r"""What one training run gives.

    :param accuracy: held-out accuracy against the clean labels.
    :param log_loss: held-out log loss of :math:`\sigma(s)` against the clean labels (nats).
    :param ece: held-out expected calibration error of :math:`\sigma(s)` (``ECE_BINS`` bins).
    :param eta: learned reliability per annotator id (RE-PO runs; empty otherwise).
    :param steps: optimizer steps taken.
    :param wall_seconds: wall-clock time of training and scoring.
    :param cpu_seconds: CPU time of this process over the same span.
    :param estep: the E-step settings the run resolved (RE-PO runs; ``None`` otherwise):
        ``[em]`` as given, defaults filled in (:func:`repo.train.build.estep_settings`).
    :param noise_test: the noise test's last look (RE-PO runs with ``[em] noise_test``;
        ``None`` otherwise): its ``rejected`` says whether the posterior was switched on,
        its ``items`` how many units that look read.
    :param eta_interval: with one annotator, the 95% profile-likelihood interval of
        ``eta`` at the scores the run refitted it on, the held-out labels' or the first
        visits' (``reliability.json``'s ``eta_profile``,
        :func:`repo.inference.profile.eta_profile`): how far those scores identify
        ``eta`` at all; ``None`` where the run computed none.
    :param cross_fit_logits: ``(items,)`` the cross-fitted scores the E-step read, by
        item in the training records' order, in units of their rms
        (:meth:`repo.inference.online.OnlineEM.fit_cross_fitted`); ``None`` where the
        run was not cross-fitted.
    """

    accuracy: float
    log_loss: float
    ece: float
    eta: dict[str, float]
    steps: int
    wall_seconds: float
    cpu_seconds: float
    estep: EStepSettings | None = None
    noise_test: NoiseTest | None = None
    eta_interval: tuple[float, float] | None = None
    cross_fit_logits: torch.Tensor | None = None


def annotator_pool(flip_rate: float, shape: Sequence[float] = POOL_SHAPE) -> list[float]:
    r"""Reliabilities :math:`\eta_k = 1 - c_k\rho` of a pool with mean flip rate :math:`\rho`.

    ``shape`` holds the :math:`c_k` (mean 1); the default gives flip rates
    :math:`0, \rho/2, 3\rho/2, 2\rho` - at :math:`\rho = 0.4` two annotators flip
    more often than not.

    :raises ValueError: a flip rate outside [0, 1] for some annotator.
    """
    c = np.asarray(shape, dtype=np.float64)
    if not math.isclose(float(c.mean()), 1.0):
        raise ValueError(f"the pool shape must have mean 1, got {c.mean():.3f}")
    flips = c * flip_rate
    if np.any((flips < 0) | (flips > 1)):
        raise ValueError(f"flip rate {flip_rate} gives flip rates {flips.tolist()}")
    return [float(1.0 - f) for f in flips]


def rule_config(
    output_dir: str,
    method: Method,
    *,
    seed: int,
    optim: dict[str, Any] | None = None,
    recipe: str = "tiny-llama",
    model: dict[str, Any] | None = None,
) -> TrainConfig:
    """A CPU configuration for ``method``: the tiny model, full fine-tuning, no files.

    The defaults are those of ``tests/test_train.py``'s simulation test (AdamW at
    3e-3 with a 10% linear warm-up, batches of 16, two epochs); ``optim`` and
    ``model`` override fields of their sections.
    """
    sections: dict[str, dict[str, Any]] = {
        "model": {"recipe": recipe, "device": "cpu", "max_length": 64, "use_lora": False},
        "data": {"train": "unused", "annotator_column": "annotator"},
        "loss": {"family": method.family, **method.loss},
        "noise": dict(method.noise),
        "em": {"enabled": method.robust, **method.em},
        "optim": {"batch_size": 16, "epochs": 2, "learning_rate": 3e-3, "warmup_ratio": 0.1},
        "run": {"output_dir": output_dir, "progress": False, "posteriors": False, "seed": seed},
    }
    sections["optim"].update(optim or {})
    sections["model"].update(model or {})
    return TrainConfig.from_dict(sections, base_dir=output_dir)


def _records(rows: Sequence[dict] | PreferenceData) -> PreferenceData:
    if isinstance(rows, PreferenceData):
        return rows
    return load_preferences(list(rows), annotator_column="annotator")


def held_out_scores(trainer: Trainer, held_out: PreferenceData) -> dict[str, float]:
    """The trained policy of ``trainer`` on ``held_out`` (clean labels): accuracy, log
    loss, ECE (:data:`ECE_BINS` bins), ... (:func:`repo.train.evaluate.evaluate_records`)."""
    return evaluate_records(
        trainer.config,
        trainer.policy,
        trainer.likelihood,
        trainer.pair_tokenizer,
        held_out,
        bins=ECE_BINS,
    )


def train_and_score(
    train_rows: Sequence[dict] | PreferenceData,
    held_out_rows: Sequence[dict] | PreferenceData,
    method: Method,
    *,
    seed: int,
    optim: dict[str, Any] | None = None,
    recipe: str = "tiny-llama",
    model: dict[str, Any] | None = None,
    reference_cache_dir: str | None = None,
) -> RunResult:
    """Train ``method`` on ``train_rows``; its accuracy, log loss and ECE on
    ``held_out_rows`` (clean labels).

    Rows are TRL-layout dictionaries with an ``annotator`` column (as
    :func:`repo.data.rule_pairs.rule_pairs` writes them) or ready records. The run
    directory is a temporary folder, removed afterwards. ``reference_cache_dir`` keeps
    the reference log-probs (of training and held-out pairs) between runs, so that
    runs on the same pairs compute them once (:class:`repo.policy.ReferenceCache`).
    """
    train, held_out = _records(train_rows), _records(held_out_rows)
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="re-po-exp-") as tmp:
        if reference_cache_dir is not None:
            model = {**(model or {}), "reference_cache_dir": str(reference_cache_dir)}
        config = rule_config(tmp, method, seed=seed, optim=optim, recipe=recipe, model=model)
        trainer = Trainer(config, records=train)
        trainer.train()
        scores = held_out_scores(trainer, held_out)
        eta, estep = {}, None
        if method.robust:
            estep = trainer.estep
        if method.robust and hasattr(trainer.noise, "eta"):
            values = trainer.noise.eta.detach().double().cpu().tolist()
            eta = dict(zip(trainer.data.annotator_ids, values, strict=True))
        steps = trainer.step
        noise_test = trainer.em.noise_test_result if method.robust else None
        profile = trainer.run_dir.read_reliability().get("eta_profile")
        eta_interval = tuple(profile["interval"]) if profile else None
        crossed = trainer.em.cross_fit_logits if method.robust else None
    return RunResult(
        accuracy=float(scores["accuracy"]),
        log_loss=float(scores["log_loss"]),
        ece=float(scores["ece"]),
        eta=eta,
        steps=steps,
        wall_seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
        estep=estep,
        noise_test=noise_test,
        eta_interval=eta_interval,
        cross_fit_logits=None if crossed is None else crossed.detach().cpu().clone(),
    )


def scorer_accuracy(logits: torch.Tensor, truth: Sequence[float] | np.ndarray) -> float:
    """The share of the items whose score's sign says what ``truth`` says (1.0: response
    A is the better, 0.0: B), rounded to 4 places: against the true preferences, how
    often cross-fitted scorers are right; against the labels, how often they agree."""
    if len(logits) != len(truth):
        raise ValueError(f"{len(logits)} scores against {len(truth)} items")
    said = (logits > 0).cpu().numpy()
    return round(float(np.mean(said == (np.asarray(truth) == 1.0))), 4)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student-t interval for the mean of ``values``.

    The half-width is ``t_{(1 + level)/2, n - 1} * sd / sqrt(n)`` (sample sd); NaN
    for fewer than two values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return mean, float(half)
