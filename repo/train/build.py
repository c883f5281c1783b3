r"""Building a run from its configuration: the one place that turns a :class:`TrainConfig`
into the parts of a run.

``re-po train``, ``eval``, ``export``, ``demo`` and ``diagnose`` all build here, so a
run is read back with the components it was trained with (the same LoRA layout or
full weights, the same reference, tokeniser limits, likelihood and noise model).

:func:`build_run` builds in this order, so that everything that can be checked
without a model is checked before a model loads:

1. :func:`check_settings` - the recipe file, the loss family and its options, the
   Beta prior, the noise model with that prior and its starting values, the policy
   step's variant against the noise model (:class:`~repo.train.config.ConfigError`
   naming ``[section] field``);
2. :func:`load_records` - every data row, by the ``[data]`` policies
   (:class:`~repo.data.errors.DataError` naming row and field), the training data's
   and then the held-out ``[data] eval`` data's (:func:`load_eval_records`);
3. :func:`build_policy` - the model loads here: the recipe's network with its LoRA
   adapter (``[model] use_lora``, ``lora_last_layers``) or every weight trainable,
   and for full fine-tuning with a loss that needs one, a frozen copy as the
   reference;
4. :func:`build_pair_tokenizer` and :class:`~repo.train.dataset.TrainingData` -
   tokenised items and the label layout;
5. :func:`build_noise` - the noise model for the data's annotators, started at
   ``[noise] eta_init`` (the model's :meth:`~repo.noise.NoiseModel.build`, the
   constructor contract ``re-po fit-noise`` uses too).

:func:`build_online_em`, :func:`build_schedule`, :func:`build_optimizer`,
:func:`build_scheduler` and :func:`build_reference` make the training-only parts;
:func:`build_trained_policy` and :func:`build_trained_noise_fit` load a finished
run's final policy and final noise model. :func:`dry_run` is steps 1 and 2 alone
(``re-po train --dry-run``): the configuration and every data row checked, a summary
of the data, no model.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from torch import Tensor

from repo.data.loaders import is_dataset_name, load_preferences
from repo.data.records import PreferenceData
from repo.fit import NoiseFit, parse_prior
from repo.inference.online import OnlineEM
from repo.likelihoods import LIKELIHOODS, PreferenceLikelihood, get_likelihood
from repo.noise import NoiseModel, make_noise_model
from repo.noise.layout import LabelData
from repo.policy import (
    LastLayersError,
    ModelRecipe,
    PairTokenizer,
    Policy,
    ReferenceCache,
    ReferenceLogps,
    load_model_and_tokenizer,
    resolve_recipe,
)
from repo.train.config import ConfigError, TrainConfig
from repo.train.dataset import BatchSchedule, TrainingData, held_out_items
from repo.train.run_dir import RunDir
from repo.train.summaries import scored_fit

__all__ = [
    "RunParts",
    "auto_cross_fit",
    "auto_cross_fit_folds",
    "auto_noise_test",
    "auto_pass_refit",
    "auto_policy_at_temperature",
    "build_likelihood",
    "build_noise",
    "build_online_em",
    "EStepSettings",
    "estep_settings",
    "MIN_CROSS_FIT",
    "MIN_HELD_OUT",
    "MIN_PASS_REFIT",
    "NOISE_TEST",
    "ONE_PASS_FOLDS",
    "CROSS_FIT_NOISE_TEST",
    "build_held_out",
    "build_optimizer",
    "build_pair_tokenizer",
    "build_policy",
    "build_reference",
    "build_reference_cache",
    "build_run",
    "build_schedule",
    "run_steps",
    "build_scheduler",
    "build_trained_noise_fit",
    "build_trained_policy",
    "check_policy_variant",
    "check_settings",
    "check_trackers",
    "data_summary",
    "dry_run",
    "load_eval_records",
    "load_records",
    "model_recipe",
    "noise_prior",
    "seed_everything",
]


@dataclass
class RunParts:
    """The components of a run (see :func:`build_run`).

    :param records: the validated records.
    :param policy: the policy (with its reference).
    :param likelihood: the loss family with its hyper-parameters.
    :param variant: the policy step's variant (``"nll"``, ``"mixture"`` or ``"weighted"``).
    :param pair_tokenizer: the tokeniser with the run's length limits.
    :param data: tokenised items and their labels.
    :param noise: the noise model at its starting values.
    :param eval_data: the tokenised held-out pairs of ``[data] eval`` (``None``: none).
    """

    records: PreferenceData
    policy: Policy
    likelihood: PreferenceLikelihood
    variant: str
    pair_tokenizer: PairTokenizer
    data: TrainingData
    noise: NoiseModel
    eval_data: TrainingData | None = None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (all devices) and Pyro."""
    from accelerate.utils import set_seed

    set_seed(seed)
    pyro.set_rng_seed(seed)


# ----------------------------------------------------------------------------- no model


def model_recipe(config: TrainConfig) -> ModelRecipe:
    """The recipe of ``[model] recipe`` (its TOML only; no weights are read)."""
    try:
        return resolve_recipe(config.model.recipe)
    except FileNotFoundError as error:
        raise ConfigError(f"[model] recipe: {error}") from None


def noise_prior(config: TrainConfig):
    """``[noise] prior`` as a float64 ``Beta`` (or ``None``)."""
    try:
        return parse_prior(config.noise.prior)
    except ValueError as error:
        raise ConfigError(f"[noise] prior: {error}") from None


def build_noise_model(config: TrainConfig, num_annotators: int) -> NoiseModel:
    """``[noise] model`` for ``K`` annotators with its prior, started at ``eta_init``."""
    n = config.noise
    try:
        return make_noise_model(n.model, num_annotators, noise_prior(config), eta_init=n.eta_init)
    except ValueError as error:
        raise ConfigError(f"[noise] {error}") from None


def build_likelihood(config: TrainConfig, recipe: ModelRecipe | None) -> PreferenceLikelihood:
    """The loss family of ``[loss]``; ``beta`` from the recipe when ``[loss] beta = 0``
    (0.1 without a recipe)."""
    family = config.loss.family.strip().lower()
    beta = recipe.beta_for(family) if recipe is not None else 0.1
    try:
        return get_likelihood(family, **config.likelihood_kwargs(beta))
    except ValueError as error:
        raise ConfigError(f"[loss] {error}") from None


