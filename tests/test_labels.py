"""Label tables: reading, validation and encoding (repo.data.labels), and the
identifiability checks of repo.fit.fit_noise that run before any fitting."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest

from repo.data.errors import DataError
from repo.data.labels import GLOBAL_ANNOTATOR, encode_labels, read_label_table
from repo.fit import fit_noise


def _binary() -> pd.DataFrame:
    """Six labels of three items, ids that are not numbers, labels 1/2."""
    return pd.DataFrame(
        {
            "annotator": ["ann-a", "ann-b", "ann-a", "ann-c", "ann-b", "ann-c"],
            "item": ["007", "007", "010", "010", "x9", "x9"],
            "label": ["1", "2", "2", "2", "1", "1"],
        }
    )


def _pairwise() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "annotator": ["u1", "u2", "u1", "u3", "u2"],
            "winner": ["cat", "dog", "emu", "cat", "fox"],
            "loser": ["dog", "emu", "cat", "fox", "dog"],
        }
    )


def _scored() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "annotator": ["a", "b", "a", "b", "c"],
            "item": ["i1", "i1", "i2", "i2", "i3"],
            "label": ["1", "0", "0", "0", "1"],
            "score": ["0.5", "0.5", "-1.25", "-1.25", "3"],
        }
    )


def _assert_names(error: DataError, row: int | None, field: str | None) -> None:
    """``.row`` / ``.field`` as expected, and the message names both."""
    assert error.row == row
    assert error.field == field
    message = str(error)
    assert message.startswith(f"row {row}" if row is not None else "all rows")
    if field is not None:
        assert repr(field) in message
    assert "\n" not in message


def _raises(table, fmt, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        encode_labels(table, fmt, **kwargs)
    return info.value


# -- reading ------------------------------------------------------------------


def _write(table: pd.DataFrame, path) -> None:
    suffix = path.suffix
    if suffix == ".csv":
        table.to_csv(path, index=False)
    elif suffix == ".tsv":
        table.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path, index=False)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_read_every_file_format_gives_the_same_encoding(tmp_path, suffix):
    table = _binary()
    path = tmp_path / f"labels{suffix}"
    _write(table, path)
    read = read_label_table(path)
    assert [str(c) for c in read.columns] == ["annotator", "item", "label"]
    assert len(read) == len(table)
    got, want = encode_labels(read, "binary"), encode_labels(table, "binary")
    assert got.annotator_ids == want.annotator_ids == ["ann-a", "ann-b", "ann-c"]
    assert got.item_ids == want.item_ids == ["007", "010", "x9"]  # "007" kept as text
    assert got.label_values == want.label_values == ("2", "1")
    np.testing.assert_array_equal(got.label, want.label)
    np.testing.assert_array_equal(got.annotator, want.annotator)
    np.testing.assert_array_equal(got.item, want.item)
    np.testing.assert_array_equal(got.row, np.arange(len(table)))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_typed_formats_write_integer_ids_as_strings(tmp_path, suffix):
    table = pd.DataFrame({"annotator": [3, 3, 12], "item": [7, 8, 7], "label": [0, 1, 1]})
    path = tmp_path / f"labels{suffix}"
    _write(table, path)
    labels = encode_labels(read_label_table(path), "binary")
    assert labels.annotator_ids == ["12", "3"]
    assert labels.item_ids == ["7", "8"]
    assert labels.label_values == ("1", "0")


def test_csv_cells_are_read_as_text(tmp_path):
    path = tmp_path / "scored.csv"
    path.write_text("label,score\n1,0.5\n0,nan\n")
    table = read_label_table(path)
    assert table["score"].tolist() == ["0.5", "nan"]  # not guessed into floats or NA


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        read_label_table(tmp_path / "nope.csv")
    _assert_names(info.value, None, None)
    assert "nope.csv" in str(info.value)


@pytest.mark.parametrize("name", ["empty.csv", "empty.tsv", "empty.jsonl", "empty.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        read_label_table(path)
    _assert_names(info.value, None, None)
    assert info.value.reason == "empty"
    assert "empty" in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_header_without_rows(tmp_path, suffix):
    path = tmp_path / f"header{suffix}"
    _write(_binary().iloc[:0], path)
    with pytest.raises(DataError) as info:
        read_label_table(path)
    _assert_names(info.value, None, None)
    assert info.value.reason == "empty"
    assert "no rows" in str(info.value)


def test_empty_frame_in_the_api():
    error = _raises(_binary().iloc[:0], "binary")
    _assert_names(error, None, None)
    assert error.reason == "empty"


# -- columns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "table", "extra"),
    [
        ("binary", _binary(), "score"),  # a scored column is not a binary one
        ("pairwise", _pairwise(), "comment"),
        ("scored", _scored(), "winner"),
    ],
)
def test_unknown_column_is_named(fmt, table, extra):
    table = table.assign(**{extra: "x"})
    error = _raises(table, fmt)
    _assert_names(error, None, extra)
    assert error.reason == "unknown_column"


@pytest.mark.parametrize(
    ("fmt", "table", "column"),
    [
        ("binary", _binary(), "label"),
        ("binary", _binary(), "item"),
        ("pairwise", _pairwise(), "loser"),
        ("scored", _scored(), "score"),
    ],
)
def test_missing_column_is_named(fmt, table, column):
    error = _raises(table.drop(columns=column), fmt)
    _assert_names(error, None, column)
    assert error.reason == "missing"


def test_unknown_format():
    error = _raises(_binary(), "ranked")
    _assert_names(error, None, "format")
    assert "ranked" in str(error)


# -- missing ids and values ---------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "table", "column"),
    [
        ("binary", _binary(), "annotator"),
        ("binary", _binary(), "item"),
        ("binary", _binary(), "label"),
        ("pairwise", _pairwise(), "annotator"),
        ("pairwise", _pairwise(), "winner"),
        ("pairwise", _pairwise(), "loser"),
        ("scored", _scored(), "annotator"),
        ("scored", _scored(), "item"),
        ("scored", _scored(), "label"),
        ("scored", _scored(), "score"),
    ],
)
@pytest.mark.parametrize("blank", ["", "  ", None, np.nan])
def test_missing_id_or_value_names_row_and_field(fmt, table, column, blank):
    table = table.astype(object)
    table.loc[2, column] = blank
    error = _raises(table, fmt)
    _assert_names(error, 2, column)
    expected = {"label": "missing_label", "score": "missing_score"}.get(column, "missing_id")
    assert error.reason == expected


def test_missing_id_after_dropped_ties_names_the_file_row():
    table = pd.DataFrame(
        {
            "annotator": ["a", "b", "c", "a", ""],
            "item": ["i", "i", "i", "j", "j"],
            "label": ["0", "1", "2", "0", "2"],
        }
    )
    error = _raises(table, "binary", tie_value="0")
    _assert_names(error, 4, "annotator")  # row 4 of the file, not of the kept rows


# -- scores -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_nonfinite_score_names_row_and_field(bad):
    table = _scored()
    table.loc[3, "score"] = bad
    table.loc[2, "score"] = bad  # i2's two labels keep one score
    error = _raises(table, "scored")
    _assert_names(error, 2, "score")
    assert error.reason == "bad_score"
    assert "finite" in str(error)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_float_score_in_typed_file(tmp_path, bad):
    table = pd.DataFrame({"label": [1, 0, 1], "score": [0.5, bad, 2.0]})
    path = tmp_path / "scored.parquet"
    table.to_parquet(path, index=False)
    with pytest.raises(DataError) as info:
        encode_labels(read_label_table(path), "scored")
    _assert_names(info.value, 1, "score")
    # a float NaN cell is how Parquet and JSON lines store a missing value
    assert info.value.reason in ("bad_score", "missing_score")


def test_score_that_is_not_a_number():
    table = _scored()
    table.loc[4, "score"] = "high"
    error = _raises(table, "scored")
    _assert_names(error, 4, "score")
    assert error.reason == "bad_score"
    assert "'high'" in str(error)


def test_one_item_has_one_score():
    table = _scored()
    table.loc[3, "score"] = "0.75"
    error = _raises(table, "scored")
    _assert_names(error, 3, "score")
    assert "row 2" in str(error)


# -- label values -------------------------------------------------------------


@pytest.mark.parametrize("bad", ["2", "-1", "0.5", "yes"])
def test_scored_label_outside_zero_one(bad):
    table = _scored()
    table.loc[3, "label"] = bad
    error = _raises(table, "scored")
    _assert_names(error, 3, "label")
    assert error.reason == "bad_label"
    assert repr(bad) in str(error)


@pytest.mark.parametrize("bad", ["3", "0", "tie"])
def test_binary_third_label_value_names_its_row(bad):
    table = _binary()
    table.loc[4, "label"] = bad
    error = _raises(table, "binary", tie_value=None)
    _assert_names(error, 4, "label")
    assert error.reason == "values"
    assert repr(bad) in str(error)


def test_pairwise_winner_equals_loser():
    table = _pairwise()
    table.loc[3, "loser"] = "cat"
    error = _raises(table, "pairwise")
    _assert_names(error, 3, "loser")
    assert "'cat'" in str(error)


def test_fewer_than_two_label_values():
    table = _binary().assign(label="2")
    error = _raises(table, "binary")
    _assert_names(error, None, "label")
    assert error.reason == "values"
    assert "fewer than two" in str(error)


# -- ties ---------------------------------------------------------------------


def _with_ties() -> pd.DataFrame:
    table = _binary()
    ties = pd.DataFrame({"annotator": ["ann-a", "ann-c"], "item": ["x9", "007"], "label": "0"})
    return pd.concat([table.iloc[:3], ties.iloc[:1], table.iloc[3:], ties.iloc[1:]]).reset_index(
        drop=True
    )


def test_ties_are_dropped_and_counted():
    table = _with_ties()
    labels = encode_labels(table, "binary", tie_value="0")
    assert labels.skipped == {"tie": 2}
    assert labels.num_labels == 6
    np.testing.assert_array_equal(labels.row, [0, 1, 2, 4, 5, 6])  # file rows
    assert labels.label_values == ("2", "1")
    same = encode_labels(_binary(), "binary")
    np.testing.assert_array_equal(labels.label, same.label)


def test_ties_without_a_tie_value_are_a_third_label_value():
    error = _raises(_with_ties(), "binary", tie_value=None)
    _assert_names(error, 3, "label")
    assert "tie_value" in str(error)


def test_auto_tie_value_is_zero_among_three_values():
    labels = encode_labels(_with_ties(), "binary")  # tie_value="auto"
    assert labels.skipped == {"tie": 2}
    assert labels.label_values == ("2", "1")
    spelled = _with_ties().assign(label=lambda t: t.label.replace("0", "Tie"))
    assert encode_labels(spelled, "binary").skipped == {"tie": 2}
    # Two values, one of them 0: a 0/1 coding, not ties.
    zero_one = _binary().assign(label=["0", "1", "0", "1", "1", "0"])
    assert encode_labels(zero_one, "binary").skipped == {}
    # A 0/1 coding with a stray value: no tie to guess, an error at the stray value.
    error = _raises(_binary().assign(label=["0", "1", "7", "1", "0", "1"]), "binary")
    _assert_names(error, 2, "label")


def test_every_label_a_tie():
    table = _binary().assign(label="0")
    error = _raises(table, "binary", tie_value="0")
    _assert_names(error, None, "label")


def test_one_value_left_after_ties():
    table = _binary().assign(label=["0", "1", "0", "1", "1", "0"])
    error = _raises(table, "binary", tie_value="0")
    _assert_names(error, None, "label")
    assert "fewer than two" in str(error)


# -- A/B coding ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "a", "b"),
    [
        (("1", "2"), "2", "1"),
        (("0", "1"), "1", "0"),
        (("9", "10"), "10", "9"),  # numbers compare as numbers, not text
        (("-1", "1"), "1", "-1"),
        (("left", "right"), "right", "left"),
    ],
)
def test_binary_a_is_the_larger_value(values, a, b):
    low, high = values
    table = _binary().assign(label=[low, high, high, high, low, low])
    labels = encode_labels(table, "binary")
    assert labels.label_values == (a, b)
    np.testing.assert_array_equal(labels.label, [0, 1, 1, 1, 0, 0])


def test_scored_label_is_a_preferred():
    labels = encode_labels(_scored(), "scored")
    np.testing.assert_array_equal(labels.label, [1, 0, 0, 0, 1])
    np.testing.assert_allclose(labels.score, [0.5, 0.5, -1.25, -1.25, 3.0])
    assert labels.item_ids == ["i1", "i2", "i3"]
    assert labels.has_annotators


def test_scored_without_annotators_has_one_global_annotator():
    labels = encode_labels(_scored().drop(columns=["annotator", "item"]), "scored")
    assert labels.annotator_ids == [GLOBAL_ANNOTATOR]
    assert not labels.has_annotators
    assert labels.item is None
    np.testing.assert_array_equal(labels.annotator, np.zeros(5))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_pairwise_a_b_order_is_label_independent():
    rng = np.random.default_rng(0)
    objects = [f"obj-{i}" for i in range(12)]
    pairs = [rng.choice(12, size=2, replace=False) for _ in range(40)]
    table = pd.DataFrame(
        {
            "annotator": [f"u{i % 3}" for i in range(40)],
            "winner": [objects[p[0]] for p in pairs],
            "loser": [objects[p[1]] for p in pairs],
        }
    )
    labels = encode_labels(table, "pairwise")
    flipped = table.copy()
    swap = rng.random(40) < 0.5
    flipped.loc[swap, ["winner", "loser"]] = table.loc[swap, ["loser", "winner"]].to_numpy()
    other = encode_labels(flipped, "pairwise")

    assert labels.object_ids == other.object_ids == sorted(objects)
    np.testing.assert_array_equal(labels.object_a, other.object_a)
    np.testing.assert_array_equal(labels.object_b, other.object_b)
    np.testing.assert_array_equal(other.label, np.where(swap, 1 - labels.label, labels.label))
    # A is never simply the winner: both outcomes occur
    assert 0 < labels.label.sum() < 40
    ids = labels.object_ids
    for j in range(40):
        a, b = ids[labels.object_a[j]], ids[labels.object_b[j]]
        assert _sha(a) < _sha(b)
        assert {a, b} == {table.winner[j], table.loser[j]}
        assert labels.label[j] == (a == table.winner[j])


# -- duplicates ---------------------------------------------------------------


def _duplicated() -> pd.DataFrame:
    table = _binary()
    extra = pd.DataFrame({"annotator": ["ann-b"], "item": ["007"], "label": ["1"]})
    return pd.concat([table, extra]).reset_index(drop=True)  # row 6 repeats row 1


def test_duplicate_label_names_both_rows():
    error = _raises(_duplicated(), "binary")
    _assert_names(error, 6, "annotator")
    assert error.reason == "duplicate"
    assert "row 1" in str(error)
    assert "'first' keeps the first" in str(error)


def test_duplicates_first_keeps_the_first():
    labels = encode_labels(_duplicated(), "binary", duplicates="first")
    assert labels.skipped == {"duplicate": 1}
    np.testing.assert_array_equal(labels.row, np.arange(6))
    assert labels.label[1] == 1  # row 1 said "2" (A); row 6 said "1"


def test_duplicate_rows_are_file_rows_after_ties():
    table = pd.concat([_with_ties(), _binary().iloc[[4]]]).reset_index(drop=True)
    error = _raises(table, "binary", tie_value="0")
    _assert_names(error, 8, "annotator")
    assert "row 5" in str(error)


def test_scored_duplicates():
    table = pd.concat([_scored(), _scored().iloc[[2]]]).reset_index(drop=True)
    error = _raises(table, "scored")
    _assert_names(error, 5, "annotator")
    assert "row 2" in str(error)
    labels = encode_labels(table, "scored", duplicates="first")
    assert labels.skipped == {"duplicate": 1}
    assert labels.num_labels == 5


def test_scored_without_annotators_has_no_duplicates():
    table = _scored().drop(columns="annotator")
    assert encode_labels(table, "scored").num_labels == 5


def test_unknown_duplicate_policy():
    with pytest.raises(ValueError, match="duplicates"):
        encode_labels(_binary(), "binary", duplicates="last")


# -- the Python API: lengths and identifiability -------------------------------


def test_columns_of_different_lengths():
    columns = {"annotator": ["a", "b", "c"], "item": ["i", "i", "j"], "label": [1, 0]}
    with pytest.raises(DataError) as info:
        fit_noise(columns, format="binary")
    _assert_names(info.value, None, None)
    assert info.value.reason == "length"
    message = str(info.value)
    assert "different lengths" in message
    assert "label=2" in message and "annotator=3" in message


def test_errors_in_a_dict_of_columns_name_the_row():
    columns = {
        "annotator": ["a", "b", "c", "a", "b"],
        "item": ["i", "i", "j", "j", "k"],
        "label": [1, 0, 7, 0, 1],
    }
    with pytest.raises(DataError) as info:
        fit_noise(columns, format="binary")
    _assert_names(info.value, 2, "label")


def _all_a_scored() -> pd.DataFrame:
    return _scored().assign(label="1")


@pytest.mark.parametrize(
    ("table", "fmt", "model", "shared", "pattern"),
    [
        (_binary(), "binary", "symmetric", False, "per-label truth with no scorer"),
        (_binary(), "binary", "boltzmann", None, "boltzmann model needs per-item scores"),
        (_pairwise(), "pairwise", "boltzmann", None, "boltzmann.*not identifiable"),
        (_pairwise(), "pairwise", "two-coin", None, "two-coin model reads the A/B position"),
        (_pairwise(), "pairwise", "spammer", None, "spammer model reads the A/B position"),
        (_pairwise(), "pairwise", "symmetric", True, "shared truth does not apply"),
        (_all_a_scored(), "scored", "two-coin", None, "every label says A"),
        (_all_a_scored(), "scored", "spammer", None, "every label says A"),
        (
            _scored().drop(columns="item"),
            "scored",
            "symmetric",
            True,
            "shared truth needs an 'item' column",
        ),
    ],
)
def test_unidentifiable_combinations_are_refused(table, fmt, model, shared, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        fit_noise(table, format=fmt, model=model, shared_truth=shared)
    assert "\n" not in str(info.value)


def test_all_a_scored_labels_are_fine_for_the_symmetric_model():
    fit = fit_noise(_all_a_scored(), format="scored", model="symmetric", max_iter=50)
    assert fit.annotators["eta"].between(0, 1).all()


@pytest.mark.parametrize(
    ("model", "pattern"),
    [("nope", "unknown noise model 'nope'"), ("hierarchical", "no reliability probability")],
)
def test_bad_model_or_prior(model, pattern):
    prior = "beta:2,2" if model == "hierarchical" else None
    with pytest.raises(ValueError, match=re.escape(pattern)):
        fit_noise(_binary(), format="binary", model=model, prior=prior)


@pytest.mark.parametrize("prior", ["gamma:1,1", "beta:1", "beta:0,2", "beta:a,b"])
def test_bad_prior(prior):
    with pytest.raises(ValueError, match="prior|Beta"):
        fit_noise(_binary(), format="binary", prior=prior)


# -- id order -------------------------------------------------------------------


@pytest.mark.parametrize("high", [10, 1_000, 10**6, 10**16, 10**18])
def test_integer_ids_take_their_text_order(high):
    from repo.data.ids import _text_order

    rng = np.random.default_rng(high % 97)
    numbers = np.unique(rng.integers(0, high, 3000))
    numbers = np.concatenate([numbers, [0, 1, 10, 100, 9, 99]]) if high > 100 else numbers
    numbers = np.unique(numbers)
    rng.shuffle(numbers)
    ordered = numbers[_text_order(numbers)].tolist()
    assert ordered == sorted(numbers.tolist(), key=str)
    negative = np.array([-1, 5, -10, 0, -2])
    assert negative[_text_order(negative)].tolist() == sorted(negative.tolist(), key=str)


def test_integer_and_text_ids_give_the_same_codes():
    rng = np.random.default_rng(0)
    annotator = rng.integers(0, 120, 400)
    item = np.arange(400)
    label = rng.integers(1, 3, 400)
    numbers = encode_labels(
        pd.DataFrame({"annotator": annotator, "item": item, "label": label}), "binary"
    )
    text = encode_labels(
        pd.DataFrame(
            {"annotator": annotator.astype(str), "item": item.astype(str), "label": label}
        ),
        "binary",
    )
    assert numbers.annotator_ids == text.annotator_ids
    assert np.array_equal(numbers.annotator, text.annotator)
    assert numbers.item_ids == text.item_ids
    assert np.array_equal(numbers.label, text.label)


@pytest.mark.parametrize("column", ["label", "annotator", "item"])
def test_a_gap_in_a_nullable_integer_column_names_its_row(column, tmp_path):
    table = pd.DataFrame(
        {
            "annotator": pd.array([1, 2, 3, 1], dtype="Int64"),
            "item": pd.array([10, 11, 12, 13], dtype="Int64"),
            "label": pd.array([1, 2, 2, 1], dtype="Int64"),
        }
    )
    table.loc[1, column] = pd.NA
    path = tmp_path / "labels.parquet"
    table.to_parquet(path)
    with pytest.raises(DataError) as info:
        encode_labels(read_label_table(path), "binary")
    reason = "missing_label" if column == "label" else "missing_id"
    assert (info.value.row, info.value.field, info.value.reason) == (1, column, reason)


def test_large_float_ids_are_written_exactly():
    table = pd.DataFrame({"annotator": [1e20, 2.0], "item": [3.0, 3.0], "label": [1, 2]})
    labels = encode_labels(table, "binary")
    assert labels.annotator_ids == ["100000000000000000000", "2"]
