"""Preference records, loaders and validation (repo.data.records / loaders / hh_rlhf / pandalm)."""

from __future__ import annotations

import gzip
import json
import pickle
import random
from pathlib import Path

import datasets
import pytest

from repo.data.errors import DataError
from repo.data.hh_rlhf import load_hh_rlhf, parse_hh_dialogue, split_hh_pair
from repo.data.loaders import load_preferences, split_shared_prompt
from repo.data.pandalm import PANDALM_ANNOTATORS, pandalm_label_table, read_pandalm
from repo.data.records import PreferenceData, PreferenceRecord, comparison_id, response_key
from repo.data.rule_pairs import GOOD_WORDS, rule_pairs, true_preferences

SHARED = Path("/work/shared/data")
HH_SPLITS = sorted((SHARED / "hh-rlhf-test").glob("*/test.jsonl.gz"))


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow cache out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"question {i}",
            "chosen": f"good answer {i} {rng.random():.6f}",
            "rejected": f"bad answer {i} {rng.random():.6f}",
        }
        for i in range(n)
    ]


def _chat(i: int) -> dict:
    return {
        "prompt": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"what is {i}?"},
        ],
        "chosen": [{"role": "assistant", "content": f"it is {i}"}],
        "rejected": [{"role": "assistant", "content": f"no idea about {i}"}],
    }


# ----------------------------------------------------------------------------- errors


def test_data_error_names_row_and_field():
    err = DataError("empty response", row=17, field="chosen", reason="empty")
    assert str(err) == "row 17, field 'chosen': empty response"
    assert isinstance(err, ValueError)
    assert (err.row, err.field, err.reason) == (17, "chosen", "empty")
    back = pickle.loads(pickle.dumps(err))
    assert (back.row, back.field, back.reason, str(back)) == (17, "chosen", "empty", str(err))
    assert str(DataError("missing column", field="prompt")).startswith("all rows, field 'prompt'")


# ----------------------------------------------------------------------------- A/B rule


def test_ab_order_is_label_independent():
    data = load_preferences(_pairs(400))
    assert len(data) == 400 and not data.shown_order
    share = sum(r.label for r in data) / len(data)
    assert 0.4 < share < 0.6  # chosen is always listed first, yet A is chosen ~half the time
    for r in data:
        assert response_key(r.response_a) < response_key(r.response_b)
        assert r.shown_order is False
        assert r.chosen.startswith("good") and r.rejected.startswith("bad")


def test_same_pair_same_a_whichever_was_chosen():
    row = {"prompt": "p", "chosen": "x", "rejected": "y"}
    flipped = {"prompt": "p", "chosen": "y", "rejected": "x"}
    a, b = load_preferences([row, flipped])
    assert (a.response_a, a.response_b) == (b.response_a, b.response_b)
    assert a.label + b.label == 1
    assert a.item == b.item == comparison_id("p", a.response_a, a.response_b)
    assert len(load_preferences([row, flipped]).items) == 1  # two labels of one item


def test_from_pair_rejects_identical():
    with pytest.raises(ValueError):
        PreferenceRecord.from_pair(prompt="p", chosen="x", rejected="x", row=0)


def test_position_column_sets_shown_order():
    rows = _pairs(4)
    for r, first in zip(rows, [True, False, 1, 0], strict=True):
        r["chosen_first"] = first
    data = load_preferences(rows, position_column="chosen_first")
    assert data.shown_order
    assert [r.label for r in data] == [1, 0, 1, 0]
    assert data[0].response_a == rows[0]["chosen"]
    assert data[1].response_a == rows[1]["rejected"]


# ----------------------------------------------------------------------------- validation