def policy_variant(config: TrainConfig, likelihood: PreferenceLikelihood) -> str:
    """The policy step's variant: ``[loss] variant``, or the family's default."""
    variant = config.loss.variant
    return likelihood.default_variant if variant == "default" else variant


def check_policy_variant(
    noise: NoiseModel | type[NoiseModel], variant: str, field: str = "[loss] variant"
) -> None:
    """Refuse a policy step the noise model cannot take: without a latent truth
    (Boltzmann) there is no posterior weight ``w``, so only the ``nll`` step (the
    gradient of the marginal likelihood) is defined.

    :param noise: the noise model, or its class (before its size is known).
    :param variant: the resolved step, ``"nll"``, ``"mixture"`` or ``"weighted"``.
    :param field: the setting the error names (``[loss] variant``, or a TRL trainer's
        ``policy_step``).
    :raises ConfigError: ``variant`` is not ``nll`` and the model has no latent truth.
    """
    if not noise.has_truth and variant != "nll":
        raise ConfigError(
            f"{field}: the {noise.name} noise model has no latent truth, so no posterior "
            f"weight for the {variant!r} step; use 'nll'"
        )


def check_settings(
    config: TrainConfig, recipe: ModelRecipe | None
) -> tuple[PreferenceLikelihood, str]:
    """Check what needs no model and no data; the likelihood and the variant.

    :raises ConfigError: a bad prior, a prior the noise model cannot take, a loss
        option out of range, a variant other than ``nll`` or an epoch refit with a
        noise model that has no latent truth (the message names the field).
    """
    likelihood = build_likelihood(config, recipe)
    variant = policy_variant(config, likelihood)
    noise = build_noise_model(config, 1)  # the name, the prior and the starting values
    if config.em.enabled:
        check_policy_variant(noise, variant)
    estep_settings(config, likelihood, noise)  # the E-step's fields against the model
    return likelihood, variant


def data_source(config: TrainConfig, value: str, field: str = "train") -> str:
    """Where ``[data] <field> = value`` is read from: the path resolved against the
    configuration's folder when it exists (a file or a data set folder) or does not read
    as a data set name, else the name itself (``datasets.load_dataset`` finds it on the
    Hugging Face hub or in its cache).

    :raises ConfigError: a data set name with a format other than ``'trl'`` (the
        HH-RLHF and PandaLM readers take files).
    """
    local = config.path(value)
    if local.exists() or not is_dataset_name(value):
        return str(local)
    if config.data.format != "trl":
        raise ConfigError(
            f"[data] {field}: {value!r} is not a file; data set names are read with format "
            f"'trl' (prompt/chosen/rejected columns or the implicit-prompt layout), not "
            f"{config.data.format!r}"
        )
    return value


def load_records(
    config: TrainConfig,
    source: str | None = None,
    *,
    split: str | None = None,
    field: str = "train",
) -> PreferenceData:
    """The validated records of ``[data]`` (``source`` replaces ``data.train`` and
    ``split`` ``data.split``): a file, a data set folder or a data set name
    (:func:`data_source`; ``field`` names the ``[data]`` field in its errors)."""
    from repo.data.hh_rlhf import load_hh_rlhf
    from repo.data.pandalm import read_pandalm

    d = config.data
    path = source if source is not None else d.train
    resolved = data_source(config, path, field) if path else None
    split = split if split is not None else d.split
    if d.format == "hh-rlhf":
        records = load_hh_rlhf(
            resolved,
            on_invalid=d.on_invalid,
            on_empty=d.on_empty,
            on_identical=d.on_identical,
        )
    elif d.format == "pandalm":
        records = read_pandalm(
            resolved, on_invalid=d.on_invalid, on_empty=d.on_empty, duplicates=d.duplicates
        )
    else:
        if resolved is None:
            raise ConfigError("[data] train is required (a JSON, JSONL or Parquet file)")
        is_file = Path(resolved).is_file()
        records = load_preferences(
            resolved,
            split=None if is_file else split,
            prompt_column=d.prompt_column,
            chosen_column=d.chosen_column,
            rejected_column=d.rejected_column,
            annotator_column=d.annotator_column or None,
            item_column=d.item_column or None,
            position_column=d.position_column or None,
            on_invalid=d.on_invalid,
            on_empty=d.on_empty,
            on_identical=d.on_identical,
            duplicates=d.duplicates,
        )
    if d.max_records and len(records) > d.max_records:
        records = PreferenceData(
            records.records[: d.max_records], skipped=records.skipped, notes=records.notes
        )
    return records


def load_eval_records(config: TrainConfig) -> PreferenceData | None:
    """The validated held-out records of ``[data] eval`` (split ``eval_split`` for a data
    set read by name), read as the training data is; ``None`` without ``[data] eval``.
    ``max_records`` applies to the training data only."""
    if not config.data.eval:
        return None
    whole = config.replace("data", max_records=0)
    return load_records(whole, config.data.eval, split=config.data.eval_split, field="eval")


def check_trackers(config: TrainConfig) -> None:
    """Every tracker of ``[run] report_to`` has its package installed (accelerate would
    leave one out without a word).

    :raises ConfigError: naming the tracker and its package.
    """
    from accelerate.tracking import LoggerType, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in config.run.report_to:
        if str(LoggerType(name)) not in available:
            raise ConfigError(
                f"[run] report_to: the {name!r} tracker's package is not installed "
                f"(pip install {name})"
            )


def data_summary(records: PreferenceData) -> dict[str, Any]:
    """Records (pairs), items, annotators, and what was skipped by reason (the data
    before tokenisation; the run's ``data_report.json`` adds what tokenising dropped)."""
    return {
        "pairs": len(records),
        "items": len(records.items),
        "annotators": len(records.annotators),
        "skipped": dict(records.skipped),
        "notes": dict(records.notes),
    }


