"""The ``re-po`` command line (repo.cli) and the Python API behind it (repo.fit).

``fit-noise`` runs end to end on small simulated tables in every format and file
type, and RESULT.json is checked field by field against the documented schema.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import repo
from repo.cli import main
from repo.data.simulate import simulate_labels
from repo.fit import NoiseFit, fit_noise

ROOT = Path(repo.__file__).resolve().parents[1]
MODEL_PARAMETERS = {
    "symmetric": set(),
    "two-coin": {"eta_a", "eta_b"},
    "hierarchical": set(),
    "spammer": {"theta", "bias"},
    "boltzmann": {"tau"},
}


# -- simulated tables ---------------------------------------------------------


def _ids(sim) -> tuple[list[str], list[str]]:
    return [f"rater-{k}" for k in sim.annotator], [f"q{i:03d}" for i in sim.item]


def binary_table(model: str = "symmetric", seed: int = 0) -> pd.DataFrame:
    """Three labels per item from four annotators; label 2 is A, 1 is B."""
    sim = simulate_labels(num_items=40, num_annotators=4, labels_per_item=3, model=model, seed=seed)
    annotator, item = _ids(sim)
    return pd.DataFrame({"annotator": annotator, "item": item, "label": sim.label + 1})


def pairwise_table(seed: int = 0) -> pd.DataFrame:
    """Each simulated label becomes one comparison of two of ten objects."""
    sim = simulate_labels(
        num_items=120, num_annotators=4, labels_per_item=1, shared_truth=False, seed=seed
    )
    rng = np.random.default_rng(seed)
    objects = [f"song {i}" for i in range(10)]
    pairs = np.array([rng.choice(10, size=2, replace=False) for _ in sim.item])
    first_won = sim.label == 1
    winner = np.where(first_won, pairs[:, 0], pairs[:, 1])
    loser = np.where(first_won, pairs[:, 1], pairs[:, 0])
    return pd.DataFrame(
        {
            "annotator": _ids(sim)[0],
            "winner": [objects[i] for i in winner],
            "loser": [objects[i] for i in loser],
        }
    )


def scored_table(
    model: str = "symmetric", seed: int = 0, shared: bool = False, annotators: bool = True
) -> pd.DataFrame:
    """Scored labels: per-label truth (one label an item) or shared truth (three)."""
    sim = simulate_labels(
        num_items=40 if shared else 120,
        num_annotators=4,
        labels_per_item=3 if shared else 1,
        model=model,
        shared_truth=shared,
        seed=seed,
    )
    annotator, item = _ids(sim)
    frame = pd.DataFrame({"label": sim.label, "score": sim.scores[sim.item]})
    if annotators:
        frame.insert(0, "annotator", annotator)
    if shared:
        frame.insert(0, "item", item)
    return frame


def write(table: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        table.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path, index=False)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- help -----------------------------------------------------------------------


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "fit-noise" in out and "demo" in out


def test_fit_noise_help_lists_formats_and_models(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit-noise", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("binary", "pairwise", "scored", "--shared-truth", "--prior", "--out"):
        assert word in out
    for model in MODEL_PARAMETERS:
        assert model in out


def test_unknown_choice_is_a_usage_error(capsys, tmp_path):
    path = write(binary_table(), tmp_path / "labels.csv")
    with pytest.raises(SystemExit) as info:
        main(["fit-noise", str(path), "--format", "ranked", "--out", str(tmp_path / "r.json")])
    assert info.value.code == 2
    assert "ranked" in capsys.readouterr().err


# -- fit-noise end to end -------------------------------------------------------

CASES = [
    # id, format, model, table, suffix, extra arguments
    ("binary-symmetric-csv", "binary", "symmetric", lambda: binary_table(), ".csv", ["--prior", "beta:2,2"]),
    ("binary-two-coin-tsv", "binary", "two-coin", lambda: binary_table("two-coin", 1), ".tsv", []),
    ("binary-hierarchical-jsonl", "binary", "hierarchical", lambda: binary_table("hierarchical", 2), ".jsonl", []),
    ("binary-spammer-parquet", "binary", "spammer", lambda: binary_table("spammer", 3), ".parquet", []),
    ("pairwise-symmetric-csv", "pairwise", "symmetric", lambda: pairwise_table(4), ".csv", []),
    ("pairwise-hierarchical-jsonl", "pairwise", "hierarchical", lambda: pairwise_table(5), ".jsonl", []),
    ("scored-symmetric-jsonl", "scored", "symmetric", lambda: scored_table(seed=6), ".jsonl", []),
    ("scored-two-coin-parquet", "scored", "two-coin", lambda: scored_table("two-coin", 7), ".parquet", []),
    ("scored-boltzmann-csv", "scored", "boltzmann", lambda: scored_table("boltzmann", 8), ".csv", []),
    ("scored-spammer-tsv", "scored", "spammer", lambda: scored_table("spammer", 9), ".tsv", []),
    ("scored-shared-symmetric-parquet", "scored", "symmetric", lambda: scored_table(seed=10, shared=True), ".parquet", ["--shared-truth"]),
    ("scored-shared-hierarchical-csv", "scored", "hierarchical", lambda: scored_table(seed=11, shared=True), ".csv", ["--shared-truth"]),
    ("scored-global-symmetric-csv", "scored", "symmetric", lambda: scored_table(seed=12, annotators=False), ".csv", []),
]  # fmt: skip


CASE_IDS = [(case.values if hasattr(case, "values") else case)[0] for case in CASES]


@pytest.mark.parametrize(("name", "fmt", "model", "make", "suffix", "extra"), CASES, ids=CASE_IDS)
def test_fit_noise_end_to_end(capsys, tmp_path, name, fmt, model, make, suffix, extra):
    table = make()
    path = write(table, tmp_path / f"labels{suffix}")
    out = tmp_path / "result.json"
    code, stdout, stderr = run(
        capsys, "fit-noise", path, "--format", fmt, "--model", model, *extra, "--out", out
    )
    assert code == 0, stderr
    assert stdout == ""  # results only in the file
    assert "[re-po] EM iteration 1:" in stderr  # progress on stderr
    assert f"wrote {out}" in stderr
    doc = json.loads(out.read_text())
    _check_result(doc, table, fmt, model, shared="--shared-truth" in extra or fmt == "binary")


def _check_result(doc: dict, table: pd.DataFrame, fmt: str, model: str, shared: bool) -> None:
    n = len(table)
    assert doc["version"] == 1
    assert doc["model"] == model
    assert doc["format"] == fmt
    assert doc["converged"] is True
    assert isinstance(doc["iterations"], int) and doc["iterations"] >= 1
    assert isinstance(doc["log_likelihood"], float) and math.isfinite(doc["log_likelihood"])
    assert doc["log_likelihood"] < 0

    population = doc["population"]
    assert isinstance(population, dict)
    assert all(isinstance(v, float) and math.isfinite(v) for v in population.values())
    if model == "hierarchical":
        assert {"mu", "sigma"} <= set(population)
        assert population["sigma"] > 0

    # annotators: ids as the input's strings, counts, eta and the model's own parameters
    annotators = doc["annotators"]
    if "annotator" in table.columns:
        counts = Counter(str(a) for a in table["annotator"])
    else:
        counts = Counter({"all": n})
    assert [a["id"] for a in annotators] == sorted(counts)
    for record in annotators:
        assert isinstance(record["id"], str)
        assert isinstance(record["n_labels"], int)
        assert record["n_labels"] == counts[record["id"]]
        assert isinstance(record["eta"], float)
        assert 0.0 <= record["eta"] <= 1.0
        for name in MODEL_PARAMETERS[model]:
            assert isinstance(record[name], float) and math.isfinite(record[name])
            if name != "tau":
                assert 0.0 <= record[name] <= 1.0
    assert np.mean([a["eta"] for a in annotators]) > 0.5  # better than chance

    # items
    items = doc["items"]
    if fmt == "binary":
        assert sorted(i["id"] for i in items) == sorted(set(table["item"]))
        for record in items:
            assert set(record["posterior"]) == {"2", "1"}  # the input's label values
            assert all(0.0 <= p <= 1.0 for p in record["posterior"].values())
            assert sum(record["posterior"].values()) == pytest.approx(1.0)
    elif fmt == "pairwise":
        objects = set(table["winner"]) | set(table["loser"])
        assert sorted(i["id"] for i in items) == sorted(objects)
        assert all(set(i) == {"id", "score"} for i in items)
        assert all(isinstance(i["score"], float) and math.isfinite(i["score"]) for i in items)
    elif shared:
        assert sorted(i["id"] for i in items) == sorted(set(table["item"]))
        for record in items:
            assert set(record["posterior"]) == {"1", "0"}
            assert record["posterior"]["0"] == pytest.approx(1 - record["posterior"]["1"])
            assert 0.0 <= record["posterior"]["1"] <= 1.0
    else:
        assert items == []

    # labels: one per row, with the posterior that it is correct
    labels = doc["labels"]
    assert sorted(label["row"] for label in labels) == list(range(n))
    for record in labels:
        assert isinstance(record["row"], int)
        assert isinstance(record["w"], float)
        assert 0.0 <= record["w"] <= 1.0


def test_fit_noise_writes_dropped_ties_and_duplicates(capsys, tmp_path):
    table = binary_table(seed=13).astype({"label": str})
    table.loc[[5, 17], "label"] = "0"
    table = pd.concat([table, table.iloc[[3]]], ignore_index=True)
    path = write(table, tmp_path / "labels.csv")
    out = tmp_path / "result.json"
    args = ["fit-noise", path, "--format", "binary", "--tie-value", "0", "--out", out]
    code, stdout, stderr = run(capsys, *args, "--duplicates", "first")
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["skipped"] == {"tie": 2, "duplicate": 1}
    assert sorted(label["row"] for label in doc["labels"]) == sorted(
        set(range(len(table))) - {5, 17, len(table) - 1}
    )
    out.unlink()
    code, stdout, stderr = run(capsys, *args)  # duplicates='error' by default
    assert code == 2
    assert f"row {len(table) - 1}" in stderr and "row 3" in stderr
    assert not out.exists()


# -- bad input: exit 2 and one line on stderr -----------------------------------


def _scored_csv(rows: list[str]) -> str:
    return "annotator,label,score\n" + "\n".join(rows) + "\n"


BINARY_OK = ["a,i1,1", "b,i1,2", "a,i2,2", "b,i2,2", "c,i3,1"]

BAD_INPUTS = [
    # id, file name, content, format, extra arguments, words the reason must contain
    ("nan-score", "s.csv", _scored_csv(["a,1,0.5", "b,0,nan"]), "scored", [], ["row 1", "'score'"]),
    ("inf-score", "s.csv", _scored_csv(["a,1,0.5", "b,0,2", "c,1,-inf"]), "scored", [], ["row 2", "'score'", "finite"]),
    ("text-score", "s.csv", _scored_csv(["a,1,big"]), "scored", [], ["row 0", "'score'", "'big'"]),
    ("scored-label-2", "s.csv", _scored_csv(["a,1,0.5", "b,2,0.5"]), "scored", [], ["row 1", "'label'", "'2'"]),
    ("binary-third-value", "b.csv", "annotator,item,label\n" + "\n".join([*BINARY_OK, "c,i4,3"]), "binary", [], ["row 5", "'label'", "'3'"]),
    ("one-label-value", "b.tsv", "annotator\titem\tlabel\na\ti1\t1\nb\ti1\t1\n", "binary", [], ["'label'", "fewer than two"]),
    ("missing-annotator", "b.csv", "annotator,item,label\na,i1,1\n,i1,2\n", "binary", [], ["row 1", "'annotator'", "missing"]),
    ("missing-item", "b.jsonl", '{"annotator":"a","item":"i1","label":1}\n{"annotator":"b","item":null,"label":2}\n', "binary", [], ["row 1", "'item'", "missing"]),
    ("missing-winner", "p.csv", "annotator,winner,loser\na,x,y\nb,,y\n", "pairwise", [], ["row 1", "'winner'"]),
    ("duplicate", "b.csv", "annotator,item,label\n" + "\n".join([*BINARY_OK, "b,i2,1"]), "binary", [], ["row 5", "row 3", "'annotator'", "duplicate"]),
    ("empty-file", "b.csv", "", "binary", [], ["empty"]),
    ("header-only", "b.csv", "annotator,item,label\n", "binary", [], ["no rows"]),
    ("unknown-column", "b.csv", "annotator,item,label,note\na,i1,1,x\n", "binary", [], ["'note'", "unknown column"]),
    ("missing-column", "b.csv", "annotator,item\na,i1\n", "binary", [], ["'label'", "missing column"]),
    ("boltzmann-binary", "b.csv", "annotator,item,label\n" + "\n".join(BINARY_OK), "binary", ["--model", "boltzmann"], ["boltzmann", "scores"]),
    ("boltzmann-pairwise", "p.csv", "annotator,winner,loser\na,x,y\nb,y,x\n", "pairwise", ["--model", "boltzmann"], ["boltzmann", "not identifiable"]),
    ("two-coin-pairwise", "p.csv", "annotator,winner,loser\na,x,y\nb,y,x\n", "pairwise", ["--model", "two-coin"], ["two-coin", "position"]),
    ("spammer-pairwise", "p.csv", "annotator,winner,loser\na,x,y\nb,y,x\n", "pairwise", ["--model", "spammer"], ["spammer", "position"]),
    ("two-coin-all-a", "s.csv", _scored_csv(["a,1,0.5", "b,1,-2"]), "scored", ["--model", "two-coin"], ["two-coin", "every label says A"]),
    ("spammer-all-a", "s.csv", _scored_csv(["a,1,0.5", "b,1,-2"]), "scored", ["--model", "spammer"], ["spammer", "every label says A"]),
    ("pairwise-shared", "p.csv", "annotator,winner,loser\na,x,y\nb,y,x\n", "pairwise", ["--shared-truth"], ["shared truth"]),
    ("scored-shared-no-item", "s.csv", _scored_csv(["a,1,0.5", "b,0,-2"]), "scored", ["--shared-truth"], ["'item'"]),
    ("bad-prior", "b.csv", "annotator,item,label\n" + "\n".join(BINARY_OK), "binary", ["--prior", "beta:2"], ["beta:2"]),
    ("prior-on-boltzmann", "s.csv", _scored_csv(["a,1,0.5", "b,0,-2"]), "scored", ["--model", "boltzmann", "--prior", "beta:2,2"], ["boltzmann"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "filename", "content", "fmt", "extra", "words"),
    BAD_INPUTS,
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, name, filename, content, fmt, extra, words):  # fmt: skip
    path = tmp_path / filename
    path.write_text(content)
    out = tmp_path / "result.json"
    code, stdout, stderr = run(capsys, "fit-noise", path, "--format", fmt, *extra, "--out", out)
    assert code == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("re-po: error: ")
    for word in words:
        assert word in lines[0]
    assert not out.exists()


def test_missing_labels_file(capsys, tmp_path):
    code, stdout, stderr = run(
        capsys, "fit-noise", tmp_path / "nope.csv", "--format", "binary", "--out", tmp_path / "r"
    )
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and "nope.csv" in stderr


def test_exit_code_in_a_subprocess(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("annotator,item,label\na,i1,1\nb,i1,2\nc,i2,nan\nc,i3,x\n")
    result = subprocess.run(
        [sys.executable, "-m", "repo.cli", "fit-noise", str(path), "--format", "binary"]
        + ["--out", str(tmp_path / "result.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("re-po: error: row 2, field 'label'")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "result.json").exists()


def test_the_console_script_closes_the_process_group_main_leaves_open(tmp_path, monkeypatch):
    # torchrun's processes open a group; one left to interpreter shutdown can abort a
    # finished run (pytorch/pytorch#179291), so the console script exits through
    # exit_process, which closes it (a group of one process: a normal sys.exit; of two,
    # tests/test_distributed.py), while main() leaves it to callers that go on using it
    # (tests/_fsdp_worker.py)
    import torch.distributed as dist

    from repo.cli import console

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert main(["train", "--describe-config"]) == 0 and dist.is_initialized()
        monkeypatch.setattr(sys, "argv", ["re-po", "train", "--describe-config"])
        with pytest.raises(SystemExit) as exited:
            console()
        assert exited.value.code == 0
        assert not dist.is_initialized()
        monkeypatch.setattr(sys, "argv", ["re-po", "train", "no-such-config.toml"])
        with pytest.raises(SystemExit) as exited:
            console()
        assert exited.value.code == 2  # main's status passes through
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -- the Python API ---------------------------------------------------------------


def test_python_api_returns_data_frames():
    table = binary_table(seed=14)
    columns = {name: table[name].tolist() for name in table.columns}  # a dict of columns
    fit = fit_noise(columns, format="binary", model="two-coin")
    assert isinstance(fit, NoiseFit)
    for frame in (fit.annotators, fit.items, fit.labels):
        assert isinstance(frame, pd.DataFrame)
    assert list(fit.annotators.columns[:3]) == ["id", "n_labels", "eta"]
    assert {"eta_a", "eta_b"} <= set(fit.annotators.columns)
    assert fit.annotators["id"].tolist() == sorted(set(table["annotator"]))
    assert fit.annotators["n_labels"].sum() == len(table)
    assert fit.annotators["eta"].between(0, 1).all()
    assert len(fit.items) == table["item"].nunique()
    assert list(fit.items.columns) == ["id", "p_2", "p_1", "log_likelihood"]  # 2 is "A"
    np.testing.assert_allclose(fit.items["p_2"] + fit.items["p_1"], 1.0)
    assert fit.labels["row"].tolist() == list(range(len(table)))
    assert fit.labels["w"].between(0, 1).all()
    doc = json.loads(fit.to_json())
    assert doc["annotators"][0]["id"] == fit.annotators["id"][0]
    first = doc["items"][0]
    assert first["posterior"] == {"2": fit.items["p_2"][0], "1": fit.items["p_1"][0]}
    # the same table as a DataFrame gives the same fit
    again = fit_noise(table, format="binary", model="two-coin")
    np.testing.assert_allclose(again.annotators["eta"], fit.annotators["eta"])
