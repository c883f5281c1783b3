"""Training conveniences of ``re-po train``: held-out evaluation every N steps into the
metrics log, metric trackers through accelerate (TensorBoard read back from its event
file; W&B through accelerate's tracker with a stand-in ``wandb`` module), and data sets
read by name through ``datasets.load_dataset`` (a local data set folder, offline)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import datasets
import pytest
from _helpers import tiny_config, write_jsonl

from repo.data.errors import DataError
from repo.data.loaders import is_dataset_name, load_preferences, open_dataset
from repo.data.rule_pairs import rule_pairs
from repo.train import ConfigError, Trainer, evaluate_run
from repo.train.build import load_eval_records, load_records
from repo.train.run_dir import RunDir


@pytest.fixture(autouse=True)
def _datasets_offline(monkeypatch, tmp_path):
    """datasets reads HF_DATASETS_OFFLINE at import: set its flag, and keep its cache here."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _data(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", rule_pairs(32, [0.95, 0.8], seed=1).rows)
    write_jsonl(tmp_path / "held.jsonl", rule_pairs(12, [1.0], seed=2).rows)


# ----------------------------------------------------------------------------- evaluation


def test_eval_every_n_steps_writes_held_out_metrics_into_the_metrics_log(tmp_path):
    _data(tmp_path)
    config = tiny_config(tmp_path, max_steps=5, data={"eval": "held.jsonl"}, run={"eval_steps": 2})
    trainer = Trainer(config)
    final = trainer.train()
    log = RunDir(tmp_path / "run").metrics_log().read()
    evaluated = [row["step"] for row in log if "eval/accuracy" in row]
    assert evaluated == [2, 4, 5]  # every 2 steps and at the end
    for row in log:
        if "eval/accuracy" in row:
            assert 0 <= row["eval/accuracy"] <= 1 and row["eval/log_loss"] > 0
            assert {"eval/margin", "eval/brier", "eval/ece"} <= set(row)
            assert row["eval/labels"] == 12
    # the logged numbers are those of re-po eval's evaluation of the same policy
    held = load_eval_records(config)
    direct = trainer.evaluate(held)
    for name in ("accuracy", "margin", "log_loss", "brier"):
        assert final[f"eval/{name}"] == pytest.approx(direct[name], rel=1e-9, abs=1e-12)
    report = RunDir(tmp_path / "run").read_data_report()
    assert report["eval"]["labels"] == 12


def test_eval_steps_needs_eval_data(tmp_path):
    _data(tmp_path)
    with pytest.raises(ConfigError, match=r"\[run\] eval_steps needs held-out data"):
        tiny_config(tmp_path, run={"eval_steps": 2})


def test_a_bad_eval_row_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    import transformers

    _data(tmp_path)
    rows = rule_pairs(12, [1.0], seed=2).rows
    rows[5]["chosen"] = None
    write_jsonl(tmp_path / "held.jsonl", rows)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(DataError) as info:
        Trainer(tiny_config(tmp_path, data={"eval": "held.jsonl"}))
    assert (info.value.row, info.value.field) == (5, "chosen")


# ----------------------------------------------------------------------------- trackers