def dry_run(config: TrainConfig) -> dict[str, Any]:
    """``re-po train --dry-run``: check the configuration (:func:`check_settings`) and
    every row of the training and held-out data (:func:`load_records`,
    :func:`load_eval_records`); no model or tokenizer loads.

    :returns: ``{"likelihood", "variant", "noise", "train", "eval"}``, the data parts
        from :func:`data_summary` (``eval`` is ``None`` without ``[data] eval``).
    :raises ConfigError: a bad setting. :raises DataError: a bad row (training data
        first).
    """
    recipe = model_recipe(config)
    likelihood, variant = check_settings(config, recipe)
    check_trackers(config)
    records = load_records(config)
    held_out = load_eval_records(config)
    return {
        "likelihood": {"family": likelihood.name, "variant": variant, **likelihood.hparams()},
        "noise": config.noise.model,
        "train": data_summary(records),
        "eval": None if held_out is None else data_summary(held_out),
    }


# ----------------------------------------------------------------------------- the model


def _device(config: TrainConfig, device: Any) -> Any:
    if device is not None:
        return device
    return None if config.model.device == "auto" else config.model.device


def build_policy(
    config: TrainConfig, device: Any = None, *, weights: str | Path | None = None
) -> Policy:
    """The policy of ``[model]``: the recipe's network with LoRA (``use_lora``,
    ``lora_last_layers``) or every weight trainable; for full fine-tuning with a loss
    that needs a reference, a frozen copy of the recipe's network as the reference.

    :param device: where the model goes; default ``[model] device``.
    :param weights: a Hugging Face model folder (a full fine-tune's final policy) to
        load instead of the recipe's weights; the recipe still supplies the settings
        and the reference.
    """
    m = config.model
    recipe = model_recipe(config)
    device = _device(config, device)
    dtype = m.dtype or None
    checkpointing = {"auto": None, "on": True, "off": False}[m.gradient_checkpointing]
    reference_model = None
    if not m.use_lora and get_likelihood(config.loss.family).needs_reference:
        reference_model, _ = load_model_and_tokenizer(recipe, device=device, dtype=dtype)
    source = recipe
    if weights is not None:
        source = dataclasses.replace(
            recipe,
            source_kind="local",
            source=str(Path(weights).resolve()),
            package=None,
            revision=None,
        )
    lora = None
    if m.lora_last_layers:
        lora = dataclasses.replace(recipe.lora, last_layers=m.lora_last_layers)
    try:
        policy = Policy.from_recipe(
            source,
            device=device,
            dtype=dtype,
            use_lora=m.use_lora,
            lora=lora,
            gradient_checkpointing=checkpointing,
            reference_model=reference_model,
        )
    except LastLayersError as error:
        raise ConfigError(f"[model] lora_last_layers: {error}") from None
    policy.recipe = recipe
    if m.layout != "auto":
        policy.layout = m.layout
    return policy


def build_pair_tokenizer(config: TrainConfig, policy: Policy) -> PairTokenizer:
    """The policy's tokeniser with ``[model]``'s length limits (the recipe's by default)."""
    m = config.model
    recipe = policy.recipe
    max_length = m.max_length or (recipe.max_length if recipe is not None else 1024)
    min_response = m.min_response_tokens or (
        recipe.min_response_tokens if recipe is not None else 16
    )
    if policy.tokenizer is None:
        raise ConfigError("[model] the policy has no tokenizer")
    try:
        return PairTokenizer(
            policy.tokenizer,
            max_length,
            min_response_tokens=min_response,
            max_prompt_length=m.max_prompt_length or None,
            prompt_overflow=m.prompt_overflow,
        )
    except ValueError as error:
        raise ConfigError(f"[model] {error}") from None


def build_noise(config: TrainConfig, data: TrainingData) -> NoiseModel:
    """The noise model for the annotators of ``data`` at its starting values.

    :raises ConfigError: a model that reads the A/B position on labels given in both
        display orders of one item.
    """
    noise = build_noise_model(config, len(data.annotator_ids))
    reoriented = data.notes.get("reoriented_labels")
    if reoriented and noise.reads_position:
        raise ConfigError(
            f"[noise] model: the {config.noise.model} model reads the A/B position, "
            f"but {reoriented} labels were given in the other display order than their "
            "item's first row; its position parameters would mix the two orders (use the "
            "symmetric or hierarchical model, or one display order per item)"
        )
    return noise


def build_run(
    config: TrainConfig,
    *,
    device: Any = None,
    policy: Policy | None = None,
    records: PreferenceData | None = None,
) -> RunParts:
    """Every component of a run, in the order of the module docstring.

    :param device: where the model goes; default ``[model] device``.
    :param policy: a ready policy (then ``[model] recipe`` only supplies defaults).
    :param records: ready records; default: read from ``[data]``.
    """
    recipe = policy.recipe if policy is not None else model_recipe(config)
    likelihood, variant = check_settings(config, recipe)
    check_trackers(config)
    if records is None:
        records = load_records(config)
    eval_records = load_eval_records(config)
    if policy is None:
        policy = build_policy(config, device)
    elif config.model.layout != "auto":
        policy.layout = config.model.layout
    pair_tokenizer = build_pair_tokenizer(config, policy)
    data = TrainingData.build(records, pair_tokenizer, shared_truth=config.data.shared_truth)
    noise = build_noise(config, data)
    eval_data = None
    if eval_records is not None:
        eval_data = TrainingData.build(eval_records, pair_tokenizer)
    return RunParts(records, policy, likelihood, variant, pair_tokenizer, data, noise, eval_data)


# ----------------------------------------------------------------------------- training only


class EStepSettings(NamedTuple):
    """How the online EM reads the policy: the E-step's temperature, whether it learns
    its logit scale, whether the annotator parameters learn from first visits only, the
    level of the noise test that switches the posterior on (0: none), whether the
    annotator parameters are refitted on each pass's logits at its end, and the share
    of items held out of training for their refit (``[em] held_out``; 0: none), and
    whether the E-step reads cross-fitted scores (``[em] cross_fit``) and the loss
    family their scorers train with (``""`` when it does not), and whether the policy
    step's posterior reads the learned scale too (``[em] policy_calibrate``; else
    :math:`s / T`), and the folds the cross-fitted items are split in (``[em]
    cross_fit_folds``; 0 when the E-step does not read them)."""

    temperature: float
    calibrate: bool
    out_of_sample: bool
    noise_test: float = 0.0
    epoch_m_step: bool = False
    held_out: float = 0.0
    cross_fit: bool = False
    cross_fit_scorer: str = ""
    policy_calibrate: bool = True
    cross_fit_folds: int = 0


