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
