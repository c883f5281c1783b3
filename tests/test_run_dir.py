"""The run directory (repo.train.run_dir.RunDir): what a run writes, and reading it back
with ``re-po eval`` and ``re-po export`` for LoRA runs and full fine-tunes."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers import tiny_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import repo
from repo.cli import main
from repo.data.loaders import load_preferences
from repo.data.rule_pairs import rule_pairs
from repo.train import RunDir, TrainConfig, Trainer, evaluate_run, export_run
from repo.train.evaluate import load_run

ROOT = Path(repo.__file__).resolve().parent


def config(tmp_path: Path, **sections) -> TrainConfig:
    """The tiny-model configuration, 3 steps unless ``sections`` say otherwise."""
    return tiny_config(tmp_path, max_steps=3, **sections)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A finished full fine-tune (DPO: a frozen reference model beside the policy)."""
    tmp_path = tmp_path_factory.mktemp("full")
    write_jsonl(tmp_path / "data.jsonl", rule_pairs(24, [0.95, 0.7], seed=4).rows)
    write_jsonl(tmp_path / "held.jsonl", rule_pairs(16, [1.0], seed=5).rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(config(tmp_path, model={"use_lora": False}))
    trainer.train()
    torch.set_num_threads(threads)
    return tmp_path, trainer


def test_a_full_fine_tune_leaves_a_hugging_face_model_folder(full_run):
    tmp_path, trainer = full_run
    run = RunDir(tmp_path / "run")
    assert run.final_model() == run.model and not run.adapter.exists()
    model = AutoModelForCausalLM.from_pretrained(run.model)
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    assert tokenizer.pad_token_id == trainer.policy.tokenizer.pad_token_id
    trained = trainer.policy.lm.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    # the weights moved: the final policy is not the recipe's model
    start = AutoModelForCausalLM.from_pretrained(trainer.policy.recipe.source)
    assert any(
        not torch.equal(start.state_dict()[n], v)
        for n, v in loaded.items()
        if v.is_floating_point()
    )


def test_eval_and_export_read_a_full_fine_tune(full_run, capsys):
    tmp_path, trainer = full_run
    held = tmp_path / "held.jsonl"
    assert main(["eval", str(tmp_path / "run"), "--data", str(held)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = trainer.evaluate(load_preferences(str(held), annotator_column="annotator"))
    assert result["labels"] == 16
    # the same policy and reference, loaded from the run: equal up to float32 rounding
    # (a few units in the last place, from kernels that order their sums differently
    # for a freshly loaded model; a drifted build differs in the first digits)
    for key in ("accuracy", "margin", "log_loss", "ece"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    # the reference is the recipe's model, as in training: not the trained policy
    _, policy, _ = load_run(tmp_path / "run")
    assert policy.reference_model is not None and not policy.has_adapter
    assert main(["export", str(tmp_path / "run"), "--mode", "filter"]) == 0
    posteriors = RunDir(tmp_path / "run").read_posteriors()
    kept = (tmp_path / "run" / "export-filter.jsonl").read_text().splitlines()
    assert len(posteriors) == 24 and len(kept) == sum(p["w"] >= 0.5 for p in posteriors)


def test_eval_rebuilds_a_lora_run_with_its_last_layers(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", rule_pairs(24, [0.95, 0.7], seed=4).rows)
    cfg = config(tmp_path, model={"lora_last_layers": 1}, loss={"family": "ipo", "beta": 0.5})
    trainer = Trainer(cfg)
    trainer.train()
    _, policy, likelihood = load_run(tmp_path / "run")
    assert likelihood.hparams() == trainer.likelihood.hparams()
    mine = dict(policy.named_trainable_parameters())
    theirs = dict(trainer.policy.named_trainable_parameters())
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=0)
    records = load_preferences(str(tmp_path / "data.jsonl"), annotator_column="annotator")
    result = evaluate_run(tmp_path / "run", tmp_path / "data.jsonl")
    assert result["accuracy"] == pytest.approx(trainer.evaluate(records)["accuracy"])


def test_an_unfinished_run_has_no_final_policy(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", rule_pairs(16, [0.9], seed=1).rows)
    trainer = Trainer(config(tmp_path))
    trainer.train()
    run = RunDir(tmp_path / "run")
    assert run.finished() and run.has_posteriors()
    assert run.read_annotators() == ["a0"]
    saved = run.read_config()  # absolute paths, the rest as configured
    assert saved.data.train == str(tmp_path / "data.jsonl")
    assert saved.output_dir == run.path
    assert saved.replace("data", train="data.jsonl").replace("run", output_dir="run").to_dict() == (
        trainer.config.to_dict()
    )
    assert run.read_data_report()["labels"] == 16
    assert run.read_reliability()["annotators"][0]["n_labels"] == 16
    assert set(run.read_noise_state()) == set(trainer.em.state_dict())
    shutil.rmtree(run.adapter)  # as if killed before the end
    run.reliability_file.unlink()
    run.posteriors_file.unlink()
    with pytest.raises(FileNotFoundError, match="no final adapter"):
        evaluate_run(run.path, tmp_path / "data.jsonl")
    with pytest.raises(FileNotFoundError, match="posteriors.jsonl does not exist"):
        export_run(run.path)
    with pytest.raises(FileNotFoundError, match="no final model"):
        run.final_model()
    assert not RunDir(tmp_path / "elsewhere").holds_run()
    with pytest.raises(FileNotFoundError, match="not a re-po run directory"):
        RunDir(tmp_path / "elsewhere").read_config()


RUN_FILES = {
    "data_report.json",
    "annotators.json",
    "metrics.jsonl",
    "annotators.jsonl",
    "noise.safetensors",
    "reliability.json",
    "posteriors.jsonl",
    "checkpoints",
    "reference-cache",
}


def test_only_the_run_directory_type_names_the_run_files():
    """No module but repo/train/run_dir.py spells a run file's name as a string
    (repo/train/checkpoint.py names the files inside one checkpoint folder)."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).as_posix() in ("train/run_dir.py", "train/checkpoint.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RUN_FILES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_the_final_noise_model_is_a_noise_fit_that_diagnose_reads_without_refitting(
    tmp_path, monkeypatch
):
    import repo.fit
    from repo.diagnostics.io import load_run as load_for_diagnosis
    from repo.fit import NoiseFit

    write_jsonl(tmp_path / "data.jsonl", rule_pairs(32, [0.95, 0.8, 0.6], seed=6).rows)
    trainer = Trainer(config(tmp_path, optim={"max_steps": 4}, noise={"prior": "beta:4,1.5"}))
    trainer.train()
    run = RunDir(tmp_path / "run")
    fit = NoiseFit.load(run.noise_fit)
    assert (fit.model, fit.format, fit.prior) == ("symmetric", "scored", "beta:4,1.5")
    assert fit.annotators["id"].tolist() == trainer.data.annotator_ids
    assert fit.annotators["eta"].to_numpy() == pytest.approx(trainer.noise.eta.detach().numpy())
    posteriors = {p["row"]: p["w"] for p in run.read_posteriors()}
    assert dict(zip(fit.labels["row"], fit.labels["w"], strict=True)) == pytest.approx(posteriors)

    def refuse(*args, **kwargs):
        raise AssertionError("EM was run again")

    monkeypatch.setattr(repo.fit, "fit_em", refuse)
    diagnosed = load_for_diagnosis(run.path)
    for annotator, eta in zip(diagnosed.result["annotators"], fit.annotators["eta"], strict=True):
        assert annotator["eta"] == pytest.approx(eta, rel=1e-12)
        assert annotator["eta_lo90"] <= annotator["eta"] <= annotator["eta_hi90"]
    assert diagnosed.idata is not None and diagnosed.trajectory is not None
    # a noise fit that does not belong to the run's final state is refused
    edited = fit.annotators.copy()
    edited["eta"] = 0.5
    NoiseFit(**{**fit.__dict__, "annotators": edited}).save(run.noise_fit)
    with pytest.raises(ValueError, match="'eta' does not match the run's final noise state"):
        load_for_diagnosis(run.path)