MIN_HELD_OUT = 625
r"""The fewest items ``[em] held_out = "auto"`` holds out: the held-out fit's standard
error of ``eta``, :math:`\sqrt{\eta (1 - \eta) / n}`, is then at most 0.02. With
fewer (RE-IPO at 512 pairs: 51 held-out items) the fit's own error swamps what it
fixes (``docs/experiments/held-out-labels.md``)."""


REPLACED_BY_CROSS_FIT = ("calibrate", "out_of_sample", "epoch_m_step", "held_out")
"""The ``[em]`` fields of an E-step that reads the policy's own logits: a run that sets
one of them to true does not cross-fit by default, and one that also sets ``cross_fit``
to true is refused."""


MIN_CROSS_FIT = 4096
r"""The fewest items ``[em] cross_fit = "auto"`` cross-fits: each scorer then trains on
2,048 at least. Scorers trained on few items are confidently wrong on some pairs, which
the one-annotator likelihood cannot tell from flipped labels, and how few is too few
depends on the learner more than on the data: fully fine-tuned, scorers on 256 rule
pairs each were safe and brought ``eta`` from 0.05-0.07 to within 0.03 of the truth,
but LoRA adapters on 512 pairs each put RE-DPO 0.248 below DPO on one seed of three
(``eta`` 0.69 against 0.79, its interval missing it) where the E-step reading the policy
was 0.014 below; at 128 clean pairs the noise test on their scores rejected in 4 of 20 runs
(``docs/math.md`` section 13)."""


def auto_cross_fit(
    noise: NoiseModel,
    likelihood: PreferenceLikelihood,
    num_items: int,
    passes: int,
    scorer: str = "",
    variant: str = "",
) -> bool:
    """``[em] cross_fit = "auto"``: cross-fitted E-step scores when the loss family says
    so (:attr:`~repo.likelihoods.base.PreferenceLikelihood.default_cross_fit`), ``noise`` has one
    annotator (with no disagreements between annotators to read, only the policy's
    scores tell a wrong label, and a policy that has trained on a label cannot;
    ``docs/math.md`` section 13) and a latent truth, the data have
    :data:`MIN_CROSS_FIT` items or more, and the run makes several passes, or the
    scorers train by another loss than the run's (``scorer``, ``[em]
    cross_fit_scorer``; ``""``: the family's
    :meth:`~repo.likelihoods.base.PreferenceLikelihood.cross_fit_scorer`), or the
    policy step is the mixture (``variant``, ``[loss] variant``; ``""``: the family's
    default, IPO's). In one pass every E-step reads a label the policy has not trained
    on, and first visits give ``eta`` from scores of a policy trained on all the items,
    not half; but those are the run's own loss's scores, and where the family's
    scorers are another loss's its own do not rank the pairs: CPO's SFT term clones
    the preferred response of every label, flipped ones included. At 8,192 pairs, one
    pass, ten seeds of the full fine-tune, RE-CPO's E-step reading the policy was
    0.006 ± 0.022 below CPO at flip rate 0.4 and cross-fitted by DPO's scorers 0.304 ±
    0.037 above it, ``eta`` 0.005 off on average (at 0.2 +0.221 ± 0.023, ``eta`` 0.001
    off; 4,096 pairs alike); with LoRA, whose CPO adapter learns nothing of the rule in
    one pass, the policy's scores left ``eta`` at 0.47-0.51 against a realised
    0.60-0.80 and DPO's scorers put it within 0.016 (``docs/experiments/noise-sweep.md``,
    "One pass, CPO: DPO's scorers"). And the mixture step regresses the policy onto
    targets that follow the sign of its own logit wherever the posterior reads it as
    surer than the label (``docs/math.md`` section 5), so an adapter still learning the
    rule trains on its own beliefs from the items it has not seen, one pass or
    several: with LoRA at 8,192 pairs, flip rate 0.4, one pass, ten seeds, RE-IPO
    reading the policy was 0.120 ± 0.133 below IPO (0.24 to 0.52 below at three seeds,
    where the noise test switched the posterior on) and cross-fitted +0.014 ± 0.028,
    ``eta`` 0.013 off; fully fine-tuned +0.092 ± 0.026 cross-fitted against +0.072 ±
    0.035 (``docs/experiments/one-annotator.md``, "One pass of RE-IPO with LoRA").
    DPO's "nll" step reading the policy is the marginal likelihood's gradient and
    stays (cross-fitted in one pass with LoRA it learned less of the rule: 0.06 to
    0.16 below DPO at three seeds)."""
    one = noise.num_annotators == 1 and noise.has_truth and likelihood.default_cross_fit
    other = (scorer or likelihood.cross_fit_scorer(passes)) != likelihood.name
    mixture = (variant or likelihood.default_variant) == "mixture"
    return one and num_items >= MIN_CROSS_FIT and (passes > 1 or other or mixture)


NOISE_TEST = 0.05
"""The noise test's level where ``[em] noise_test = "auto"`` reads the policy's logits
(:func:`auto_noise_test`; ``docs/math.md`` section 10)."""

CROSS_FIT_NOISE_TEST = 0.5
r"""The noise test's level where ``[em] noise_test = "auto"`` reads cross-fitted scores
in a run of several passes (:func:`auto_noise_test`): with one annotator, where the
likelihood-ratio statistic :math:`\Lambda` is above 0 at all (half a chi-square with one
degree of freedom, above 0 with probability 1/2 under "no label is wrong"), i.e. where
the maximum-likelihood fit finds any noise."""


