"""Label tables for noise fitting: reading, validating and encoding.

Three layouts (the ``format``), each a table with a header:

* ``binary``: ``annotator, item, label``. ``label`` takes two distinct values
  (e.g. 1 and 2); the truth is shared by an item's labels. The larger value is
  "A" (label 1 for the noise models), the smaller "B".
* ``pairwise``: ``annotator, winner, loser`` (crowd ranking: Bradley-Terry scores
  are learned). Each row is its own comparison; A/B is a label-independent order
  of the two objects (the smaller sha256 of the id is A), never "A = winner".
* ``scored``: ``label, score`` and optionally ``annotator`` (one global annotator
  without it) and ``item`` (needed for shared truth). ``label`` is 1 when A was
  preferred and 0 otherwise; ``score`` is the fixed logit that A is better.

Policies, stated once:

* ties (binary): rows whose label equals ``tie_value`` are dropped and counted.
  By default (``tie_value="auto"``) the values 0, 1, 2 are read as PandaLM codes
  them (0 a tie, 1 and 2 a preference), and a value ``tie`` (any case) beside two
  others is a tie; ``tie_value=None`` recognises no tie;
* duplicate ``(annotator, item)`` labels (binary; scored with items): an error
  naming both rows, unless ``duplicates="first"`` keeps the first (counted as
  ``duplicate``), the policy of training data too (:mod:`repo.data.records`);
* a malformed row: an error naming its row and field (``on_invalid="error"``), or
  left out and counted by reason (``"skip"``): ``missing_id``, ``bad_id`` (the id
  rule of :mod:`repo.data.ids`, shared with training data), ``missing_label``
  (blank, null, NaN or text spelling NaN), ``bad_label``, ``missing_score``,
  ``bad_score`` and ``self_comparison`` (pairwise: winner == loser); a row is
  counted once, under the first of these it fails (in column order);
* rows are numbered from 0 in file order, header excluded.

Every problem is a :class:`~repo.data.errors.DataError` naming the row and field;
:attr:`EncodedLabels.skipped` counts the rows left out by reason (ties too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from repo.data.errors import DataError
from repo.data.ids import BAD_ID, MISSING_ID, IdColumn, encode_id_column
from repo.data.tables import read_table

FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "binary": (("annotator", "item", "label"), ()),
    "pairwise": (("annotator", "winner", "loser"), ()),
    "scored": (("label", "score"), ("annotator", "item")),
}
"""format -> (required columns, optional columns)."""

MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"
MISSING_SCORE = "missing_score"
BAD_SCORE = "bad_score"
SELF_COMPARISON = "self_comparison"
"""Reasons under which ``on_invalid="skip"`` counts a row (with ``missing_id`` and
``bad_id`` of :mod:`repo.data.ids`)."""

GLOBAL_ANNOTATOR = "all"
"""The one annotator's id when a scored table has no annotator column."""


def read_label_table(path: str | Path) -> pd.DataFrame:
    """Read CSV, TSV, JSON lines or Parquet (:func:`repo.data.tables.read_table`, the
    reader training data come through too) as a DataFrame; every cell as read.

    CSV and TSV cells are text (nothing guessed), so that validation can say
    exactly which cell is wrong; JSON and Parquet integers stay integers (nullable
    ones too), Arrow text stays Arrow-backed text.
    """
    table = read_table(path)
    if table.num_rows == 0:
        raise DataError(f"{path} has a header but no rows", reason="empty")
    return table.to_pandas(types_mapper=_NULLABLE.get)


_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}
"""Arrow integers as pandas' nullable integers (a gap stays a gap, not a float)."""


@dataclass
class EncodedLabels:
    """A validated label table as integer codes.

    :param annotator: ``(N,)`` annotator code; ids in :attr:`annotator_ids`.
    :param label: ``(N,)`` 1 when A was preferred.
    :param row: ``(N,)`` the label's row in the table.
    :param item: ``(N,)`` item code (binary; scored with an item column).
    :param score: ``(N,)`` the fixed logit for A (scored).
    :param object_a: ``(N,)`` object code shown as A (pairwise); ids in
        :attr:`object_ids`.
    :param label_values: binary only: the raw values meaning A and B.
    :param skipped: rows left out by a stated policy, by reason.
    """

    format: str
    annotator: np.ndarray
    annotator_ids: list[str]
    label: np.ndarray
    row: np.ndarray
    item: np.ndarray | None = None
    item_ids: list[str] | None = None
    score: np.ndarray | None = None
    object_a: np.ndarray | None = None
    object_b: np.ndarray | None = None
    object_ids: list[str] | None = None
    label_values: tuple[str, str] | None = None
    has_annotators: bool = True
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return int(self.label.shape[0])