def test_missing_column_is_always_an_error():
    rows = [{"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataError, match=r"all rows, field 'rejected': missing column") as info:
        load_preferences(rows, on_invalid="skip")
    assert info.value.row is None and info.value.field == "rejected"
    with pytest.raises(DataError, match="field 'rater'"):
        load_preferences(_pairs(2), annotator_column="rater")


def test_null_annotator_names_row_and_field():
    rows = _pairs(3)
    for r, k in zip(rows, ["ann1", None, 7], strict=True):
        r["rater"] = k
    with pytest.raises(DataError, match=r"row 1, field 'rater': missing annotator id") as info:
        load_preferences(rows, annotator_column="rater")
    assert (info.value.row, info.value.field) == (1, "rater")
    data = load_preferences(rows, annotator_column="rater", on_invalid="skip")
    assert data.skipped == {"missing_id": 1}
    assert data.annotators == ["7", "ann1"]


def test_empty_response_skipped_and_counted():
    rows = _pairs(4)
    rows[2]["rejected"] = "   "
    data = load_preferences(rows)
    assert len(data) == 3 and data.skipped == {"empty": 1}
    with pytest.raises(DataError, match=r"row 2, field 'rejected': empty response"):
        load_preferences(rows, on_empty="error")
    kept = load_preferences(rows, on_empty="keep")
    assert len(kept) == 4 and kept.notes == {"empty": 1}


def test_identical_skipped_and_counted():
    rows = _pairs(4)
    rows[3]["rejected"] = rows[3]["chosen"]
    data = load_preferences(rows)
    assert len(data) == 3 and data.skipped == {"identical": 1}
    assert [r.row for r in data] == [0, 1, 2]
    with pytest.raises(DataError, match=r"row 3, field 'chosen/rejected': chosen is identical"):
        load_preferences(rows, on_identical="error")


@pytest.mark.parametrize(
    ("field", "value", "reason", "pattern"),
    [
        ("prompt", 5, "type", r"row 1, field 'prompt': prompt must be a string or a list"),
        ("chosen", None, "missing", r"row 1, field 'chosen': chosen is null"),
        ("rejected", ["x"], "type", r"row 1, field 'rejected': rejected must be a string"),
        ("chosen", 3.5, "type", r"row 1, field 'chosen': chosen must be a string, got float"),
    ],
)
def test_malformed_rows_name_row_and_field(field, value, reason, pattern):
    rows = _pairs(3)
    rows[1][field] = value
    with pytest.raises(DataError, match=pattern) as info:
        load_preferences(rows)
    assert (info.value.row, info.value.field, info.value.reason) == (1, field, reason)
    data = load_preferences(rows, on_invalid="skip")
    assert len(data) == 2 and data.skipped == {reason: 1}


def test_malformed_messages_and_rows():
    rows = [_chat(0), _chat(1), "not a row"]
    rows[1]["chosen"] = [{"role": "assistant"}]
    with pytest.raises(DataError, match=r"row 1, field 'chosen\[0\].content'"):
        load_preferences(rows)
    rows[1] = _chat(1)
    with pytest.raises(DataError, match=r"row 2, no single field: row must be a mapping"):
        load_preferences(rows)
    mixed = _chat(3)
    mixed["chosen"] = "plain text"
    with pytest.raises(DataError, match=r"row 0, field 'chosen': .*list of messages"):
        load_preferences([mixed])
    data = load_preferences([_chat(0), "bad", mixed], on_invalid="skip")
    assert len(data) == 1 and data.skipped == {"type": 2}


def test_bad_position_and_item():
    rows = _pairs(2)
    rows[0]["first"], rows[1]["first"] = True, 2
    with pytest.raises(DataError, match=r"row 1, field 'first': position must be"):
        load_preferences(rows, position_column="first")
    rows[1]["first"], rows[0]["id"], rows[1]["id"] = False, "a", None
    with pytest.raises(DataError, match=r"row 1, field 'id': missing item id"):
        load_preferences(rows, position_column="first", item_column="id")


def test_policy_arguments_checked():
    with pytest.raises(ValueError, match="on_invalid"):
        load_preferences(_pairs(1), on_invalid="ignore")


# ----------------------------------------------------------------------------- layouts


def test_conversational_layout_and_frames():
    rows = [_chat(i // 2) | {"rater": f"r{i % 2}", "pair": f"item{i // 2}"} for i in range(6)]
    data = load_preferences(rows, annotator_column="rater", item_column="pair")
    assert isinstance(data, PreferenceData) and len(data) == 6
    r = data[0]
    assert r.prompt == rows[0]["prompt"] and isinstance(r.response_a, list)
    assert {r.chosen[0]["content"] for r in data} == {f"it is {i}" for i in range(3)}
    assert data.annotators == ["r0", "r1"] and data.items == ["item0", "item1", "item2"]
    frame = data.labels_frame()
    assert list(frame.columns) == ["annotator", "item", "label"]
    assert frame["label"].dtype == "int64" and set(frame["label"]) <= {0, 1}
    full = data.to_pandas()
    assert list(full.columns) == [
        "item", "prompt", "response_a", "response_b", "label", "annotator", "shown_order", "row"
    ]  # fmt: skip
    assert load_preferences(_pairs(2)).labels_frame()["annotator"].tolist() == ["unknown"] * 2


def test_implicit_prompt_conversations():
    rows = []
    for i in range(5):
        c = _chat(i)
        rows.append({"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]})
    data = load_preferences(rows)  # no "prompt" column: implicit layout
    for r, c in zip(data, (_chat(i) for i in range(5)), strict=True):
        assert r.prompt == c["prompt"]
        assert r.chosen == c["chosen"] and r.rejected == c["rejected"]
    assert load_preferences(rows, prompt_column=None)[0].prompt == _chat(0)["prompt"]


def test_implicit_prompt_rules():
    assert split_shared_prompt("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")
    user = {"role": "user", "content": "u"}
    a1, a2 = {"role": "assistant", "content": "1"}, {"role": "assistant", "content": "2"}
    u2 = {"role": "user", "content": "v"}
    # diverging at a user turn backs off to the last assistant boundary
    assert split_shared_prompt([user, a1, user], [user, a1, u2]) == (
        [user],
        [a1, user],
        [a1, u2],
    )
    with pytest.raises(DataError, match="no_shared_prompt|share no prompt"):
        split_shared_prompt([user, a1], [u2, a2], row=4)
    data = load_preferences(
        [{"chosen": [user, a1], "rejected": [u2, a2]}, {"chosen": "x", "rejected": "x"}],
        on_invalid="skip",
    )
    assert len(data) == 0 and data.skipped == {"no_shared_prompt": 1, "identical": 1}


# ----------------------------------------------------------------------------- files


def _same(a: PreferenceData, b: PreferenceData) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == y


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "jsonl.gz", "json"])
def test_file_round_trips(tmp_path, suffix):
    rows = [_chat(i) | {"rater": f"r{i % 3}"} for i in range(12)]
    rows[5]["rejected"] = rows[5]["chosen"]
    expected = load_preferences(rows, annotator_column="rater")
    path = tmp_path / f"prefs.{suffix}"
    if suffix == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(lines) if suffix.endswith("gz") else lines)
    loaded = load_preferences(path, annotator_column="rater")
    _same(loaded, expected)
    assert loaded.skipped == {"identical": 1}
    _same(load_preferences(str(path), annotator_column="rater"), expected)


def test_dataset_sources():
    rows = _pairs(6)
    ds = datasets.Dataset.from_list(rows)
    _same(load_preferences(ds), load_preferences(rows))
    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(2))})
    assert len(load_preferences(dd, split="test")) == 2
    with pytest.raises(ValueError, match="split"):
        load_preferences(dd)
    with pytest.raises(ValueError, match="unsupported"):
        load_preferences(Path(__file__))
    with pytest.raises(TypeError):
        load_preferences(42)