def auto_noise_test(cross_fit: bool, num_items: int, passes: int) -> float:
    r"""``[em] noise_test = "auto"``: :data:`NOISE_TEST`, but :data:`CROSS_FIT_NOISE_TEST`
    where the E-step reads cross-fitted scores of :data:`MIN_CROSS_FIT` items or more and
    the run makes several passes (``passes``): there the posterior reaches the policy
    wherever the fit finds any noise.

    The test at 0.05 holds the posterior back from a policy that reads its own logits
    (``docs/math.md`` section 10): one still learning scores labels it has not learned
    as unlikely, right or wrong, and its ``w < 1`` would hold back exactly those.
    Cross-fitted scores are fixed before the policy's first step, by scorers that made
    the run's passes over the other folds, and the posterior they give is the one at
    the maximum-likelihood :math:`(\hat\eta, \hat a)` on every label at once (section
    13). Where the scores do not identify :math:`\eta` (its profile interval reaching
    1) the test at 0.05 cannot reject, yet that posterior still tells the flipped labels
    from the others: LoRA RE-DPO, four passes over 8,192 pairs at flip rate 0.4, gained
    +0.074, +0.004, +0.150 and +0.122 over DPO at the four seeds of fourteen whose test
    had not rejected (p 0.18, 0.08, 0.20 and 0.30; RE-DPO had trained as DPO there),
    with :math:`\hat\eta` 0.02 to 0.12 above the realised share
    (``docs/experiments/one-annotator.md``, "Scorers too weak to tell eta"). Where the
    fit finds no noise (:math:`\Lambda = 0`, the maximum at :math:`\eta = 1`) RE-X
    trains as X: every clean cross-fitted run measured at 8,192 pairs but one, full
    fine-tune and LoRA. Not testing at all would switch on there too, with :math:`w = 1`,
    which leaves DPO and IPO as they are but not CPO, whose posterior step drops its SFT
    term. Below :data:`MIN_CROSS_FIT` items a scorer is confidently wrong on enough pairs
    for clean labels to look noisy, and the test keeps :data:`NOISE_TEST`.

    In one pass the test keeps :data:`NOISE_TEST` on cross-fitted scores too. What the
    posterior of unidentified scores undoes is the plain loss's memorising of the
    flipped labels, which one pass does not do: there the labels' noise is independent
    from pair to pair and averages out, while a weak scorer's errors are shared by
    similar pairs and a policy trained on its posterior learns them. RE-IPO with LoRA,
    one pass over 8,192 pairs at flip rate 0.4 on a rule task no default was chosen on
    (8 marker words, seeds 101 to 105; scorers right on 65% of the pairs): 0.114, 0.078,
    0.002 and 0.072 below IPO at the four seeds whose test at 0.05 did not reject (p
    0.09 to 0.48), and at the one that did (p 0.015) 0.050 below; on the task of 4 marker
    words the one seed of ten not rejected (p 0.11) was 0.046 below
    (``docs/experiments/one-annotator.md``, "Another rule task"). It does not help where
    the test at 0.05 rejects on scorers that weak: with 6 marker words RE-IPO was 0.102
    and 0.098 below IPO at two seeds of five (p 0.017 and 0.002)."""
    several = passes > 1 and num_items >= MIN_CROSS_FIT
    return CROSS_FIT_NOISE_TEST if cross_fit and several else NOISE_TEST


ONE_PASS_FOLDS = 4
"""The folds ``[em] cross_fit_folds = "auto"`` splits the items of a run of one pass in
(:func:`auto_cross_fit_folds`): each scorer then trains on three quarters of them."""


def auto_cross_fit_folds(
    passes: int, scorer: PreferenceLikelihood | type[PreferenceLikelihood]
) -> int:
    r"""``[em] cross_fit_folds = "auto"``: :data:`ONE_PASS_FOLDS` in a run of one pass
    (``passes``); over several, the ``several_pass_folds`` of the loss the scorers
    train by (``scorer``: :attr:`~repo.likelihoods.base.PreferenceLikelihood.several_pass_folds`;
    two, IPO's four).

    The posterior of cross-fitted scores teaches the policy the scorers' errors as well
    as the flipped labels it finds, and a scorer's errors are shared by similar pairs,
    so the policy learns them where the labels' own noise, independent from pair to
    pair, would have averaged out. That costs where the scorers are much weaker than the
    policy the run trains: in one pass, where a policy's strength grows with the pairs
    it has seen and a scorer sees a share :math:`1 - 1/K` of them. RE-IPO with LoRA,
    one pass over 8,192 pairs at flip rate 0.4, two folds against four
    (``docs/experiments/one-annotator.md``, "Four folds in one pass"): on the task the
    defaults were chosen on (4 marker words, seeds 1 to 10) the scorers' accuracy rose
    from 0.77-0.85 to 0.85-0.92 and RE-IPO minus IPO from +0.018 ± 0.024 to +0.070 ±
    0.017 (every seed above); on tasks no default was chosen on, from -0.045 ± 0.062 to
    +0.013 ± 0.053 with 6 marker words (scorers 0.67-0.76 to 0.72-0.84) and level with 8
    (-0.010 against -0.009, scorers 0.71-0.74, where four folds' test rejects more often
    and `eta` comes from 0.080 to 0.019 off). Over several passes the scorers' loss
    decides it: more folds give each scorer more labels for more steps, and a loss that
    keeps widening the margins it has fitted learns the flipped ones among them, where
    one that regresses each margin onto a finite target does not. With 8 marker words,
    four passes, four folds of DPO's scorers left RE-DPO's ``eta`` 0.182 off on average
    (two folds: 0.031); four folds of IPO's put RE-IPO +0.076 ± 0.045 above IPO (two:
    -0.005 ± 0.015) and RE-DPO, whose scorers over several passes are IPO's
    (:meth:`~repo.likelihoods.dpo.DPOLikelihood.cross_fit_scorer`), above DPO by more
    at every seed of three tasks (``docs/experiments/one-annotator.md``, "Four folds of
    IPO's scorers over several passes")."""
    return ONE_PASS_FOLDS if passes <= 1 else scorer.several_pass_folds


MIN_PASS_REFIT = 4096
r"""The fewest items one annotator's run of one pass is refitted on at its end by
default (:func:`auto_pass_refit`). The refit reads every item's score once, so its
error shrinks with the items where the online estimate's does not (a moving average
over the last few dozen batches): RE-IPO's ``eta`` after one pass at flip rate 0.2
was 0.004 and 0.002 off refitted at 4,096 and 8,192 pairs against 0.015 and 0.022
online, fully fine-tuned, and 0.004 and 0.003 against 0.046 and 0.037 with LoRA. On
fewer items the policy the first visits see is a weak scorer, whose confident errors
one annotator's likelihood reads as flipped labels (as a cross-fitted scorer's,
:data:`MIN_CROSS_FIT`): with LoRA at 2,048 pairs the refit was 0.053 and 0.064 off
at 0.2 and 0.4 against 0.063 and 0.030 online, at 1,024 0.052 against 0.030, and fully
fine-tuned at 512 pairs 0.069 against 0.020 (below 4,096 the full fine-tune gained
from it, 0.005 against 0.022 at 2,048 pairs; the threshold holds for the weaker
learner; ``docs/experiments/noise-sweep.md``, "One pass: a refit ends it")."""