def _floats(
    values: pd.Series, *, nan_text_missing: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(numbers, missing, bad)``: the column as floats, with its missing cells
    (blank, null; a NaN in a typed column, which is how JSON and Parquet store a
    gap; text spelling NaN when ``nan_text_missing``) and its bad ones (not a
    finite number) flagged."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(numbers)
        return numbers, missing, ~missing & ~np.isfinite(numbers)
    blank = np.array(values.isna().to_numpy(dtype=bool))
    if _all_text(values):
        blank |= values.str.strip().eq("").to_numpy(dtype=bool, na_value=True)
    else:  # mixed cells: a float NaN is a gap
        blank |= np.array([isinstance(v, float) and v != v for v in values.tolist()], dtype=bool)
    numbers = pd.to_numeric(values.where(~blank), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    missing = blank | (_spelled_nan(values) if nan_text_missing else False)
    return numbers, missing, ~missing & ~np.isfinite(numbers)


def _spelled_nan(values: pd.Series) -> np.ndarray:
    """Cells that spell NaN (``nan``, ``NaN``: a CSV's way of writing a gap)."""
    if not (pd.api.types.is_string_dtype(values.dtype) or values.dtype == object):
        return np.zeros(len(values), dtype=bool)
    text = values.astype(str).str.strip().str.lower()
    return text.eq("nan").to_numpy(dtype=bool, na_value=False)


def _all_text(column: pd.Series) -> bool:
    return pd.api.types.infer_dtype(column, skipna=True) in ("string", "empty")


class _RowChecks:
    """The ``on_invalid`` policy over a table's rows.

    Each check flags rows with a reason and a field; :meth:`resolve` raises for the
    first flagged row (``on_invalid="error"``; the earliest row, the first check
    on that row) or drops every flagged row and counts it once, under its first
    check's reason (``"skip"``).
    """

    def __init__(self, n: int, on_invalid: str) -> None:
        self.n = n
        self.on_invalid = on_invalid
        self.checks: list[tuple[np.ndarray, str, str, Callable[[int], str]]] = []

    def add(self, mask: np.ndarray, reason: str, field: str, message: Callable[[int], str]):
        if mask.any():
            self.checks.append((mask, reason, field, message))

    def add_ids(self, column: IdColumn, field: str, what: str) -> None:
        self.add(column.missing, MISSING_ID, field, lambda row: f"missing {what}")
        self.add(
            column.bad,
            BAD_ID,
            field,
            lambda row: (
                f"{what} must be text or an integer, got "
                f"{column.problems.get(row, 'a value that is neither')}"
            ),
        )

    def resolve(self) -> tuple[np.ndarray, dict[str, int]]:
        """``(keep, skipped)``: the rows kept and the skipped rows by reason.

        :raises DataError: the first failing row under ``on_invalid = "error"``; no row
            left (``reason="empty"``).
        """
        keep = np.ones(self.n, dtype=bool)
        if not self.checks:
            if not keep.any():
                raise DataError("every row is malformed (skipped: {})", reason="empty")
            return keep, {}
        if self.on_invalid == "error":
            firsts = [int(np.argmax(mask)) for mask, *_ in self.checks]
            _, reason, field, message = self.checks[int(np.argmin(firsts))]
            row = min(firsts)
            raise DataError(message(row), row=row, field=field, reason=reason)
        skipped: dict[str, int] = {}
        for mask, reason, _, _ in self.checks:
            new = mask & keep
            if new.any():
                skipped[reason] = skipped.get(reason, 0) + int(new.sum())
                keep &= ~mask
        if not keep.any():
            raise DataError(f"every row is malformed (skipped: {skipped})", reason="empty")
        return keep, skipped


def _check_duplicates(
    annotator: np.ndarray, item: np.ndarray, rows: np.ndarray, duplicates: str
) -> np.ndarray:
    """Indices of the labels kept under the duplicate policy."""
    key = annotator.astype(np.int64) * (int(item.max(initial=0)) + 1) + item
    ordered = np.sort(key)
    if not (ordered[1:] == ordered[:-1]).any():
        return np.arange(key.shape[0])
    _, first = np.unique(key, return_index=True)
    if duplicates == "first":
        return np.sort(first)
    seen: dict[int, int] = {}
    for index, k in enumerate(key.tolist()):
        if k in seen:
            raise DataError(
                f"duplicate label: the same annotator labelled this item at row "
                f"{int(rows[seen[k]])} (policy: duplicates='error'; 'first' keeps the first)",
                row=int(rows[index]),
                field="annotator",
                reason="duplicate",
            )
        seen[k] = index
    raise AssertionError("unreachable")


def _order_key(object_id: str) -> str:
    return hashlib.sha256(object_id.encode()).hexdigest()


def _present(column: IdColumn, keep: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes of the kept rows, renumbered over the ids they still use (in order)."""
    return _renumber(column.codes[keep], column.ids)


def _check_columns(table: pd.DataFrame, fmt: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}", field="format")
    required, optional = FORMATS[fmt]
    columns = [str(c) for c in table.columns]
    for column in columns:
        if column not in required + optional:
            allowed = ", ".join(required + optional)
            raise DataError(
                f"unknown column for the {fmt} format (it takes: {allowed})",
                field=column,
                reason="unknown_column",
            )
    for column in required:
        if column not in columns:
            raise DataError(
                f"missing column (columns: {', '.join(columns)})", field=column, reason="missing"
            )
    if table.shape[0] == 0:
        raise DataError("the table has no rows", reason="empty")


def encode_labels(
    table: pd.DataFrame,
    fmt: str,
    *,
    tie_value: str | None = "auto",
    duplicates: str = "error",
    on_invalid: str = "error",
) -> EncodedLabels:
    """Validate ``table`` in layout ``fmt`` and encode it; see the module docstring.

    :param tie_value: binary only: the label value of a tie, ``"auto"`` or None.
    :param duplicates: ``"error"`` or ``"first"`` (keep the first label).
    :param on_invalid: ``"error"`` (a :class:`DataError` for the first malformed
        row) or ``"skip"`` (malformed rows left out, counted by reason).
    """
    if duplicates not in ("error", "first"):
        raise ValueError(f"duplicates must be 'error' or 'first', got {duplicates!r}")
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    _check_columns(table, fmt)
    table = table.reset_index(drop=True)
    n = table.shape[0]
    checks = _RowChecks(n, on_invalid)
    if fmt == "binary":
        return _encode_binary(table, checks, tie_value, duplicates)
    if fmt == "pairwise":
        return _encode_pairwise(table, checks)
    return _encode_scored(table, checks, duplicates)


def _encode_binary(
    table: pd.DataFrame, checks: _RowChecks, tie_value: str | None, duplicates: str
) -> EncodedLabels:
    annotators = encode_id_column(table["annotator"])
    items = encode_id_column(table["item"])
    values = encode_id_column(table["label"])  # labels coded as ids: 2, 2.0, "2" alike
    spelled_nan = [code for code, text in enumerate(values.ids) if text.lower() == "nan"]
    if spelled_nan:  # a CSV's way of writing a gap
        values.missing = values.missing | np.isin(values.codes, spelled_nan)
    checks.add_ids(annotators, "annotator", "annotator id")
    checks.add_ids(items, "item", "item id")
    checks.add(values.missing, MISSING_LABEL, "label", lambda row: "missing label")
    checks.add(
        values.bad,
        BAD_LABEL,
        "label",
        lambda row: f"label must be text or an integer, got {values.problems.get(row, '?')}",
    )
    keep, skipped = checks.resolve()
    rows = np.flatnonzero(keep)
    code = values.codes[keep]
    raw_values = values.ids
    if tie_value == "auto":
        tie_value = _auto_tie_value([raw_values[i] for i in np.unique(code)])
    if tie_value is not None and str(tie_value) in raw_values:
        not_tie = code != raw_values.index(str(tie_value))
        if (~not_tie).any():
            skipped["tie"] = int((~not_tie).sum())
        keep[rows[~not_tie]] = False
        rows, code = rows[not_tie], code[not_tie]
        if not code.shape[0]:
            raise DataError("every label is a tie", field="label", reason="empty")
    counts = np.bincount(code, minlength=len(raw_values))
    present = [i for i in range(len(raw_values)) if counts[i]]
    ordered = sorted((raw_values[i] for i in present), key=_value_order)
    if len(ordered) < 2:
        raise DataError(
            f"fewer than two label values (only {ordered!r}): nothing to tell apart",
            field="label",
            reason="values",
        )
    if len(ordered) > 2:
        # The format's set: the two most frequent values (first seen wins ties).
        first_seen = sorted(present, key=lambda i: int(np.argmax(code == i)))
        kept = sorted(first_seen, key=lambda i: -counts[i])[:2]
        third = int(np.argmax(~np.isin(code, kept)))
        raise DataError(
            f"label value {raw_values[code[third]]!r} outside the format's set: the binary "
            f"format takes two values and this table has {ordered!r} (a tie? name it with "
            "tie_value)",
            row=int(rows[third]),
            field="label",
            reason="values",
        )
    a_value, b_value = ordered[1], ordered[0]
    label = (code == raw_values.index(a_value)).astype(np.int64)
    annotator, annotator_ids = _present(annotators, keep)
    item, item_ids = _present(items, keep)
    kept = _check_duplicates(annotator, item, rows, duplicates)
    if kept.shape[0] < rows.shape[0]:
        skipped["duplicate"] = int(rows.shape[0] - kept.shape[0])
    annotator, annotator_ids = _renumber(annotator[kept], annotator_ids)
    item, item_ids = _renumber(item[kept], item_ids)
    return EncodedLabels(
        format="binary",
        annotator=annotator,
        annotator_ids=annotator_ids,
        label=label[kept],
        row=rows[kept],
        item=item,
        item_ids=item_ids,
        label_values=(a_value, b_value),
        skipped=skipped,
    )


def _renumber(codes: np.ndarray, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Codes over the ids still used, in the same (sorted) order."""
    used = np.zeros(len(ids), dtype=bool)
    used[codes] = True
    if used.all():
        return codes, ids
    renumber = np.cumsum(used) - 1
    return renumber[codes], [i for i, u in zip(ids, used, strict=True) if u]


def _encode_pairwise(table: pd.DataFrame, checks: _RowChecks) -> EncodedLabels:
    n = table.shape[0]
    annotators = encode_id_column(table["annotator"])
    both = pd.concat([table["winner"], table["loser"]], ignore_index=True)
    objects = encode_id_column(both)
    halves = {
        name: IdColumn(
            objects.codes[part],
            objects.ids,
            objects.missing[part],
            objects.bad[part],
            {row - part.start: p for row, p in objects.problems.items() if row in range(n)}
            if name == "winner"
            else {row - n: p for row, p in objects.problems.items() if row >= n},
        )
        for name, part in (("winner", slice(0, n)), ("loser", slice(n, 2 * n)))
    }
    checks.add_ids(annotators, "annotator", "annotator id")
    checks.add_ids(halves["winner"], "winner", "winner id")
    checks.add_ids(halves["loser"], "loser", "loser id")
    w_all, l_all = halves["winner"].codes, halves["loser"].codes
    same = (w_all == l_all) & (w_all >= 0)
    checks.add(
        same,
        SELF_COMPARISON,
        "loser",
        lambda row: f"winner equals loser ({objects.ids[w_all[row]]!r}): a self-comparison",
    )
    keep, skipped = checks.resolve()
    rows = np.flatnonzero(keep)
    annotator, annotator_ids = _present(annotators, keep)
    w_code, l_code = w_all[keep], l_all[keep]
    codes, object_ids = _renumber(np.concatenate([w_code, l_code]), objects.ids)
    w_code, l_code = codes[: rows.shape[0]], codes[rows.shape[0] :]
    keys = np.array([_order_key(o) for o in object_ids])
    winner_is_a = keys[w_code] < keys[l_code]
    return EncodedLabels(
        format="pairwise",
        annotator=annotator,
        annotator_ids=annotator_ids,
        label=winner_is_a.astype(np.int64),
        row=rows,
        object_a=np.where(winner_is_a, w_code, l_code),
        object_b=np.where(winner_is_a, l_code, w_code),
        object_ids=object_ids,
        skipped=skipped,
    )


def _encode_scored(table: pd.DataFrame, checks: _RowChecks, duplicates: str) -> EncodedLabels:
    has_annotators = "annotator" in table.columns
    annotators = encode_id_column(table["annotator"]) if has_annotators else None
    items = encode_id_column(table["item"]) if "item" in table.columns else None
    if annotators is not None:
        checks.add_ids(annotators, "annotator", "annotator id")
    if items is not None:
        checks.add_ids(items, "item", "item id")
    label, label_missing, label_bad = _floats(table["label"], nan_text_missing=True)
    score, score_missing, score_bad = _floats(table["score"], nan_text_missing=False)
    checks.add(label_missing, MISSING_LABEL, "label", lambda row: "missing label")
    outside = ~label_missing & (label_bad | (label != 0) & (label != 1))
    checks.add(
        outside,
        BAD_LABEL,
        "label",
        lambda row: (
            f"label value {table['label'].iloc[row]!r} outside the format's set "
            "{0, 1} (1: response A preferred)"
        ),
    )
    checks.add(score_missing, MISSING_SCORE, "score", lambda row: "missing value")
    checks.add(score_bad, BAD_SCORE, "score", lambda row: _score_problem(table["score"], row))
    keep, skipped = checks.resolve()
    rows = np.flatnonzero(keep)
    score, label = score[keep], label[keep].astype(np.int64)
    if annotators is not None:
        annotator, annotator_ids = _present(annotators, keep)
    else:
        annotator, annotator_ids = np.zeros(rows.shape[0], dtype=np.int64), [GLOBAL_ANNOTATOR]
    item = item_ids = None
    kept = np.arange(rows.shape[0])
    if items is not None:
        item, item_ids = _present(items, keep)
        first = np.zeros(len(item_ids), dtype=np.int64)
        first[item[::-1]] = np.arange(len(item))[::-1]  # each item's first row
        differs = score != score[first[item]]
        if differs.any():
            at = int(np.argmax(differs))
            raise DataError(
                f"score {score[at]!r} differs from {score[first[item[at]]]!r} at row "
                f"{int(rows[first[item[at]]])} for the same item: an item has one score",
                row=int(rows[at]),
                field="score",
                reason="inconsistent",
            )
        if has_annotators:
            kept = _check_duplicates(annotator, item, rows, duplicates)
            if kept.shape[0] < rows.shape[0]:
                skipped["duplicate"] = int(rows.shape[0] - kept.shape[0])
            item, item_ids = _renumber(item[kept], item_ids)
    if has_annotators:
        annotator, annotator_ids = _renumber(annotator[kept], annotator_ids)
    else:
        annotator = annotator[kept]
    return EncodedLabels(
        format="scored",
        annotator=annotator,
        annotator_ids=annotator_ids,
        label=label[kept],
        row=rows[kept],
        item=item,
        item_ids=item_ids,
        score=score[kept],
        has_annotators=has_annotators,
        skipped=skipped,
    )


def _score_problem(values: pd.Series, row: int) -> str:
    value = values.iloc[row]
    try:
        float(value)
    except (TypeError, ValueError):
        return f"not a number: {value!r}"
    return f"not finite: {value!r}"


def _auto_tie_value(raw: list[str]) -> str | None:
    """The tie value under the ``"auto"`` policy: ``0`` when the label values are
    exactly 0, 1 and 2 (0 tie; PandaLM's coding), ``tie`` (any case) when it is one
    of three values; otherwise none. ``raw``: the labels, or their distinct values."""
    values = set(raw)
    if len(values) != 3:
        return None
    if values == {"0", "1", "2"}:
        return "0"
    ties = [v for v in values if v.strip().lower() == "tie"]
    return ties[0] if ties else None


def _value_order(value: str) -> tuple[int, float | str]:
    """Numeric values sort as numbers, others as text."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
