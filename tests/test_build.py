"""The construction layer (repo.train.build): one place builds a run's parts, and what
needs no model is checked before a model loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from _helpers import tiny_config, write_jsonl

from repo.data.errors import DataError
from repo.data.rule_pairs import rule_pairs
from repo.noise import NOISE_MODELS
from repo.train import ConfigError, TrainConfig, Trainer, evaluate_run
from repo.train.build import build_noise_model, build_run, check_settings, model_recipe


def config(tmp_path: Path, **sections) -> TrainConfig:
    """The tiny-model configuration, 2 steps unless ``sections`` say otherwise."""
    return tiny_config(tmp_path, max_steps=2, **sections)


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def bad_rows() -> list[dict]:
    rows = [dict(r) for r in rule_pairs(12, [1.0], seed=0).rows]
    rows[7]["annotator"] = None
    return rows


def test_a_bad_data_row_stops_training_before_the_model_loads(tmp_path, no_model):
    write_jsonl(tmp_path / "data.jsonl", bad_rows())
    with pytest.raises(DataError) as info:
        Trainer(config(tmp_path))
    assert (info.value.row, info.value.field) == (7, "annotator")


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"noise": {"prior": "beta:1"}}, r"\[noise\] prior: prior must be 'beta:A,B'"),
        ({"noise": {"model": "hierarchical", "prior": "beta:2,1"}}, r"\[noise\] the hierarchical"),
        ({"noise": {"model": "boltzmann"}, "loss": {"variant": "mixture"}}, r"\[loss\] variant"),
        ({"model": {"recipe": "no-such-recipe"}}, r"\[model\] recipe"),
    ],
)
def test_a_bad_setting_stops_training_before_the_data_and_the_model(
    tmp_path, no_model, sections, message
):
    # the data file is broken too: the setting is reported first
    write_jsonl(tmp_path / "data.jsonl", bad_rows())
    with pytest.raises(ConfigError, match=message):
        Trainer(config(tmp_path, **sections))


def test_eval_checks_every_row_before_the_model_loads(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", rule_pairs(16, [0.9], seed=1).rows)
    Trainer(config(tmp_path)).train()
    write_jsonl(tmp_path / "held.jsonl", bad_rows())

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(DataError) as info:
        evaluate_run(tmp_path / "run", tmp_path / "held.jsonl")
    assert info.value.row == 7


@pytest.mark.parametrize("name", list(NOISE_MODELS))
def test_the_noise_model_starts_at_eta_init(tmp_path, name):
    """One constructor contract from [noise] eta_init to each model's starting values
    (NoiseModel.build), shared with re-po fit-noise."""
    cfg = config(tmp_path, noise={"model": name, "eta_init": 0.7})
    if name == "glad":  # a parameter per item: the trainer gives annotator counts only
        with pytest.raises(ConfigError, match="number of items"):
            build_noise_model(cfg, 3)
        return
    noise = build_noise_model(cfg, 3)
    params = {k: v.detach() for k, v in noise.annotator_parameters().items()}
    if name in ("symmetric", "two-coin"):
        assert all(torch.allclose(v, torch.full_like(v, 0.7)) for v in params.values())
    elif name == "spammer":
        assert torch.allclose(params["theta"], torch.full((3,), 0.7, dtype=torch.float64))
    elif name == "hierarchical":
        assert float(noise.population_parameters()["mu"]) == pytest.approx(math.log(0.7 / 0.3))
    else:
        assert torch.allclose(params["tau"], torch.ones(3, dtype=torch.float64))


def test_fit_noise_starts_where_training_starts(monkeypatch):
    """repo.fit builds its noise model through the same contract and eta_init."""
    import repo.fit

    seen = {}
    original = repo.fit.make_noise_model

    def spy(name, sizes, prior=None, **kwargs):
        seen.update(kwargs)
        model = original(name, sizes, prior, **kwargs)
        seen["mu"] = float(model.mu.detach())
        return model

    monkeypatch.setattr(repo.fit, "make_noise_model", spy)
    table = {"annotator": ["a", "b", "a", "b"], "item": ["1", "1", "2", "2"], "label": [1, 1, 0, 0]}
    repo.fit.fit_noise(table, format="binary", model="hierarchical", eta_init=0.8, max_iter=2)
    assert seen == {"eta_init": 0.8, "mu": pytest.approx(math.log(0.8 / 0.2))}


def test_build_run_gives_every_part(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", rule_pairs(16, [0.9, 0.8], seed=2).rows)
    cfg = config(tmp_path, model={"lora_last_layers": 1}, loss={"family": "ipo", "beta": 0.0})
    likelihood, variant = check_settings(cfg, model_recipe(cfg))
    parts = build_run(cfg, device="cpu")
    assert parts.likelihood.name == likelihood.name == "ipo" and parts.variant == variant
    assert parts.likelihood.hparams() == likelihood.hparams()
    assert parts.likelihood.beta == model_recipe(cfg).beta_for("ipo")  # [loss] beta = 0
    assert len(parts.records) == 16 and parts.data.labels.num_labels == 16
    assert parts.noise.num_annotators == 2 and parts.pair_tokenizer.max_length == 64
    trained = {
        n.split(".layers.")[1].split(".")[0] for n, _ in parts.policy.named_trainable_parameters()
    }
    assert trained == {str(parts.policy.lm.config.num_hidden_layers - 1)}  # the last block only


@pytest.mark.parametrize(
    ("family", "em", "noise", "expected"),
    [
        ("dpo", {}, "symmetric", (1.0, False)),  # likelihood-style: the scale is its own
        ("ipo", {}, "symmetric", (1.0, True)),  # surrogates: the scale is learned
        ("simpo", {}, "symmetric", (1.0, True)),
        ("cpo", {}, "symmetric", (50.0, True)),  # summed log-probs: the scale starts at 1/50
        ("ipo", {"temperature": 20.0, "calibrate": False}, "symmetric", (20.0, False)),
        ("dpo", {"calibrate": True}, "symmetric", (1.0, True)),
        ("ipo", {}, "boltzmann", (1.0, False)),  # no latent truth, no E-step to tune
    ],
)
def test_the_e_step_settings_are_the_family_defaults_unless_given(
    tmp_path, family, em, noise, expected
):
    from repo.likelihoods import get_likelihood
    from repo.train.build import build_online_em, estep_settings

    cfg = config(tmp_path, loss={"family": family}, em=em, noise={"model": noise})
    likelihood = get_likelihood(family)
    assert likelihood.default_calibrate is not likelihood.likelihood_style
    model = build_noise_model(cfg, 2)
    assert estep_settings(cfg, likelihood, model)[:2] == expected
    online = build_online_em(cfg, model, likelihood)
    assert (online.temperature, online.calibrate) == expected


@pytest.mark.parametrize(
    ("annotators", "sections", "calibrate"),
    [
        (1, {}, False),  # the "nll" step from first visits: the exact E-step
        (1, {"loss": {"variant": "mixture"}}, True),  # SimPO's margin: a scale learned
        (1, {"em": {"out_of_sample": False}}, True),  # eta from every visit's scale
        (1, {"em": {"calibrate": True}}, True),  # as given
        (2, {}, True),  # several annotators' online update reads the E-step's scale
    ],
)
def test_simpo_learns_no_scale_where_its_step_is_exact(tmp_path, annotators, sections, calibrate):
    from repo.likelihoods import get_likelihood
    from repo.train.build import build_online_em, estep_settings

    loss = {"family": "simpo", **sections.get("loss", {})}
    em = {"cross_fit": False, **sections.get("em", {})}  # the E-step reading the policy
    cfg = config(tmp_path, loss=loss, em=em)
    likelihood, model = get_likelihood("simpo"), build_noise_model(cfg, annotators)
    assert likelihood.default_variant == "nll" and likelihood.default_calibrate
    assert estep_settings(cfg, likelihood, model).calibrate is calibrate
    online = build_online_em(cfg, model, likelihood, num_items=10)
    assert online.calibrate is calibrate
    # the policy step is the exact one at scale 1, or with its posterior at s / T, T = 1
    assert online.exact is (not calibrate or online.policy_at_temperature)


@pytest.mark.parametrize(
    ("family", "annotators", "passes", "em", "policy_calibrate"),
    [
        ("simpo", 3, 1, {}, False),  # one pass of a pool: the policy reads s / T
        ("simpo", 3, 4, {}, True),  # several: the later passes read a trained policy
        ("simpo", 1, 1, {}, True),  # no scale learned (first visits): nothing to split
        ("simpo", 3, 1, {"policy_calibrate": True}, True),  # as given
        ("simpo", 3, 4, {"policy_calibrate": False}, False),
        ("dpo", 3, 1, {"calibrate": True}, False),  # a log-odds logit, the "nll" step
        ("ipo", 3, 1, {}, True),  # the mixture step
        ("cpo", 3, 1, {}, True),  # "nll", but its logit carries the SFT term's log-probs
    ],
)
def test_one_pass_of_the_nll_step_hands_the_policy_its_posterior_at_s_over_t(
    tmp_path, family, annotators, passes, em, policy_calibrate
):
    from repo.likelihoods import get_likelihood
    from repo.train.build import build_online_em, estep_settings

    cfg = config(tmp_path, loss={"family": family}, em={"cross_fit": False, **em})
    likelihood, model = get_likelihood(family), build_noise_model(cfg, annotators)
    settings = estep_settings(cfg, likelihood, model, 64, passes)
    assert settings.policy_calibrate is policy_calibrate
    online = build_online_em(cfg, model, likelihood, num_items=64, settings=settings)
    assert online.policy_at_temperature is (settings.calibrate and not policy_calibrate)


def test_policy_calibrate_takes_true_false_or_auto(tmp_path):
    assert config(tmp_path).em.policy_calibrate == "auto"
    with pytest.raises(ConfigError, match=r"\[em\] policy_calibrate must be one of 'auto'"):
        config(tmp_path, em={"policy_calibrate": "yes"})


@pytest.mark.parametrize(
    ("family", "annotators", "noise", "given", "expected"),
    [
        ("dpo", 1, "symmetric", "auto", True),  # one annotator: only unseen labels tell
        ("dpo", 2, "symmetric", "auto", False),  # several: their agreement does
        ("dpo", 1, "two-coin", "auto", True),
        ("dpo", 1, "boltzmann", "auto", False),  # no latent truth, no first-visit posterior
        ("simpo", 1, "symmetric", "auto", True),  # a Bradley-Terry log-odds, shifted
        ("ipo", 1, "symmetric", "auto", False),  # a surrogate's scores are not Platt-shaped
        ("cpo", 1, "symmetric", "auto", False),
        ("dpo", 1, "symmetric", False, False),
        ("cpo", 3, "symmetric", True, True),
    ],
)
def test_out_of_sample_statistics_are_the_default_for_one_annotator(
    tmp_path, family, annotators, noise, given, expected
):
    from repo.likelihoods import get_likelihood
    from repo.train.build import build_online_em, estep_settings

    em = {"out_of_sample": given, "enabled": True, "cross_fit": False}
    cfg = config(tmp_path, em=em, noise={"model": noise})
    model = build_noise_model(cfg, annotators)
    likelihood = get_likelihood(family)
    assert likelihood.default_out_of_sample is (likelihood.likelihood_style or family == "simpo")
    assert estep_settings(cfg, likelihood, model).out_of_sample is expected
    online = build_online_em(cfg, model, likelihood, num_items=10)
    assert online.out_of_sample is expected
    # the noise test needs the labels: without them (a run's fit read back) there is none
    assert online.noise_test == 0 and online.noise_evident
    settings = estep_settings(cfg, likelihood, model)
    assert settings.noise_test == (0.05 if model.has_truth else 0.0)
    disabled = config(tmp_path, em={"out_of_sample": given, "enabled": False})
    assert not build_online_em(disabled, model, likelihood, num_items=10).out_of_sample


@pytest.mark.parametrize(
    ("family", "annotators", "noise", "em", "expected"),
    [
        ("dpo", 3, "symmetric", {}, True),  # several annotators: refit on each pass's scores
        ("cpo", 2, "two-coin", {}, True),
        ("dpo", 1, "symmetric", {}, False),  # one: first visits' refit (out_of_sample) instead
        ("ipo", 1, "symmetric", {}, False),  # one, in-sample scores: eta not identified
        ("dpo", 3, "symmetric", {"out_of_sample": True}, False),  # the first visits' refit
        ("dpo", 1, "symmetric", {"epoch_m_step": True, "out_of_sample": False}, True),
        ("dpo", 3, "symmetric", {"epoch_m_step": False}, False),
        ("dpo", 3, "boltzmann", {}, False),  # no latent truth
    ],
)
def test_the_refit_after_each_pass_is_the_default_with_several_annotators(
    tmp_path, family, annotators, noise, em, expected
):
    from repo.likelihoods import get_likelihood
    from repo.train.build import build_online_em, estep_settings

    cfg = config(tmp_path, em={"enabled": True, **em}, noise={"model": noise})
    model = build_noise_model(cfg, annotators)
    likelihood = get_likelihood(family)
    assert estep_settings(cfg, likelihood, model).epoch_m_step is expected
    assert build_online_em(cfg, model, likelihood, num_items=10).pass_refit is expected
    disabled = config(tmp_path, em={"enabled": False, **em}, noise={"model": noise})
    assert not build_online_em(disabled, model, likelihood, num_items=10).pass_refit


def test_epoch_m_step_takes_true_false_or_auto(tmp_path):
    assert config(tmp_path).em.epoch_m_step == "auto"
    with pytest.raises(ConfigError, match=r"\[em\] epoch_m_step must be one of 'auto'"):
        config(tmp_path, em={"epoch_m_step": "yes"})
    boltzmann = config(tmp_path, em={"epoch_m_step": True}, noise={"model": "boltzmann"})
    from repo.likelihoods import get_likelihood
    from repo.train.build import estep_settings

    with pytest.raises(ConfigError, match=r"\[em\] epoch_m_step: the boltzmann noise model"):
        estep_settings(boltzmann, get_likelihood("dpo"), build_noise_model(boltzmann, 2))
    from repo.train.build import check_settings

    nll = boltzmann.replace("loss", variant="nll")
    with pytest.raises(ConfigError, match=r"\[em\] epoch_m_step"):  # before any model loads
        check_settings(nll, None)


def test_out_of_sample_takes_true_false_or_auto(tmp_path):
    assert config(tmp_path).em.out_of_sample == "auto"
    with pytest.raises(ConfigError, match=r"\[em\] out_of_sample must be one of 'auto'"):
        config(tmp_path, em={"out_of_sample": "yes"})


def test_calibrate_takes_true_false_or_auto(tmp_path):
    assert config(tmp_path).em.calibrate == "auto" and config(tmp_path).em.temperature == 0
    assert config(tmp_path, em={"calibrate": True}).em.calibrate is True
    with pytest.raises(ConfigError, match=r"\[em\] calibrate must be one of 'auto', true, false"):
        config(tmp_path, em={"calibrate": "yes"})
    with pytest.raises(ConfigError, match=r"\[em\] calibrate"):
        config(tmp_path, em={"calibrate": 1})
    with pytest.raises(ConfigError, match=r"\[em\] temperature must be >= 0"):
        config(tmp_path, em={"temperature": -1.0})