def auto_pass_refit(
    noise: NoiseModel,
    likelihood: PreferenceLikelihood,
    num_items: int,
    passes: int,
    calibrate: bool,
) -> bool:
    """One annotator's ``[em] epoch_m_step = "auto"``: a refit ending the run's only
    pass. In one pass every E-step reads a label the policy has not trained on, so the
    scores the pass read are out of sample, as cross-fitted scores are, and EM on them
    with their Platt scale learned (:meth:`~repo.inference.online.OnlineEM.fit_pass`)
    is the fit cross-fitting would make with the policy as its scorer; it comes after
    the last policy step, so it sets the ``eta`` the run reports and nothing the policy
    trained with. The default when ``noise`` has one annotator and a latent truth, the
    run makes one pass over :data:`MIN_PASS_REFIT` items or more, the E-step learns its
    scale (``calibrate``: the refit is then a Platt fit), and the family's own scores
    are those its cross-fitted scorers would give
    (:meth:`~repo.likelihoods.base.PreferenceLikelihood.cross_fit_scorer`: not CPO,
    whose logit carries its SFT term's log-probabilities; the refit put RE-CPO's
    ``eta`` 0.114 off at 8,192 pairs, flip rate 0.2, where the online update was
    0.022). ``out_of_sample``'s refit on first visits, learning its own scale, takes
    this one's place where it is on (DPO, SimPO)."""
    one = noise.num_annotators == 1 and noise.has_truth
    own = likelihood.cross_fit_scorer(passes) == likelihood.name
    return one and own and calibrate and passes == 1 and num_items >= MIN_PASS_REFIT


def auto_policy_at_temperature(
    config: TrainConfig, likelihood: PreferenceLikelihood, passes: int
) -> bool:
    r"""``[em] policy_calibrate = "auto"``'s false: the policy step's posterior reads
    :math:`s / T` while the annotator parameters read the learned :math:`a s`, when the
    step is ``"nll"`` on a family whose logit is a log-odds up to a scale
    (:attr:`~repo.likelihoods.base.PreferenceLikelihood.default_out_of_sample`: DPO,
    SimPO; at SimPO's :math:`T = 1` the step is then the gradient of the marginal
    likelihood of its own model) and the run makes one pass. In one pass every label's
    posterior is read once, at its first visit, by a policy still learning the task,
    and the scale learned on those small early scores reads them as confident (5.4
    after two steps at 512 pairs): the step then trains the policy on its own beliefs
    (``docs/math.md`` section 5). RE-SimPO with a pool of four annotators at flip rate
    0.2, 512 pairs, one pass: -0.014 ± 0.013 below SimPO with the learned scale,
    +0.003 ± 0.007 reading :math:`s` (seeds 10 to 19), and -0.008 ± 0.008 against
    +0.001 ± 0.006 on fresh seeds 20 to 29, ``eta`` the same (it reads :math:`a s`);
    holding the E-step's whole scale at 1 instead (``calibrate = false``) was level too
    but put ``eta`` 0.126 off against 0.040. Over four epochs the later passes read a
    trained policy, and the learned scale keeps more of the gain (+0.021 ± 0.012
    against +0.010 ± 0.013 at 0.2, ``eta`` 0.004 against 0.019 off;
    ``docs/experiments/noise-sweep.md``, "The policy's posterior at s / T in one
    pass")."""
    nll = policy_variant(config, likelihood) == "nll"
    return nll and likelihood.default_out_of_sample and passes == 1


