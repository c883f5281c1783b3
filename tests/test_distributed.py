"""Multi-process launches as users run them: ``torchrun ... -m repo.cli train CONFIG``.

On a machine without CUDA, ``[model] device = "auto"`` (the default) under torchrun is
one run of all the launched processes over a gloo process group: rank 0 writes the run
directory, every rank ends with the same annotator parameters and weights.
(tests/test_train.py checks that two processes match one on the same global batches.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import torchrun

import repo
from repo.data.rule_pairs import rule_pairs
from repo.policy.device import launched_processes, select_device

ROOT = Path(repo.__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_cli_worker.py"


def test_launched_processes_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'four'"):
        launched_processes()


def test_auto_is_the_first_available_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert select_device("auto") == select_device(None)
    assert select_device("cpu").type == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: True)
    assert select_device("auto").type == "mps"
    monkeypatch.setenv("WORLD_SIZE", "2")  # MPS has no process-group backend
    assert select_device("auto").type == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert select_device("auto").type == "cuda"


def _train_on_two_processes(tmp_path: Path, rows: list[dict], em: str = ""):
    """``data.jsonl`` of ``rows`` and a ``train.toml`` with the default device and
    ``em`` (an ``[em]`` section, or nothing) appended, trained by ``torchrun`` on two
    processes with CUDA hidden: the folder of the ranks' views and the finished process."""
    with open(tmp_path / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "train.toml").write_text(
        '[model]\nrecipe = "tiny-llama"\nmax_length = 64\n'
        '[data]\ntrain = "data.jsonl"\nannotator_column = "annotator"\n'
        "[loss]\nbeta = 1.0\n"
        "[optim]\nbatch_size = 4\nlearning_rate = 0.01\nepochs = 1\n"
        '[run]\noutput_dir = "run"\nprogress = false\n' + em
    )
    views = tmp_path / "views"
    views.mkdir()
    done = torchrun(
        WORKER, views, "train", tmp_path / "train.toml", cwd=tmp_path, CUDA_VISIBLE_DEVICES=""
    )
    return views, done


@pytest.mark.parametrize("em", ["", "[em]\nheld_out = true\nheld_out_share = 0.25\n"])
def test_torchrun_on_cpu_with_device_auto_is_one_run_of_two_processes(tmp_path, em):
    """The documented command, ``torchrun --nproc_per_node 2 -m repo.cli train CONFIG``,
    with the default ``device = "auto"`` and CUDA hidden (a CPU-only machine); also with
    held-out labels, which the two processes score between them at the pass's end."""
    rows = rule_pairs(32, [0.95, 0.8, 0.6], seed=3).rows
    views, done = _train_on_two_processes(tmp_path, rows, em)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already holds a run" not in done.stderr

    rank0, rank1 = (json.loads((views / f"rank{r}.json").read_text()) for r in (0, 1))
    for rank, view in enumerate((rank0, rank1)):
        assert view["rank"] == rank
        assert view["world_size"] == 2 and view["backend"] == "gloo"
        assert view["device"].startswith("cpu")
    assert rank0["parameters"] == rank1["parameters"]  # bit for bit: all-reduced statistics
    assert rank0["weights"] == rank1["weights"]  # DDP keeps the adapters in step
    # the console script left through exit_process: atexit handlers ran on both ranks
    assert [(views / f"atexit{r}").read_text() for r in (0, 1)] == ["ran", "ran"]

    # one run directory, written by rank 0, finished; rank 0 alone printed its metrics
    assert [p.parent for p in tmp_path.rglob("config.json")] == [tmp_path / "run"]
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2
    assert config["config"]["model"]["device"] == "auto"
    assert config["total_steps"] == rank0["step"] == rank1["step"] > 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == list(range(1, config["total_steps"] + 1))
    assert (run / "adapter").is_dir() and (run / "noise.safetensors").is_file()
    reliability = json.loads((run / "reliability.json").read_text())
    eta = [a["eta"] for a in reliability["annotators"]]
    np.testing.assert_allclose(eta, rank1["parameters"]["eta"], rtol=1e-6)
    if em:  # 8 of the 32 items held out, refitted on scores both processes computed
        assert reliability["held_out_items"] == 8
        report = json.loads((run / "data_report.json").read_text())
        assert report["held_out_units"] == 8 and report["units_per_epoch"] == 24
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["step"] == config["total_steps"]


def test_torchrun_trains_the_cross_fit_scorers_as_one_run_of_two_processes(tmp_path):
    """``[em] cross_fit`` under torchrun: each fold's scorer is a run of both processes
    (rank 0 writes its folder), both score every item alike, and the policy's run ends
    with the same annotator parameters and weights on both."""
    from safetensors.torch import load_file

    rows = rule_pairs(32, [0.7], seed=3).rows
    views, done = _train_on_two_processes(tmp_path, rows, "[em]\ncross_fit = true\n")
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((views / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["parameters"] == rank1["parameters"] and rank0["weights"] == rank1["weights"]
    run = tmp_path / "run"
    for k in range(4):  # one pass: "auto" splits the items in four folds
        fold = run / "cross-fit" / f"scorer-{k}"
        assert json.loads((fold / "config.json").read_text())["processes"] == 2
        assert (fold / "adapter").is_dir()
    state = load_file(str(run / "noise.safetensors"))
    assert state["cross_fit.logits"].shape == (32,) and state["cross_fit.logits"].isfinite().all()
    reliability = json.loads((run / "reliability.json").read_text())
    assert reliability["e_step"]["cross_fit"] is True
