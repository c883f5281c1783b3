"""The one file reader for training data and label tables.

:func:`read_table` reads a local file into a :class:`pyarrow.Table`; training data
(:func:`repo.data.loaders.read_dataset`, a ``datasets.Dataset`` over that table)
and label tables (:func:`repo.data.labels.read_label_table`, a DataFrame of it)
both come through it, so one file is typed the same way for ``re-po train`` and
``re-po fit-noise``; :mod:`repo.data.ids` then writes the ids the same way.

=======================  ==================================================
file                     how it is read
=======================  ==================================================
``.csv``, ``.tsv``       every cell as text, as written (nothing guessed, a
(``.tab``; ``.gz``)      blank cell is the empty text)
``.jsonl``, ``.ndjson``  JSON lines, a column typed by its values (a column
``.json`` (``.gz``)      holding numbers and text is an error naming it);
                         a ``.json`` file may instead hold one JSON array of
                         records
``.parquet``, ``.pq``    as stored
=======================  ==================================================

Nothing is fetched: paths are local files.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pyarrow as pa

from repo.data.errors import DataError

__all__ = ["TABLE_SUFFIXES", "read_table", "table_kind"]

TABLE_SUFFIXES = {
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tab", ".tsv.gz", ".tab.gz"),
    "json": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
    "parquet": (".parquet", ".pq"),
}
"""File kinds by name ending (lower case)."""


def table_kind(path: str | os.PathLike) -> str:
    """``"csv"``, ``"tsv"``, ``"json"`` or ``"parquet"`` from the file's name."""
    name = Path(path).name.lower()
    for kind, suffixes in TABLE_SUFFIXES.items():
        if name.endswith(suffixes):
            return kind
    known = ", ".join(s for suffixes in TABLE_SUFFIXES.values() for s in suffixes)
    raise DataError(f"unsupported file {Path(path).name!r}: expected one of {known}", reason="type")


def read_table(path: str | os.PathLike, *, kinds: tuple[str, ...] | None = None) -> pa.Table:
    """Read a local file (module docstring) into an Arrow table.

    :param kinds: the file kinds accepted (default: all).
    :raises DataError: a missing, empty or unreadable file; a JSON column of
        mixed types (named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}", reason="missing")
    kind = table_kind(path)
    if kinds is not None and kind not in kinds:
        raise DataError(
            f"unsupported file {path.name!r} here: expected a {' or '.join(kinds)} file",
            reason="type",
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty", reason="empty")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "json":
            return _read_json(path)
        return _read_delimited(path, "\t" if kind == "tsv" else ",")
    except pa.ArrowInvalid as error:
        raise DataError(
            f"cannot read {path}: {_arrow_message(error)}", reason="unreadable"
        ) from None


def _read_delimited(path: Path, delimiter: str) -> pa.Table:
    import pyarrow.csv as csv

    parse = csv.ParseOptions(delimiter=delimiter)
    names = _header(path, delimiter)
    convert = csv.ConvertOptions(
        column_types={name: pa.string() for name in names},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    return csv.read_csv(path, parse_options=parse, convert_options=convert)


def _header(path: Path, delimiter: str) -> list[str]:
    import csv as text_csv

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        return next(text_csv.reader(handle, delimiter=delimiter), [])


def _read_json(path: Path) -> pa.Table:
    import pyarrow.json as pj

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("["):  # one JSON array of records
        with opener(path, "rt", encoding="utf-8") as handle:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise DataError(f"cannot read {path}: {error}", reason="unreadable") from None
        if not all(isinstance(r, dict) for r in records):
            raise DataError(f"{path}: a JSON array must hold records (objects)", reason="type")
        return pa.Table.from_pylist(records)
    return pj.read_json(path)


def _arrow_message(error: Exception) -> str:
    """Arrow's message, its column named the way the rest of re-po names fields."""
    text = str(error).splitlines()[0]
    found = re.search(r"Column\(/([^)]*)\) changed from (\w+) to (\w+) in row (\d+)", text)
    if found:
        column, old, new, row = found.groups()
        return (
            f"field {column!r} holds {old}s and then a {new} (block row {row}): a JSON column "
            "must hold one type (write every id as text, or every id as a number)"
        )
    return text
