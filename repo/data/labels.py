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
  naming both rows, unless ``duplicates="first"`` keeps the first;
* rows are numbered from 0 in file order, header excluded.

Every problem is a :class:`~repo.data.errors.DataError` naming the row and field.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from repo.data.errors import DataError

FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "binary": (("annotator", "item", "label"), ()),
    "pairwise": (("annotator", "winner", "loser"), ()),
    "scored": (("label", "score"), ("annotator", "item")),
}
"""format -> (required columns, optional columns)."""

GLOBAL_ANNOTATOR = "all"
"""The one annotator's id when a scored table has no annotator column."""


def read_label_table(path: str | Path) -> pd.DataFrame:
    """Read CSV, TSV, JSONL (or JSON lines ``.json``) or Parquet; every cell as read.

    CSV and TSV cells are read as strings (nothing guessed), so that validation
    can say exactly which cell is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}", field=None, reason="missing")
    suffixes = [s.lower() for s in path.suffixes]
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty", reason="empty")
    try:
        if suffixes and suffixes[-1] == ".parquet":
            table = pd.read_parquet(path)
        elif (
            suffixes
            and suffixes[-1] in (".jsonl", ".json", ".ndjson")
            or suffixes[-2:]
            == [
                ".jsonl",
                ".gz",
            ]
        ):
            table = pd.read_json(path, lines=True, dtype=False)
        elif suffixes and suffixes[-1] in (".tsv", ".tab"):
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        else:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"cannot read {path}: {error}", reason="unreadable") from error
    if table.shape[0] == 0:
        raise DataError(f"{path} has a header but no rows", reason="empty")
    return table


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
    :param dropped: rows dropped by a stated policy, by reason.
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
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return int(self.label.shape[0])


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _id_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _missing_mask(column: pd.Series) -> np.ndarray:
    """Vectorised :func:`_is_missing` over a column."""
    missing = column.isna().to_numpy()
    if column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
        blank = column.str.strip().eq("").fillna(False).to_numpy(dtype=bool)
        missing = missing | blank
    return missing


def _all_text(column: pd.Series) -> bool:
    return pd.api.types.infer_dtype(column, skipna=False) == "string"


def _ids(table: pd.DataFrame, column: str) -> list[str]:
    """The column as id strings; a missing id is an error naming its row.

    Integral floats (JSON integers in a column with a null) are written as
    integers, so ids round-trip whatever file format carried them.
    """
    values = table[column]
    missing = _missing_mask(values)
    if missing.any():
        raise DataError("missing id", row=int(np.argmax(missing)), field=column, reason="missing")
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.astype(str).tolist()
    if _all_text(values):
        return values.str.strip().tolist()
    return [_id_text(v) for v in values.tolist()]


def _codes(ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer codes of ``ids`` in the sorted order of the distinct ids."""
    codes, uniques = pd.factorize(np.asarray(ids, dtype=object), sort=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def _id_codes(table: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str]]:
    """:func:`_codes` of :func:`_ids`, without writing every cell as text when the
    column holds integers: those are coded first and only the distinct ids are
    written, then put in text order (so every file format gives the same codes)."""
    values = table[column]
    if pd.api.types.is_float_dtype(values.dtype):
        numbers = values.to_numpy()
        exact = np.isfinite(numbers).all() and (np.abs(numbers) < 2**53).all()
        if exact and (numbers == np.round(numbers)).all():
            values = values.astype(np.int64)
    if (
        not pd.api.types.is_integer_dtype(values.dtype)
        or values.hasnans  # a nullable integer column with a gap: named by _ids
        or (pd.api.types.is_unsigned_integer_dtype(values.dtype) and values.max() >= 2**63)
    ):
        return _codes(_ids(table, column))
    codes, uniques = pd.factorize(values.to_numpy(), sort=False)
    order = _text_order(uniques.astype(np.int64))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return rank[codes].astype(np.int64), [str(u) for u in uniques[order].tolist()]


