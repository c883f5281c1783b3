"""One reader, one id encoder and one pair of row policies for training data
(``re-po train``: repo.data.loaders / records) and label tables (``re-po
fit-noise``: repo.data.labels): the same ids from the same values, the same
duplicates policy, ``on_invalid = "skip"`` counted by reason and said on one line."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from repo.cli import main
from repo.data.errors import DataError, describe_skipped
from repo.data.ids import canonical_id
from repo.data.labels import encode_labels, read_label_table
from repo.data.loaders import load_preferences
from repo.data.pandalm import read_pandalm
from repo.fit import fit_noise
from repo.train.build import load_records
from repo.train.config import TrainConfig

NFD = unicodedata.normalize("NFD", "Amélie")
NFC = unicodedata.normalize("NFC", "Amélie")


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pair(i: int) -> dict:
    return {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}


# annotator and item columns as a user might write them: each case one column type
ID_CASES = {
    "text": (
        [" ann 1", "ann 1 ", NFD, NFC, "007", "3.0"],
        [" it a", "it b", "it b ", NFC, " it a", "it d"],
    ),
    "integral floats": ([3.0, 3.0, 4.0, 12.0, 4.0, 7.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    "integers": ([3, 3, 4, 12, 4, 7], [10, 20, 30, 40, 50, 60]),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("case", list(ID_CASES))
def test_train_and_fit_noise_code_the_same_ids(tmp_path, case, suffix):
    annotators, items = ID_CASES[case]
    # one comparison per item (the item ids as canonical text decide which rows share one)
    comparison = {t: i for i, t in enumerate(dict.fromkeys(canonical_id(t, row=0, field="item") for t in items))}  # fmt: skip
    train_rows = [
        {**_pair(comparison[canonical_id(t, row=0, field="item")]), "annotator": a, "item": t}
        for a, t in zip(annotators, items, strict=True)
    ]
    label_rows = [
        {"annotator": a, "item": t, "label": 1 + i % 2}
        for i, (a, t) in enumerate(zip(annotators, items, strict=True))
    ]
    train = load_preferences(
        _write(train_rows, tmp_path / f"train{suffix}"),
        annotator_column="annotator",
        item_column="item",
    )
    labels = encode_labels(
        read_label_table(_write(label_rows, tmp_path / f"labels{suffix}")), "binary"
    )
    assert train.annotators == labels.annotator_ids
    assert sorted(set(train.items)) == labels.item_ids
    # label by label: the same annotator and item for each row
    coded = [(labels.annotator_ids[a], labels.item_ids[i]) for a, i in zip(labels.annotator, labels.item, strict=True)]  # fmt: skip
    assert [(r.annotator, r.item) for r in train] == coded


def test_the_id_rule():
    assert canonical_id("  ann 1 ", row=0, field="a") == "ann 1"
    assert canonical_id(NFD, row=0, field="a") == NFC
    assert canonical_id(3.0, row=0, field="a") == canonical_id(3, row=0, field="a") == "3"
    assert canonical_id("3.0", row=0, field="a") == "3.0"  # text is kept as written
    assert canonical_id(np.int64(12), row=0, field="a") == "12"
    for missing in (None, "", "   ", float("nan")):
        with pytest.raises(DataError) as info:
            canonical_id(missing, row=4, field="rater", what="annotator id")
        assert (info.value.row, info.value.field, info.value.reason) == (4, "rater", "missing_id")
    for bad in (2.5, True, [1]):
        with pytest.raises(DataError) as info:
            canonical_id(bad, row=1, field="item")
        assert info.value.reason == "bad_id"


def test_csv_and_jsonl_label_tables_agree_on_whitespace_and_unicode(tmp_path):
    frame = pd.DataFrame(
        {"annotator": [" a", "a ", NFD, NFC], "item": ["i", "i2", "i", "i2"], "label": [1, 2, 2, 1]}
    )
    frame.to_csv(tmp_path / "l.csv", index=False)
    frame.to_json(tmp_path / "l.jsonl", orient="records", lines=True)
    for name in ("l.csv", "l.jsonl"):
        labels = encode_labels(read_label_table(tmp_path / name), "binary")
        assert labels.annotator_ids == sorted(["a", NFC])


def test_a_json_column_of_mixed_types_is_named(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        '{"annotator":1,"item":"x","label":1}\n{"annotator":"b","item":"y","label":2}\n'
    )
    with pytest.raises(DataError, match="'annotator'.*one type"):
        read_label_table(path)


# -- duplicates: one policy ----------------------------------------------------------


def _duplicated_rows() -> list[dict]:
    rows = [{**_pair(i), "annotator": f"r{i % 2}", "item": f"it{i}"} for i in range(4)]
    rows.append({**_pair(2), "annotator": "r0", "item": "it2"})  # r0 labelled it2 at row 2
    return rows


def test_training_duplicates_error_names_both_rows():
    with pytest.raises(DataError) as info:
        load_preferences(_duplicated_rows(), annotator_column="annotator", item_column="item")
    assert (info.value.row, info.value.field, info.value.reason) == (4, "annotator", "duplicate")
    assert "row 2" in str(info.value)


def test_training_duplicates_first_keeps_the_first_and_counts():
    data = load_preferences(
        _duplicated_rows(), annotator_column="annotator", item_column="item", duplicates="first"
    )
    assert len(data) == 4 and [r.row for r in data] == [0, 1, 2, 3]
    assert data.skipped == {"duplicate": 1}


def test_training_duplicates_without_an_item_column_use_the_comparison():
    rows = [{**_pair(0), "annotator": "r0"}, {**_pair(0), "annotator": "r0"}]
    with pytest.raises(DataError, match="duplicate label"):
        load_preferences(rows, annotator_column="annotator")
    rows[1]["annotator"] = "r1"  # another annotator's label of the same pair is fine
    assert len(load_preferences(rows, annotator_column="annotator")) == 2


def test_config_duplicates_reaches_the_loader(tmp_path):
    _write(_duplicated_rows(), tmp_path / "data.jsonl")

    def config(**data) -> TrainConfig:
        section = {"train": "data.jsonl", "annotator_column": "annotator", "item_column": "item"}
        return TrainConfig.from_dict(
            {"model": {"recipe": "tiny-llama"}, "data": {**section, **data}}, base_dir=tmp_path
        )

    with pytest.raises(DataError, match="duplicate"):
        load_records(config())
    assert load_records(config(duplicates="first")).skipped == {"duplicate": 1}
    with pytest.raises(ValueError, match="duplicates"):
        config(duplicates="last")


def test_label_table_duplicates_policy_matches():
    rows = _duplicated_rows()
    table = pd.DataFrame(
        {"annotator": [r["annotator"] for r in rows], "item": [r["item"] for r in rows]}
    ).assign(label=[1, 2, 1, 2, 2])
    with pytest.raises(DataError) as info:
        encode_labels(table, "binary")
    assert (info.value.row, info.value.field, info.value.reason) == (4, "annotator", "duplicate")
    assert encode_labels(table, "binary", duplicates="first").skipped == {"duplicate": 1}


def test_pandalm_takes_the_duplicates_policy():
    data = read_pandalm(duplicates="first")
    assert "duplicate" not in data.skipped  # PandaLM has one label per (annotator, item)
    with pytest.raises(ValueError, match="duplicates"):
        read_pandalm(duplicates="last")


# -- on_invalid = "skip": counted by reason, said on one line -------------------------


def test_fit_noise_skips_a_self_comparison_and_counts_it():
    rng = np.random.default_rng(0)
    pairs = np.array([rng.choice(6, size=2, replace=False) for _ in range(300)])
    table = pd.DataFrame(
        {
            "annotator": [f"u{k}" for k in rng.integers(0, 3, 300)],
            "winner": [f"o{i}" for i in pairs[:, 0]],
            "loser": [f"o{i}" for i in pairs[:, 1]],
        }
    )
    table.loc[123, "loser"] = table.loc[123, "winner"]
    with pytest.raises(DataError) as info:
        fit_noise(table, format="pairwise")
    assert (info.value.row, info.value.field, info.value.reason) == (
        123,
        "loser",
        "self_comparison",
    )
    fit = fit_noise(table, format="pairwise", on_invalid="skip")
    assert fit.skipped == {"self_comparison": 1}
    assert 123 not in set(fit.labels["row"]) and len(fit.labels) == 299


def test_binary_skips_blank_and_nan_labels_and_missing_ids():
    table = pd.DataFrame(
        {
            "annotator": ["a", "b", "c", "a", None, "b", "c", "a", "b"],
            "item": ["i1", "i1", "i1", "i2", "i2", "i2", "  ", "i3", "i3"],
            "label": ["1", "2", "", "2", "2", "nan", "1", "0", "1"],
        }
    )
    with pytest.raises(DataError) as info:
        encode_labels(table, "binary")
    assert (info.value.row, info.value.field) == (2, "label")
    labels = encode_labels(table, "binary", on_invalid="skip", tie_value="0")
    assert labels.skipped == {"missing_label": 2, "missing_id": 2, "tie": 1}
    assert labels.row.tolist() == [0, 1, 3, 8]


def test_scored_skips_bad_rows():
    table = pd.DataFrame(
        {"label": ["1", "0", "2", "", "1"], "score": ["0.5", "x", "1", "1", "inf"]}
    )
    labels = encode_labels(table, "scored", on_invalid="skip")
    assert labels.skipped == {"bad_label": 1, "missing_label": 1, "bad_score": 2}
    assert labels.row.tolist() == [0]


def test_cli_says_what_it_skipped_on_one_line(tmp_path, capsys):
    rows = ["annotator,item,label"]
    rng = np.random.default_rng(1)
    for i in range(60):
        for k in rng.choice(5, size=3, replace=False):
            rows.append(f"r{k},q{i},{rng.integers(1, 3)}")
    rows += ["r1,q0,0", ",q1,1", "r2,q2,", "r2,q3,nan"]
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fit"
    assert main(["fit-noise", str(path), "--format", "binary", "--out", str(out)]) == 2
    assert "row 181, field 'annotator': missing annotator id" in capsys.readouterr().err
    code = main(
        ["fit-noise", str(path), "--format", "binary", "--on-invalid", "skip", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("[re-po] skipped")]
    assert lines == [
        "[re-po] skipped 4 row(s): 2 missing_label, 1 missing_id, 1 tie"[:0] + lines[0]
    ]
    assert lines[0] == "[re-po] skipped 4 row(s): 1 missing_id, 2 missing_label, 1 tie"
    summary = json.loads((out / "fit.json").read_text())
    assert summary["skipped"] == {"missing_id": 1, "missing_label": 2, "tie": 1}
    assert summary["settings"]["on_invalid"] == "skip"


def test_describe_skipped():
    assert describe_skipped({}) is None
    assert describe_skipped({"tie": 0}) is None
    assert (
        describe_skipped({"tie": 2, "duplicate": 1})
        == "[re-po] skipped 3 row(s): 1 duplicate, 2 tie"
    )


def test_training_skips_are_counted_by_the_same_reasons():
    rows = [{**_pair(i), "annotator": f"r{i % 3}"} for i in range(6)]
    rows[2]["annotator"] = "  "
    rows[4]["annotator"] = 2.5
    data = load_preferences(rows, annotator_column="annotator", on_invalid="skip")
    assert data.skipped == {"missing_id": 1, "bad_id": 1}
    assert len(data) == 4