def estep_settings(
    config: TrainConfig,
    likelihood: PreferenceLikelihood,
    noise: NoiseModel,
    num_items: int = 0,
    passes: int = 1,
) -> EStepSettings:
    """``[em] temperature``, ``calibrate`` and ``out_of_sample``, or their defaults where
    they are left at 0 and ``"auto"``: the loss family's
    :attr:`~repo.likelihoods.base.PreferenceLikelihood.default_temperature` and
    :attr:`~repo.likelihoods.base.PreferenceLikelihood.default_calibrate` (but no
    learned scale where the policy step is ``"nll"`` and the annotator parameters learn
    from first visits, whose refit learns a scale of its own: the E-step then reads
    :math:`s / T`, exact at SimPO's :math:`T = 1`, and the step is the gradient of the
    marginal likelihood, which never trains a pair away from its labels, where a learned
    scale above 1 would train the policy on its own beliefs), and
    out-of-sample annotator statistics when ``noise`` has one annotator (its labels
    alone do not identify its reliability: only the policy's scores of labels it has
    not trained on do, docs/math.md section 9) and the family's
    :attr:`~repo.likelihoods.base.PreferenceLikelihood.default_out_of_sample` says so.
    ``[em] noise_test``'s default: :func:`auto_noise_test`. ``[em] policy_calibrate``'s
    default: the policy step's posterior reads the learned scale too, but where
    :func:`auto_policy_at_temperature` says it reads :math:`s / T` (a learned scale, the
    ``"nll"`` step on a log-odds logit, one pass). ``[em] epoch_m_step``'s default: the refit on
    each pass's logits when ``noise`` has several annotators (whose disagreements the
    refit reads with every label at once), or one in a run of one pass that
    :func:`auto_pass_refit` says so for, and the annotator parameters do not learn
    from first visits (whose own refit takes its place). ``[em] held_out``'s default:
    with one annotator when the family's
    :attr:`~repo.likelihoods.base.PreferenceLikelihood.default_held_out` says so,
    ``held_out_share`` of the ``num_items`` items is at least :data:`MIN_HELD_OUT`, and
    the run makes more than one pass over the data (``passes``: the held-out refit sets
    ``eta`` for the E-steps of the passes after it; in one pass it would only change the
    reported ``eta``, at the cost of the held-out labels); the share held out is
    ``held_out_share``, 0 when off or EM is. With ``[em] cross_fit`` (its default
    :func:`auto_cross_fit`) the E-step reads fixed cross-fitted scores at a scale fitted
    to them, so none of these applies: no learned scale, no out-of-sample statistics,
    no refit and nothing held out; the noise test, where there is one, is taken once, on
    those scores; the scorers train by ``[em] cross_fit_scorer``, by default the family's
    :meth:`~repo.likelihoods.base.PreferenceLikelihood.cross_fit_scorer`. A
    noise model without a latent
    truth has no E-step to tune: its defaults are 1, false and false, no noise test and
    no refit."""
    em = config.em
    if not noise.has_truth:
        if em.held_out is True and em.enabled:
            raise ConfigError(
                f"[em] held_out: the {noise.name} noise model has no latent truth to refit "
                "on the held-out scores (leave it 'auto' or false)"
            )
        if em.epoch_m_step is True and em.enabled:
            raise ConfigError(
                f"[em] epoch_m_step: the {noise.name} noise model has no latent truth to "
                "refit on the scores (leave it 'auto' or false)"
            )
        if em.cross_fit is True and em.enabled:
            raise ConfigError(
                f"[em] cross_fit: the {noise.name} noise model has no latent truth for the "
                "cross-fitted scores to inform (leave it 'auto' or false)"
            )
        return EStepSettings(em.temperature or 1.0, em.calibrate is True, em.out_of_sample is True)
    temperature = em.temperature or likelihood.default_temperature
    # what the E-step's reading of the policy's own logits needs, asked for by name
    chosen = [name for name in REPLACED_BY_CROSS_FIT if getattr(em, name) is True]
    scorer = em.cross_fit_scorer.strip().lower() or likelihood.cross_fit_scorer(passes)
    variant = policy_variant(config, likelihood)
    if em.cross_fit == "auto":
        cross_fit = auto_cross_fit(noise, likelihood, num_items, passes, scorer, variant)
        cross_fit = cross_fit and not chosen
    else:
        cross_fit = bool(em.cross_fit)
    crossed = cross_fit and em.enabled
    auto = em.noise_test == "auto"
    test = auto_noise_test(crossed, num_items, passes) if auto else em.noise_test
    if crossed:  # the E-step reads fixed scores: nothing else to tune
        if chosen:
            raise ConfigError(
                f"[em] cross_fit: the E-step reads the folds' fixed scores, so "
                f"{', '.join(chosen)} cannot apply (set it 'auto' or false, or cross_fit "
                "false)"
            )
        folds = em.cross_fit_folds
        if folds == "auto":  # the scorers' loss: the run's own, or a registered family
            family = likelihood if scorer == likelihood.name else LIKELIHOODS[scorer]
            folds = auto_cross_fit_folds(passes, family)
        if 0 < num_items < folds:  # 0: not known yet (the fields' check at build time)
            raise ConfigError(
                f"[em] cross_fit_folds: {folds} folds of {num_items} items would leave a "
                "fold without items to score"
            )
        return EStepSettings(
            temperature, False, False, test, False, 0.0, True, scorer, cross_fit_folds=folds
        )  # fmt: skip
    if em.out_of_sample == "auto":
        out_of_sample = noise.num_annotators == 1 and likelihood.default_out_of_sample
    else:
        out_of_sample = bool(em.out_of_sample)
    if em.calibrate == "auto":
        # the "nll" step with first-visit annotator statistics: the refit on first visits
        # learns a scale of its own, and a learned E-step scale above 1 would make the
        # step train the policy on its own beliefs (docs/math.md, section 5)
        fixed = out_of_sample and variant == "nll"
        calibrate = likelihood.default_calibrate and not fixed
    else:
        calibrate = bool(em.calibrate)
    if em.policy_calibrate == "auto":
        at_temperature = auto_policy_at_temperature(config, likelihood, passes)
        policy_calibrate = not (calibrate and at_temperature)
    else:
        policy_calibrate = bool(em.policy_calibrate)
    if em.epoch_m_step == "auto":
        one_pass = auto_pass_refit(noise, likelihood, num_items, passes, calibrate)
        epoch_m_step = (noise.num_annotators > 1 or one_pass) and not out_of_sample
    else:
        epoch_m_step = bool(em.epoch_m_step)
    if em.held_out == "auto":
        enough = em.held_out_share * num_items >= MIN_HELD_OUT and passes > 1
        held_out = noise.num_annotators == 1 and likelihood.default_held_out and enough
    else:
        held_out = bool(em.held_out)
    share = em.held_out_share if held_out and em.enabled else 0.0
    return EStepSettings(
        temperature,
        calibrate,
        out_of_sample,
        test,
        epoch_m_step,
        share,
        policy_calibrate=policy_calibrate,
    )


def build_online_em(
    config: TrainConfig,
    noise: NoiseModel,
    likelihood: PreferenceLikelihood,
    label_counts: torch.Tensor | None = None,
    num_items: int | None = None,
    labels: LabelData | None = None,
    passes: int = 1,
    pass_size: int | Sequence[int] | None = None,
    settings: EStepSettings | None = None,
) -> OnlineEM:
    """The online EM of ``[em]`` around ``noise`` for the loss family ``likelihood``
    (:func:`estep_settings`; ``label_counts``: labels per annotator in the whole data,
    which scale a prior's weight; ``num_items``: items in the data, needed for
    out-of-sample annotator statistics; ``labels``: the whole data's labels, keyed as
    the E-step's, needed for the noise test: without them, as when a run's fit is
    read back, there is none; ``passes`` and ``pass_size``: the run's passes over the
    data and the units each visits (one number, or one a pass), which place the noise
    test's looks; ``settings``:
    the E-step settings the caller already resolved, by default :func:`estep_settings`
    of ``config``)."""
    em = config.em
    settings = settings or estep_settings(config, likelihood, noise)
    test = settings.noise_test if em.enabled and labels is not None else 0.0
    held_out = settings.held_out > 0 and em.enabled
    if held_out and labels is not None and passes < 2:
        trained = "all labels" if em.train_held_out else "the other labels"
        warnings.warn(
            "[em] held_out with one pass over the data: the first fit on the held-out "
            "labels comes at the end of the pass, and the posterior waits for it, so "
            f"the policy trains on {trained} as given (RE-X is X on them) and the "
            "held-out fit only sets the reported eta; train several epochs, or set "
            "[em] held_out = false",
            UserWarning,
            stacklevel=2,
        )
    return OnlineEM(
        noise,
        alpha=em.alpha,
        label_counts=label_counts,
        temperature=settings.temperature,
        warmup_steps=em.warmup_steps,
        noise_lr=em.noise_lr,
        calibrate=settings.calibrate,
        policy_calibrate=settings.policy_calibrate,
        out_of_sample=settings.out_of_sample and em.enabled,
        num_items=num_items,
        noise_test=test,
        labels=labels,
        passes=passes,
        pass_size=pass_size,
        pass_refit=settings.epoch_m_step and em.enabled and bool(num_items),
        held_out=held_out,
    )