# ----------------------------------------------------------------------------- HH-RLHF


H, A = "\n\nHuman:", "\n\nAssistant:"


def test_split_hh_pair_rule():
    prompt = f"{H} hi{A} hello{H} how are you?{A}"
    p, c, r, early = split_hh_pair(prompt + " fine", prompt + " bad")
    assert (p, c, r, early) == (prompt, " fine", " bad", False)
    # diverging before the last assistant turn: prompt = shared prefix up to its last marker
    first = f"{H} hi{A}"
    p, c, r, early = split_hh_pair(first + f" yes{H} ok{A} sure", first + " no")
    assert (p, c, r, early) == (first, f" yes{H} ok{A} sure", " no", True)
    with pytest.raises(ValueError, match="identical"):
        split_hh_pair(prompt, prompt)
    with pytest.raises(ValueError, match="share no"):
        split_hh_pair(f"{H} a{A} x", f"{H} b{A} y")


def test_parse_hh_dialogue():
    prompt = f"{H} hi{A} hello{H} how are you?{A}"
    assert parse_hh_dialogue(prompt) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
    ]
    assert parse_hh_dialogue(f" yes{H} ok{A} sure", first_role="assistant") == [
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "sure"},
    ]


def test_load_hh_rlhf_inline(tmp_path):
    base = f"{H} question{A}"
    rows = [
        {"chosen": base + " good", "rejected": base + " bad"},  # ordinary
        {"chosen": base + " same", "rejected": base + " same"},  # identical
        {"chosen": base + " ok", "rejected": base + " "},  # empty response
        {"chosen": base + f" a{H} more{A} b", "rejected": base + " c"},  # diverges early
        {"chosen": f"{H} x{A} y", "rejected": f"{H} z{A} w"},  # no shared prompt
    ]
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(DataError, match=r"row 4, field 'chosen/rejected'"):
        load_hh_rlhf(path)
    data = load_hh_rlhf(path, on_invalid="skip")
    assert len(data) == 2
    assert data.skipped == {"identical": 1, "empty": 1, "no_shared_prompt": 1}
    assert data.notes == {"diverge_early": 1}
    assert all(r.prompt == base and not r.shown_order and r.annotator is None for r in data)
    dropped = load_hh_rlhf(path, on_invalid="skip", diverge_early="skip")
    assert len(dropped) == 1 and dropped.skipped["diverge_early"] == 1
    with pytest.raises(DataError, match=r"row 3, .*diverge"):
        load_hh_rlhf(path, on_invalid="skip", diverge_early="error")
    msgs = load_hh_rlhf(path, on_invalid="skip", as_messages=True)
    assert msgs[0].prompt == [{"role": "user", "content": "question"}]
    assert {r.chosen[0]["content"] for r in msgs} == {"good", "a"}
    assert [m["role"] for m in msgs[1].chosen] == ["assistant", "user", "assistant"]


