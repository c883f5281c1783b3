"""The one id encoder: annotator, item and object ids as canonical text.

Training data (:mod:`repo.data.loaders`, :mod:`repo.data.records`) and label tables
(:mod:`repo.data.labels`) write every id through the rule below, so one file gives
the same annotator and item ids under ``re-po train`` and ``re-po fit-noise``.

The rule
--------
* **Text** is an id as written, Unicode-normalised to NFC, with surrounding
  whitespace removed: ``" ann 1 "`` is ``"ann 1"``; ``"3.0"``, ``"03"`` and ``"3"``
  are three ids. (CSV and TSV cells are always text.)
* **Integers** (a typed column: JSON numbers, Parquet integers) are their decimal
  form: ``3`` is ``"3"``.
* **Integral floats** are the integer they equal: ``3.0`` is ``"3"``. A JSON or
  Parquet column of integers with a gap is read as floats, so this keeps such ids
  equal to the integers they were written as. A float with a fraction (``2.5``) is
  no id: an error (reason ``"bad_id"``), as are booleans and nested values.
* **Missing**: null, NaN, or text that is blank after stripping (reason
  ``"missing_id"``).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from repo.data.errors import DataError

__all__ = ["IdColumn", "canonical_id", "encode_id_column", "id_or_none"]

MISSING_ID = "missing_id"
BAD_ID = "bad_id"


class _BadId(Exception):
    """A value that is no id (see the module docstring)."""


def id_or_none(value: Any) -> str | None:
    """The canonical text of ``value``; None when it is missing.

    :raises _BadId: for a fractional float, a boolean or a nested value.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        return text if text.isascii() else unicodedata.normalize("NFC", text)
    if isinstance(value, (bool, np.bool_)):
        raise _BadId(f"a boolean ({value!r})")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        raise _BadId(f"a number with a fraction ({value!r})")
    if value is pd.NA or value is pd.NaT:
        return None
    raise _BadId(f"a {type(value).__name__}")


def canonical_id(value: Any, *, row: int, field: str, what: str = "id") -> str:
    """``value`` as a canonical id; a missing or bad one is a :class:`DataError`
    naming ``row`` and ``field`` (reasons ``"missing_id"``, ``"bad_id"``)."""
    try:
        text = id_or_none(value)
    except _BadId as problem:
        raise DataError(
            f"{what} must be text or an integer, got {problem}", row=row, field=field, reason=BAD_ID
        ) from None
    if text is None:
        raise DataError(f"missing {what}", row=row, field=field, reason=MISSING_ID)
    return text


@dataclass
class IdColumn:
    """A column of ids as integer codes.

    :param codes: ``(N,)`` index into :attr:`ids`; -1 where the id is missing or bad.
    :param ids: the distinct canonical ids, sorted as text.
    :param missing: ``(N,)`` the id is missing.
    :param bad: ``(N,)`` the value is no id (:attr:`problems` says why, by row).
    """

    codes: np.ndarray
    ids: list[str]
    missing: np.ndarray
    bad: np.ndarray
    problems: dict[int, str]


def encode_id_column(values: pd.Series) -> IdColumn:
    """Canonical ids of a column (the module's rule) as sorted codes.

    Integer columns are coded without writing every cell as text: only the
    distinct values are, then put in text order, so every file type gives the
    same codes.
    """
    n = len(values)
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        bad = ~values.isna().to_numpy(dtype=bool)
        missing = ~bad
        problems = {int(i): f"a boolean ({values.iloc[i]!r})" for i in np.flatnonzero(bad)[:1]}
        return IdColumn(np.full(n, -1, dtype=np.int64), [], missing, bad, problems)
    if pd.api.types.is_float_dtype(dtype):
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(numbers)
        with np.errstate(invalid="ignore"):
            integral = np.isfinite(numbers) & (numbers == np.round(numbers))
        bad = ~missing & ~integral
        small = integral & (np.abs(np.where(integral, numbers, 0)) < 2**63)
        if (small | missing | bad).all():
            return _integer_codes(
                np.where(small, numbers, 0).astype(np.int64), missing, bad, values
            )
    elif pd.api.types.is_integer_dtype(dtype):
        missing = values.isna().to_numpy(dtype=bool)
        fill = values.to_numpy(dtype=object if missing.any() else None)
        if missing.any():
            fill = np.where(missing, 0, fill)
        if not pd.api.types.is_unsigned_integer_dtype(dtype) or values.max() < 2**63:
            numbers = np.asarray(fill).astype(np.int64)
            return _integer_codes(numbers, missing, np.zeros(n, dtype=bool), values)
    if pd.api.types.is_string_dtype(dtype) and _all_text(values):
        # the distinct cells first, then the rule on those alone (cheap for long columns)
        raw, cells = pd.factorize(values, sort=False)
        cells = pd.Series(cells).str.strip()
        if not cells.str.isascii().all():
            cells = cells.str.normalize("NFC")
        blank = cells.eq("").to_numpy(dtype=bool, na_value=True)
        canonical, ids = pd.factorize(cells[~blank], sort=True)
        to_id = np.full(len(cells) + 1, -1, dtype=np.int64)  # raw code -1 (a null) stays -1
        to_id[np.flatnonzero(~blank)] = canonical
        codes = to_id[raw]
        missing = codes < 0
        return IdColumn(codes, ids.tolist(), missing, np.zeros(n, dtype=bool), {})
    # mixed values (a JSON column of numbers and text, say): one at a time
    texts: list[str | None] = []
    problems: dict[int, str] = {}
    bad = np.zeros(n, dtype=bool)
    for i, value in enumerate(values.tolist()):
        try:
            texts.append(id_or_none(value))
        except _BadId as problem:
            texts.append(None)
            bad[i] = True
            problems[i] = str(problem)
    missing = np.array([t is None for t in texts], dtype=bool) & ~bad
    return _text_codes(pd.Series(texts, dtype=object), missing, bad, problems)


def _all_text(values: pd.Series) -> bool:
    kind = pd.api.types.infer_dtype(values, skipna=True)
    return kind in ("string", "empty")


def _text_codes(
    texts: pd.Series, missing: np.ndarray, bad: np.ndarray, problems: dict[int, str]
) -> IdColumn:
    missing, bad = np.array(missing, dtype=bool), np.array(bad, dtype=bool)
    valid = ~(missing | bad)
    codes = np.full(len(texts), -1, dtype=np.int64)
    if valid.all():
        found, uniques = pd.factorize(texts, sort=True)
    else:
        found, uniques = pd.factorize(texts[valid], sort=True)
    codes[valid] = found
    return IdColumn(codes, [str(u) for u in uniques.tolist()], missing, bad, problems)


def _integer_codes(
    numbers: np.ndarray, missing: np.ndarray, bad: np.ndarray, values: pd.Series
) -> IdColumn:
    missing, bad = np.array(missing, dtype=bool), np.array(bad, dtype=bool)
    valid = ~(missing | bad)
    found, uniques = pd.factorize(numbers[valid], sort=False)
    order = _text_order(np.asarray(uniques, dtype=np.int64))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    codes = np.full(numbers.shape[0], -1, dtype=np.int64)
    codes[valid] = rank[found]
    problems = {
        int(i): f"a number with a fraction ({values.iloc[i]!r})" for i in np.flatnonzero(bad)[:1]
    }
    return IdColumn(
        codes, [str(u) for u in np.asarray(uniques)[order].tolist()], missing, bad, problems
    )


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