def build_held_out(config: TrainConfig, data: TrainingData, share: float) -> Tensor | None:
    """The items of ``data`` whose labels the policy never trains on: ``share`` of
    them (``[em] held_out`` as :func:`estep_settings` resolves it), drawn from ``[run]
    seed`` (:func:`~repo.train.dataset.held_out_items`); ``None`` when ``share`` is 0.

    :raises ConfigError: the share leaves no item to train on."""
    if share == 0:
        return None
    items = held_out_items(len(data.pairs), share, config.run.seed)
    if len(items) >= len(data.pairs):
        raise ConfigError(
            f"[em] held_out_share = {share} of {len(data.pairs)} items leaves none to train on"
        )
    return items


def build_schedule(
    config: TrainConfig,
    data: TrainingData,
    processes: int,
    held_out: Tensor | None = None,
) -> BatchSchedule:
    """The order of ``data``'s truth units over optimizer steps (``[optim]`` batches,
    ``[run] seed``), the units of the ``held_out`` items left out: of every epoch, or
    with ``[em] train_held_out`` of every epoch but the run's last (``[optim] epochs``,
    or the epoch in which ``max_steps`` falls)."""
    o = config.optim
    units = None
    if held_out is not None:
        units = torch.isin(data.labels.unit, held_out).nonzero().reshape(-1)
    schedule = BatchSchedule(
        num_units=data.num_units,
        batch_size=o.batch_size,
        accumulation=o.gradient_accumulation_steps,
        world_size=processes,
        seed=config.run.seed,
        held_out=units,
    )
    if units is None or not config.em.train_held_out:
        return schedule
    epochs = math.ceil(o.max_steps / schedule.steps_per_epoch) if o.max_steps else o.epochs
    return dataclasses.replace(schedule, train_held_out_from=epochs - 1)


def run_steps(config: TrainConfig, schedule: BatchSchedule) -> int:
    """The run's optimizer steps: ``[optim] max_steps``, or the steps of ``[optim]
    epochs`` epochs of ``schedule`` (:meth:`~repo.train.dataset.BatchSchedule.steps_for`)."""
    return config.optim.max_steps or schedule.steps_for(config.optim.epochs)


def build_optimizer(config: TrainConfig, policy: Policy, device: torch.device):
    """AdamW of ``[optim]`` over the policy's trainable parameters (fused on CUDA with
    ``implementation = "auto"``, foreach elsewhere)."""
    o = config.optim
    params = policy.trainable_parameters()
    if not params:
        raise ConfigError("[model] the policy has no trainable parameters")
    kind = o.implementation
    if kind == "auto":
        kind = "fused" if torch.device(device).type == "cuda" else "foreach"
    return torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
        weight_decay=o.weight_decay,
        fused=kind == "fused",
        foreach=kind == "foreach",
    )


def build_scheduler(config: TrainConfig, optimizer, total_steps: int):
    """The learning-rate schedule of ``[optim]`` (linear warm-up, then transformers'
    ``lr_scheduler``)."""
    from transformers import get_scheduler

    o = config.optim
    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * total_steps)
    return get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


def build_reference(
    config: TrainConfig,
    parts: RunParts,
    *,
    progress: bool = False,
    data: TrainingData | None = None,
) -> ReferenceLogps | None:
    """The reference log-probs of every item of ``data`` (default the training data),
    computed once and cached (:func:`build_reference_cache`); ``None`` when the family
    needs no reference or ``[model] reference = "on-the-fly"`` (the policy's reference
    runs every step)."""
    if not parts.likelihood.needs_reference or config.model.reference == "on-the-fly":
        return None
    data = data if data is not None else parts.data
    return build_reference_cache(config).get_or_compute(
        parts.policy, data.pairs, batch_size=config.optim.batch_size, progress=progress
    )


def build_reference_cache(config: TrainConfig) -> ReferenceCache:
    """The reference log-prob cache: ``[model] reference_cache_dir``, or the run
    directory's."""
    folder = config.model.reference_cache_dir
    if folder:
        return ReferenceCache(config.path(folder))
    return ReferenceCache(RunDir(config.output_dir).reference_cache)


# ----------------------------------------------------------------------------- a finished run


def build_trained_policy(config: TrainConfig, run: RunDir, device: Any = None) -> Policy:
    """The final policy of a finished run, built as the run built it.

    LoRA: the recipe's network with the run's adapter layout, the adapter's weights
    from ``adapter/``; full fine-tuning: the network of ``model/`` (and the recipe's as
    the reference, when the loss needs one).

    :raises FileNotFoundError: the run has no final policy (it did not finish).
    """
    seed_everything(config.run.seed)
    if config.model.use_lora:
        policy = build_policy(config, device)
        run.load_final_adapter(policy)
        return policy
    return build_policy(config, device, weights=run.final_model())


def build_trained_noise_fit(run: RunDir, *, posterior: bool = True) -> NoiseFit:
    """A finished run's final noise model as a :class:`~repo.fit.NoiseFit` with its
    live objects: the run's noise model at the trained parameters (the online EM's
    final state), the labels with the final policy's logits (``posteriors.jsonl``)
    and, with ``posterior``, EM's Laplace approximation at those parameters. No EM
    is run: the estimates are the ones the run wrote (:meth:`RunDir.read_noise_fit`).

    :raises FileNotFoundError: the run has no final state or posteriors.
    """
    config = run.read_config()
    annotator_ids = run.read_annotators()
    noise = build_noise_model(config, len(annotator_ids))
    likelihood = build_likelihood(config, None)  # the family's E-step settings
    state = run.read_noise_state()
    first_visits = state.get("first_visit.logits")
    num_items = None if first_visits is None else first_visits.numel()
    build_online_em(config, noise, likelihood, num_items=num_items).load_state_dict(state)
    return scored_fit(
        noise,
        run.read_posteriors(),
        annotator_ids,
        shared_truth=config.data.shared_truth,
        prior=config.noise.prior,
        posterior=posterior,
    )