def test_shipped_hh_subsample():
    data = load_hh_rlhf()
    assert len(data) + sum(data.skipped.values()) == 2000
    assert data.skipped == {"empty": 7, "identical": 2}
    assert data.notes == {"diverge_early": 14}
    assert 0.45 < sum(r.label for r in data) / len(data) < 0.55
    assert len(data.items) == len(data)
    assert all(r.prompt.startswith(H) and r.prompt.endswith(A) for r in data)
    assert sum(A in r.response_a or A in r.response_b for r in data) == 14
    chat = load_hh_rlhf(as_messages=True)
    assert len(chat) == len(data) and chat[0].prompt[0]["role"] == "user"


@pytest.mark.skipif(not HH_SPLITS, reason="shared HH-RLHF test splits not present")
def test_hh_rule_counts_on_real_test_splits():
    data = load_hh_rlhf(HH_SPLITS)
    assert len(data) + sum(data.skipped.values()) == 8552
    assert data.skipped == {"identical": 36, "empty": 11}
    assert data.notes == {"diverge_early": 17}
    assert 0.47 < sum(r.label for r in data) / len(data) < 0.53
    # prompt + response reproduces the original dialogue
    with gzip.open(HH_SPLITS[0], "rt") as fh:
        first = json.loads(fh.readline())
    r = data[0]
    assert r.row == 0 and r.prompt + r.chosen == first["chosen"]
    assert r.prompt + r.rejected == first["rejected"]


# ----------------------------------------------------------------------------- PandaLM