def _text_order(numbers: np.ndarray) -> np.ndarray:
    """``argsort`` of the integers' decimal strings, without writing them.

    For ``n >= 0`` with ``d`` digits, the string of ``n`` sorts as the integer
    ``n * 10^(D - d)`` (its digits left-aligned to ``D`` places), a prefix before
    its extensions (``"1"`` before ``"10"``): a sort on ``(n 10^(D - d), d)``.
    Negative numbers and more than 17 digits sort the strings themselves.
    """
    powers = 10 ** np.arange(1, 18, dtype=np.int64)
    if numbers.shape[0] == 0 or numbers.min() < 0 or numbers.max() >= powers[-1]:
        text = np.asarray([str(n) for n in numbers.tolist()], dtype=object)
        return np.argsort(text, kind="stable")
    digits = 1 + np.searchsorted(powers, numbers, side="right")
    width = int(digits.max())
    aligned = numbers * 10 ** (width - digits)
    return np.argsort(aligned * 20 + digits, kind="stable")


def _floats(table: pd.DataFrame, column: str) -> np.ndarray:
    """The column as finite floats; the first bad cell is an error naming its row."""
    values = table[column]
    missing = _missing_mask(values)
    numbers = pd.to_numeric(values.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    bad = missing | ~np.isfinite(numbers)
    if bad.any():
        row = int(np.argmax(bad))
        value = values.iloc[row]
        if missing[row]:
            raise DataError("missing value", row=row, field=column, reason="missing")
        try:
            float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"not a number: {value!r}", row=row, field=column, reason="type"
            ) from None
        raise DataError(f"not finite: {value!r}", row=row, field=column, reason="nonfinite")
    return numbers


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


def _check_duplicates(
    annotator: np.ndarray, item: np.ndarray, rows: np.ndarray, duplicates: str
) -> np.ndarray:
    """Indices of the labels kept under the duplicate policy."""
    key = annotator.astype(np.int64) * (int(item.max()) + 1) + item
    if pd.Index(key).is_unique:  # a hash pass; the sort below only when needed
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