def test_tensorboard_receives_the_logged_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _data(tmp_path)
    config = tiny_config(
        tmp_path,
        max_steps=3,
        data={"eval": "held.jsonl"},
        run={"eval_steps": 3, "report_to": ["tensorboard"]},
    )
    Trainer(config).train()
    run = RunDir(tmp_path / "run")
    files = sorted(run.trackers.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {run.trackers}"
    scalars = EventAccumulator(str(run.trackers / "run")).Reload()
    assert {"loss", "eval/accuracy", "eta/mean"} <= set(scalars.Tags()["scalars"])
    log = run.metrics_log().read()
    losses = scalars.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([row["loss"] for row in log], rel=1e-6)
    (accuracy,) = scalars.Scalars("eval/accuracy")
    assert accuracy.step == 3 and accuracy.value == pytest.approx(log[-1]["eval/accuracy"])


def test_wandb_goes_through_accelerates_tracker(tmp_path, monkeypatch):
    """The W&B code path with a stand-in ``wandb`` module (the package is not installed
    here): accelerate's WandBTracker starts a run, stores the configuration, logs every
    logged step and finishes."""
    import accelerate.tracking as tracking

    calls: dict[str, list] = {"init": [], "config": [], "log": [], "finish": []}

    class Run:
        def log(self, values, step=None, **kwargs):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"].append(True)

    wandb = types.ModuleType("wandb")
    wandb.init = lambda project, **kwargs: calls["init"].append(project) or Run()
    wandb.config = types.SimpleNamespace(
        update=lambda values, allow_val_change=False: calls["config"].append(dict(values))
    )
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    available = [*tracking._available_trackers, tracking.LoggerType.WANDB]
    monkeypatch.setattr(tracking, "_available_trackers", available)
    _data(tmp_path)
    Trainer(tiny_config(tmp_path, max_steps=2, run={"report_to": ["wandb"]})).train()
    assert calls["init"] == ["run"]
    assert calls["config"][0]["loss/family"] == "dpo"
    assert [step for step, _ in calls["log"]] == [1, 2]
    assert "loss" in calls["log"][0][1] and calls["finish"] == [True]


def test_a_tracker_without_its_package_is_an_error(tmp_path, monkeypatch):
    import accelerate.tracking as tracking

    monkeypatch.setattr(tracking, "_available_trackers", [])
    _data(tmp_path)
    with pytest.raises(ConfigError, match=r"\[run\] report_to: the 'tensorboard' tracker's"):
        Trainer(tiny_config(tmp_path, run={"report_to": ["tensorboard"]}))


def test_report_to_names_accelerates_trackers(tmp_path):
    with pytest.raises(ConfigError, match=r"\[run\] report_to: unknown tracker 'tensorbored'"):
        tiny_config(tmp_path, run={"report_to": ["tensorbored"]})
    with pytest.raises(ConfigError, match=r"\[run\] report_to must be a list"):
        tiny_config(tmp_path, run={"report_to": "tensorboard"})


# ----------------------------------------------------------------------------- data set names


def _dataset_folder(root: Path) -> Path:
    """A data set folder as the hub lays one out: ``data/train.jsonl``, ``data/test.jsonl``;
    HH-RLHF's columns (chosen/rejected full texts, no prompt column) plus an annotator."""
    folder = root / "acme" / "prefs"
    (folder / "data").mkdir(parents=True)
    for split, n, seed in (("train", 24, 3), ("test", 8, 4)):
        rows = []
        for row in rule_pairs(n, [0.9, 0.7], seed=seed).rows:
            prompt = f"Human: {row['prompt']} Assistant:"
            rows.append(
                {
                    "chosen": f"{prompt} {row['chosen']}",
                    "rejected": f"{prompt} {row['rejected']}",
                    "rater": row["annotator"],
                }
            )
        write_jsonl(folder / "data" / f"{split}.jsonl", rows)
    return folder


def test_dataset_names_are_told_from_file_paths():
    assert is_dataset_name("Anthropic/hh-rlhf") and is_dataset_name("imdb")
    for path in ("data.jsonl", "pairs.parquet", "a/b/c", "/abs/name", "x.json.gz"):
        assert not is_dataset_name(path), path


def test_a_data_set_is_read_by_name_through_load_dataset(tmp_path, monkeypatch):
    """``train = "acme/prefs"`` names a data set; here ``load_dataset`` finds it as a
    local folder (run from its parent), as it would find a hub name in its cache."""
    _dataset_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    calls = []
    load = datasets.load_dataset
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or load(*a, **k)
    )
    base = tmp_path / "configs"
    base.mkdir()
    config = tiny_config(
        base, data={"train": "acme/prefs", "eval": "acme/prefs", "annotator_column": "rater"}
    )
    records = load_records(config)
    held = load_eval_records(config)
    assert [c[0][0] for c in calls] == ["acme/prefs", "acme/prefs"]
    assert [c[1]["split"] for c in calls] == ["train", "test"]
    assert (len(records), len(held)) == (24, 8)
    assert records.annotators == ["a0", "a1"]
    first = records[0]
    assert first.prompt.startswith("Human: Question") and first.prompt.endswith("Assistant:")
    # the same rows as the file itself, read as a file
    direct = load_preferences(
        tmp_path / "acme/prefs/data/train.jsonl", annotator_column="rater", prompt_column=None
    )
    assert [r.prompt for r in records] == [r.prompt for r in direct]


def test_a_data_set_folder_trains(tmp_path):
    folder = _dataset_folder(tmp_path)
    config = tiny_config(
        tmp_path,
        max_steps=2,
        data={"train": str(folder), "eval": str(folder), "annotator_column": "rater"},
        run={"eval_steps": 1},
    )
    metrics = Trainer(config).train()
    assert metrics["step"] == 2 and metrics["eval/labels"] == 8
    # re-po eval reads the folder too (split: the run's eval_split), and agrees
    # (the reloaded adapter, the reference by a forward instead of the cache: equal up
    # to float summation order)
    result = evaluate_run(tmp_path / "run", folder, batch_size=8)
    assert result["labels"] == 8 and result["data"] == str(folder)
    assert result["accuracy"] == pytest.approx(metrics["eval/accuracy"])
    assert result["log_loss"] == pytest.approx(metrics["eval/log_loss"], rel=1e-3)


def test_an_unknown_data_set_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot read data set 'nobody/nothing'"):
        open_dataset("nobody/nothing")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        open_dataset(tmp_path / "missing.jsonl")
    folder = _dataset_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="split 'validation'"):
        open_dataset(folder, split="validation")


def test_a_data_set_name_needs_the_trl_format(tmp_path):
    config = tiny_config(tmp_path, data={"train": "Anthropic/hh-rlhf", "format": "hh-rlhf"})
    with pytest.raises(ConfigError, match=r"\[data\] train: 'Anthropic/hh-rlhf' is not a file"):
        load_records(config)