def test_pandalm_shipped():
    data = read_pandalm()
    table, ties = pandalm_label_table()
    assert ties == 326 and data.skipped == {"tie": 326}
    assert len(data) == len(table) == 3 * 999 - 326
    assert table["item"].nunique() == 914 and len(data.items) == 914  # 85 all-tie items
    assert data.annotators == list(PANDALM_ANNOTATORS)
    assert data.shown_order and all(r.shown_order for r in data)
    assert data.notes == {"empty": 156, "bool_response": 14}
    frame = data.labels_frame()
    assert (table["label"].to_numpy() == 2 - frame["label"].to_numpy()).all()
    assert (table["item"].to_numpy() == frame["item"].to_numpy()).all()
    assert set(table["label"]) == {1, 2}
    first = data[0]  # idx 0: all three annotators said 2 (response2 better)
    assert first.item == "0" and first.label == 0 and first.annotator == "annotator1"
    assert (
        first.prompt.startswith("The sentence you are given") and "\n\nIf you have" in first.prompt
    )


@pytest.mark.skipif(not (SHARED / "pandalm").exists(), reason="shared PandaLM copy not present")
def test_pandalm_shipped_copy_matches_source():
    raw = json.loads((SHARED / "pandalm" / "testset-v1.json").read_text())
    assert len(raw) == 999 and len({r["idx"] for r in raw}) == 999
    _same(read_pandalm(SHARED / "pandalm" / "testset-v1.json"), read_pandalm())


def test_pandalm_inline(tmp_path):
    rows = [
        {"idx": 0, "instruction": "Do it", "input": "", "response1": "a", "response2": "b",
         "annotator1": 1, "annotator2": 2, "annotator3": 0},
        {"idx": 1, "instruction": "Do", "input": "this", "response1": True, "response2": "",
         "annotator1": 2, "annotator2": 2, "annotator3": 2},
    ]  # fmt: skip
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    data = read_pandalm(path)
    assert [(r.item, r.annotator, r.label) for r in data] == [
        ("0", "annotator1", 1),
        ("0", "annotator2", 0),
        ("1", "annotator1", 0),
        ("1", "annotator2", 0),
        ("1", "annotator3", 0),
    ]
    assert data[0].prompt == "Do it" and data[2].prompt == "Do\n\nthis"
    assert data[2].response_a == "True" and data[2].response_b == ""
    assert data.skipped == {"tie": 1} and data.notes == {"empty": 3, "bool_response": 3}
    assert len(read_pandalm(path, on_empty="skip")) == 2
    rows[1]["annotator3"] = 5
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 1, field 'annotator3': label must be"):
        read_pandalm(path)
    with pytest.raises(DataError, match=r"row 1, field 'annotator3'"):
        pandalm_label_table(path)
    assert len(read_pandalm(path, on_invalid="skip")) == 2


def test_item_id_reused_for_another_comparison():
    rows = _pairs(3)
    for r, item in zip(rows, ["a", "b", "a"], strict=True):
        r["pair"] = item
    with pytest.raises(DataError, match=r"row 2, field 'pair': item 'a' is a different comparison"):
        load_preferences(rows, item_column="pair")
    data = load_preferences(rows, item_column="pair", on_invalid="skip")
    assert len(data) == 2 and data.skipped == {"item_conflict": 1}
    same = [dict(rows[0], rater="x"), dict(rows[0], rater="y", chosen=rows[0]["rejected"],
                                           rejected=rows[0]["chosen"])]  # fmt: skip
    both = load_preferences(same, item_column="pair", annotator_column="rater")
    assert both.items == ["a"] and sorted(r.label for r in both) == [0, 1]


def test_true_preferences_of_loaded_rule_pairs_follow_the_rule():
    # rule pairs at flip rate 0.4, loaded as a user loads them (A/B in hash order): A is
    # truly the better response exactly where A carries a good marker word
    data = rule_pairs(200, [0.6], seed=3)
    records = load_preferences(data.rows, annotator_column="annotator")
    truth = true_preferences(data.rows, [r.label for r in records])
    good = set(GOOD_WORDS)
    marked = [float(bool(good & set(r.response_a.split()))) for r in records]
    assert truth.tolist() == marked
    assert 0.3 < truth.mean() < 0.7  # both orders occur
    with pytest.raises(ValueError, match="3 rows against 2 labels"):
        true_preferences(data.rows[:3], [1, 0])