def encode_labels(
    table: pd.DataFrame,
    fmt: str,
    *,
    tie_value: str | None = "auto",
    duplicates: str = "error",
) -> EncodedLabels:
    """Validate ``table`` in layout ``fmt`` and encode it; see the module docstring.

    :param tie_value: binary only: the label value of a tie, ``"auto"`` or None.
    :param duplicates: ``"error"`` or ``"first"`` (keep the first label).
    """
    if duplicates not in ("error", "first"):
        raise ValueError(f"duplicates must be 'error' or 'first', got {duplicates!r}")
    _check_columns(table, fmt)
    table = table.reset_index(drop=True)
    rows = np.arange(table.shape[0])
    dropped: dict[str, int] = {}

    if fmt == "binary":
        code, raw_values = _id_codes(table, "label")  # code into the distinct values
        if tie_value == "auto":
            tie_value = _auto_tie_value(raw_values)
        if tie_value is not None and str(tie_value) in raw_values:
            keep = code != raw_values.index(str(tie_value))
            dropped["tie"] = int((~keep).sum())
            table, rows, code = table[keep].reset_index(drop=True), rows[keep], code[keep]
            if not code.shape[0]:
                raise DataError("every label is a tie", field="label", reason="empty")
        counts = np.bincount(code, minlength=len(raw_values))
        present = [i for i in range(len(raw_values)) if counts[i]]
        values = sorted((raw_values[i] for i in present), key=_value_order)
        if len(values) < 2:
            raise DataError(
                f"fewer than two label values (only {values!r}): nothing to tell apart",
                field="label",
                reason="values",
            )
        if len(values) > 2:
            # The format's set: the two most frequent values (first seen wins ties).
            first_seen = sorted(present, key=lambda i: int(np.argmax(code == i)))
            kept = sorted(first_seen, key=lambda i: -counts[i])[:2]
            third = int(np.argmax(~np.isin(code, kept)))
            raise DataError(
                f"label value {raw_values[code[third]]!r} outside the format's set: the binary "
                f"format takes two values and this table has {values!r} (a tie? name it with "
                "tie_value)",
                row=int(rows[third]),
                field="label",
                reason="values",
            )
        a_value, b_value = values[1], values[0]
        label = (code == raw_values.index(a_value)).astype(np.int64)
        annotator, annotator_ids = _remap_rows(_id_codes, table, "annotator", rows)
        item, item_ids = _remap_rows(_id_codes, table, "item", rows)
        keep = _check_duplicates(annotator, item, rows, duplicates)
        dropped["duplicate"] = int(annotator.shape[0] - keep.shape[0])
        return EncodedLabels(
            format=fmt,
            annotator=annotator[keep],
            annotator_ids=annotator_ids,
            label=label[keep],
            row=rows[keep],
            item=item[keep],
            item_ids=item_ids,
            label_values=(a_value, b_value),
            dropped={k: v for k, v in dropped.items() if v},
        )

    if fmt == "pairwise":
        annotator, annotator_ids = _id_codes(table, "annotator")
        winner, loser = _ids(table, "winner"), _ids(table, "loser")
        for row, (w, l) in enumerate(zip(winner, loser, strict=True)):
            if w == l:
                raise DataError(
                    f"winner equals loser ({w!r})", row=row, field="loser", reason="same"
                )
        objects, codes = np.unique(
            np.asarray(winner + loser, dtype=object).astype(str), return_inverse=True
        )
        n = len(winner)
        w_code, l_code = codes[:n].astype(np.int64), codes[n:].astype(np.int64)
        keys = np.array([_order_key(o) for o in objects.tolist()])
        winner_is_a = keys[w_code] < keys[l_code]
        object_a = np.where(winner_is_a, w_code, l_code)
        object_b = np.where(winner_is_a, l_code, w_code)
        return EncodedLabels(
            format=fmt,
            annotator=annotator,
            annotator_ids=annotator_ids,
            label=winner_is_a.astype(np.int64),
            row=rows,
            object_a=object_a,
            object_b=object_b,
            object_ids=[str(o) for o in objects.tolist()],
        )

    # scored
    score = _floats(table, "score")
    label = _floats(table, "label")
    bad = np.nonzero((label != 0) & (label != 1))[0]
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"label value {table['label'].iloc[row]!r} outside the format's set {{0, 1}} "
            "(1: response A preferred)",
            row=row,
            field="label",
            reason="values",
        )
    has_annotators = "annotator" in table.columns
    if has_annotators:
        annotator, annotator_ids = _id_codes(table, "annotator")
    else:
        annotator, annotator_ids = np.zeros(len(score), dtype=np.int64), [GLOBAL_ANNOTATOR]
    item = item_ids = None
    keep = np.arange(len(score))
    if "item" in table.columns:
        item, item_ids = _id_codes(table, "item")
        first = np.zeros(len(item_ids), dtype=np.int64)
        first[item[::-1]] = np.arange(len(item))[::-1]  # each item's first row
        differs = score != score[first[item]]
        if differs.any():
            row = int(np.argmax(differs))
            at = int(first[item[row]])
            raise DataError(
                f"score {score[row]!r} differs from {score[at]!r} at row {at} for the same "
                "item: an item has one score",
                row=row,
                field="score",
                reason="inconsistent",
            )
        if has_annotators:
            keep = _check_duplicates(annotator, item, rows, duplicates)
            dropped["duplicate"] = int(len(score) - keep.shape[0])
    return EncodedLabels(
        format=fmt,
        annotator=annotator[keep],
        annotator_ids=annotator_ids,
        label=label.astype(np.int64)[keep],
        row=rows[keep],
        item=None if item is None else item[keep],
        item_ids=item_ids,
        score=score[keep],
        has_annotators=has_annotators,
        dropped={k: v for k, v in dropped.items() if v},
    )


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


def _remap_rows(reader, table: pd.DataFrame, column: str, rows: np.ndarray):
    """Read ids from a filtered table, reporting errors at the original row."""
    try:
        return reader(table, column)
    except DataError as error:
        if error.row is None:
            raise
        raise DataError(
            error.problem, row=int(rows[error.row]), field=error.field, reason=error.reason
        ) from None
