"""FSDP2 beside DDP: ``[run] distributed = "fsdp"`` under ``torchrun`` with two CPU
processes (gloo): the network sharded over both, the same annotator parameters on
every rank, checkpoints that resume to the uninterrupted run's state, and the final
policy saved whole (``AutoModelForCausalLM.from_pretrained`` reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import torchrun, write_jsonl

import repo
from repo.data.rule_pairs import rule_pairs
from repo.train import ConfigError, TrainConfig, Trainer, load_config

ROOT = Path(repo.__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_fsdp_worker.py"
TINY = ROOT / "models" / "tiny-llama"


def _views(views: Path, run: str) -> list[dict]:
    return [json.loads((views / f"{run}-rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp_trains_sharded_resumes_and_saves_the_whole_model(tmp_path):
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "data.jsonl", rule_pairs(32, [0.95, 0.8, 0.6], seed=3).rows)
    write_jsonl(tmp_path / "held.jsonl", rule_pairs(6, [1.0], seed=4).rows)
    (tmp_path / "train.toml").write_text(
        '[model]\nrecipe = "tiny-llama"\nmax_length = 64\nuse_lora = false\n'
        '[data]\ntrain = "data.jsonl"\nannotator_column = "annotator"\neval = "held.jsonl"\n'
        "[loss]\nbeta = 1.0\n"
        '[optim]\nbatch_size = 4\nlearning_rate = 0.01\nmax_steps = 4\nlr_scheduler = "constant"\n'
        '[run]\noutput_dir = "full"\nprogress = false\nsave_steps = 2\ndistributed = "fsdp"\n'
        "eval_steps = 2\n"
    )
    views = tmp_path / "views"
    views.mkdir()
    done = torchrun(
        WORKER,
        views,
        tmp_path / "train.toml",
        tmp_path / "part",
        cwd=tmp_path,
        CUDA_VISIBLE_DEVICES="",
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rank0, rank1 = _views(views, "full")
    for rank, view in enumerate((rank0, rank1)):
        assert view["rank"] == rank and view["world_size"] == 2 and view["backend"] == "gloo"
        assert view["sharded"] and view["step"] == 4
        # each rank holds about half of the network's parameters
        assert view["local_elements"] < 0.6 * view["elements"]
    assert rank0["parameters"] == rank1["parameters"]  # bit for bit: all-reduced statistics
    assert rank0["parameters"]["eta"] != [0.9, 0.9, 0.9]  # EM moved eta

    full = tmp_path / "full"
    resolved = json.loads((full / "config.json").read_text())
    assert resolved["processes"] == 2 and resolved["config"]["run"]["distributed"] == "fsdp"
    log = [json.loads(line) for line in (full / "metrics.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval/accuracy" in r] == [2, 4]

    # the final policy, whole: a plain transformers folder, trained away from the start
    model = AutoModelForCausalLM.from_pretrained(full / "model")
    start = AutoModelForCausalLM.from_pretrained(TINY)
    trained, initial = model.state_dict(), start.state_dict()
    assert set(trained) == set(initial)
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    checkpoint = full / "checkpoints" / "step-000004"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))  # the trainable tensors, whole
    assert set(saved) == set(trained)
    for name, value in saved.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    eta = [a["eta"] for a in json.loads((full / "reliability.json").read_text())["annotators"]]
    np.testing.assert_allclose(eta, rank0["parameters"]["eta"], rtol=1e-12)

    # one process on the same global batches (8 units a step) ends where FSDP ended
    single = load_config(tmp_path / "train.toml")
    single = single.replace("optim", batch_size=8).replace("run", output_dir="single")
    one = Trainer(single)
    one.train()
    # (up to float summation order: two processes pack their blocks into other rows)
    np.testing.assert_allclose(
        one.noise.eta.detach().numpy(), rank0["parameters"]["eta"], rtol=1e-5
    )
    # the same weights up to float summation order (each process packs its own blocks
    # into its packed row, so sums run in another order than one process's), which
    # AdamW's normalisation amplifies for a few near-zero gradients: all within 1e-3
    # while training moved weights by up to 4e-2, 99% within 1e-5
    moved = max(float((trained[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-2
    for name, value in one.policy.lm.state_dict().items():
        difference = (trained[name] - value).abs()
        assert float(difference.max()) < 1e-3, name
        assert float((difference > 1e-5).double().mean()) < 1e-2, name

    # the run as it stood at its step-2 checkpoint (copied by the worker), resumed
    part = tmp_path / "part"
    checkpoints = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]  # resumed at 2, saved at the end
    resumed0, resumed1 = _views(views, "resumed")
    assert resumed0["parameters"] == resumed1["parameters"]
    np.testing.assert_allclose(resumed0["parameters"]["eta"], rank0["parameters"]["eta"], rtol=1e-6)
    again = AutoModelForCausalLM.from_pretrained(part / "model").state_dict()
    for name, value in trained.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6)
    assert [json.loads(line)["step"] for line in (part / "metrics.jsonl").open()] == [1, 2, 3, 4]


def test_fsdp_is_for_full_fine_tuning(tmp_path):
    with pytest.raises(ConfigError, match=r"\[run\] distributed = 'fsdp' shards a full"):
        TrainConfig.from_dict(
            {
                "model": {"recipe": "tiny-llama"},
                "data": {"train": "data.jsonl"},
                "run": {"distributed": "fsdp"},
            },
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match=r"\[run\] distributed must be one of 'ddp', 'fsdp'"):
        TrainConfig.from_dict(
            {
                "model": {"recipe": "tiny-llama", "use_lora": False},
                "data": {"train": "data.jsonl"},
                "run": {"distributed": "zero3"},
            },
            base_dir=tmp_path,
        )


def test_the_paper_scale_fsdp_configuration_validates():
    """docs/scaling.md's full fine-tune command names a configuration that loads: FSDP,
    every weight trained, the paper's EM defaults."""
    from repo.policy import load_recipe

    config = load_config(ROOT / "examples" / "paper_llama3_full_fsdp.toml")
    assert config.run.distributed == "fsdp" and not config.model.use_lora
    assert load_recipe(config.model.recipe).source_kind == "hub"
    assert (config.noise.eta_init, config.em.alpha) == (0.9, 0.1)
    assert config.run.report_to == ("tensorboard",) and config.data.eval
