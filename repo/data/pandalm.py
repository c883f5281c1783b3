"""PandaLM human test set: 999 comparisons, each labelled by the same 3 annotators.

The file (``testset-v1.json``, a JSON list; Apache-2.0, github.com/WeOpenML/PandaLM,
shipped in ``repo/resources/data/pandalm/`` with its LICENSE and SOURCE.txt) has,
per comparison: ``idx``, ``motivation_app``, ``cmp_key``, ``instruction``,
``input``, ``response1``, ``response2`` and ``annotator1``..``annotator3`` with
0 = tie, 1 = response1 better, 2 = response2 better.

:func:`read_pandalm` policy:

* A = ``response1``, B = ``response2`` -- the order the annotators saw, so
  ``shown_order=True``; item id = ``str(idx)``; annotator id = the column name
  (``"annotator1"``...); ``row`` = the position in the JSON list.
* one record per (item, annotator) label; **ties are dropped** and counted in
  ``skipped["tie"]`` (326 of the 2,997 labels; 85 items are ties for all three
  annotators and so have no record: 914 items remain).
* prompt = ``instruction`` + (``"\\n\\n" + input`` when input is not blank).
* 6 responses are JSON booleans (``true``: the model's text "True", turned into a
  boolean upstream); they are read as the string ``"True"``/``"False"`` and counted
  (per record) in ``notes["bool_response"]``.
* 54 comparisons have an empty response (a model produced nothing); the
  annotators judged them, so they are real labels and kept by default
  (``on_empty="keep"``, counted per record in ``notes["empty"]``).
* anything else malformed (label not in {0, 1, 2}, non-string text) is a
  :class:`DataError` naming the row and field (``on_invalid``).

:func:`pandalm_label_table` gives the bare label table in the raw coding for the
noise code's "binary" label format: ``label`` is 1 (response1 = A preferred) or 2
(response2 = B preferred), ties removed and returned as a count.  So
``label_table.label == 2 - read_pandalm().labels_frame().label`` row for row.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from repo.data.errors import DataError
from repo.data.loaders import check_row
from repo.data.records import (
    Duplicates,
    OnEmpty,
    OnInvalid,
    PreferenceData,
    RecordCollector,
    check_id,
    check_text,
)

__all__ = [
    "PANDALM_ANNOTATORS",
    "PANDALM_TESTSET",
    "read_pandalm",
    "pandalm_label_table",
    "pandalm_prompt",
]

PANDALM_ANNOTATORS = ("annotator1", "annotator2", "annotator3")
PANDALM_TESTSET = "data/pandalm/testset-v1.json"
"""Path of the shipped test set inside the ``repo.resources`` package."""


def _read_json(path: str | os.PathLike | None) -> list[Any]:
    if path is None:
        text = resources.files("repo.resources").joinpath(PANDALM_TESTSET).read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    data = json.loads(text)
    if not isinstance(data, list):
        raise DataError(
            f"expected a JSON list of comparisons, got {type(data).__name__}", reason="type"
        )
    return data


def _label(row: dict[str, Any], i: int, annotator: str) -> int:
    value = row.get(annotator)
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise DataError(
            f"label must be 0 (tie), 1 or 2, got {value!r}",
            row=i,
            field=annotator,
            reason="missing" if value is None else "bad_label",
        )
    return int(value)


def _response(value: Any, i: int, field: str) -> tuple[str, bool]:
    if isinstance(value, bool):  # upstream turned the text "True" into JSON true
        return str(value), True
    return check_text(value, row=i, field=field, kind=str, what=field), False


def pandalm_prompt(instruction: str, input: str | None) -> str:
    """``instruction`` + ``"\\n\\n" + input`` when the input is not blank."""
    return instruction + ("\n\n" + input if input and input.strip() else "")


def read_pandalm(
    path: str | os.PathLike | None = None,
    *,
    on_invalid: OnInvalid = "error",
    on_empty: OnEmpty = "keep",
    duplicates: Duplicates = "error",
) -> PreferenceData:
    """One record per non-tie (item, annotator) label; A = response1 (shown order).

    ``path`` defaults to the copy shipped in the package.  Policy: module docstring.
    """
    collector = RecordCollector(
        on_invalid=on_invalid, on_empty=on_empty, on_identical="skip", duplicates=duplicates
    )
    for i, row in enumerate(_read_json(path)):
        try:
            row = check_row(row, row_index=i)
            item = check_id(row.get("idx"), row=i, field="idx", what="item id")
            instruction = check_text(
                row.get("instruction"), row=i, field="instruction", kind=str, what="instruction"
            )
            extra = row.get("input")
            if extra is not None:
                extra = check_text(extra, row=i, field="input", kind=str, what="input")
            r1, bool1 = _response(row.get("response1"), i, "response1")
            r2, bool2 = _response(row.get("response2"), i, "response2")
            labels = {a: _label(row, i, a) for a in PANDALM_ANNOTATORS}
        except DataError as error:
            collector.invalid(error)
            continue
        prompt = pandalm_prompt(instruction, extra)
        for annotator, value in labels.items():
            if value == 0:
                collector.skip("tie")
                continue
            chosen, rejected = (r1, r2) if value == 1 else (r2, r1)
            record = collector.add_pair(
                prompt=prompt,
                chosen=chosen,
                rejected=rejected,
                row=i,
                annotator=annotator,
                item=item,
                chosen_first=value == 1,
                chosen_field="response1" if value == 1 else "response2",
                rejected_field="response2" if value == 1 else "response1",
            )
            if record is not None and (bool1 or bool2):
                collector.note("bool_response")
    return collector.result()


def pandalm_label_table(path: str | os.PathLike | None = None) -> tuple[pd.DataFrame, int]:
    """``(DataFrame(annotator, item, label), ties)`` in the raw coding, ties removed.

    ``label`` is 1 (response1 preferred) or 2 (response2 preferred); ``item`` is
    ``str(idx)``; rows are ordered by item, then annotator.  Every row is validated
    (a bad label or id raises :class:`DataError`).  Unlike :func:`read_pandalm`, no
    row is dropped for its responses: this is the label table only.
    """
    annotators, items, labels, ties = [], [], [], 0
    for i, row in enumerate(_read_json(path)):
        row = check_row(row, row_index=i)
        item = check_id(row.get("idx"), row=i, field="idx", what="item id")
        for annotator in PANDALM_ANNOTATORS:
            value = _label(row, i, annotator)
            if value == 0:
                ties += 1
                continue
            annotators.append(annotator)
            items.append(item)
            labels.append(value)
    frame = pd.DataFrame(
        {
            "annotator": annotators,
            "item": items,
            "label": pd.Series(labels, dtype="int64"),
        }
    )
    return frame, ties
