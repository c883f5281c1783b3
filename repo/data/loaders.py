"""Load preference data in TRL's layout into validated :class:`PreferenceData`.

Sources: a :class:`datasets.Dataset` (or a ``DatasetDict`` plus ``split``), a path to
JSON / JSONL (optionally ``.gz``) / Parquet read by :func:`repo.data.tables.read_table`
(the reader of ``re-po fit-noise``'s label tables too), a data set folder or a
Hugging Face data set name read by ``datasets.load_dataset(name, split=split)``
(:func:`open_dataset`; ``HF_DATASETS_OFFLINE=1`` keeps it to the local cache), or a
list of dicts (read as is, without Arrow's type unification, so a bad value is
reported at its row).

Layouts (TRL's preference formats):

* **standard**: ``prompt``, ``chosen``, ``rejected`` strings;
* **conversational**: ``prompt`` a list of ``{"role", "content"}`` messages,
  ``chosen`` / ``rejected`` lists of (usually one) assistant messages;
* **implicit prompt**: no prompt column; ``chosen`` / ``rejected`` are full texts
  or conversations and the prompt is their shared prefix.  For conversations the
  prefix is the longest run of shared messages that is followed, in both, by an
  assistant message (no such split: ``DataError`` reason ``"no_shared_prompt"``);
  for strings it is the longest common character prefix, less one trailing space
  (as ``trl.extract_prompt`` does).  Used when ``prompt_column=None``, or when the
  default ``"prompt"`` column is absent.

Optional columns: annotator id, item id, and a position column saying whether
chosen was shown first (bool, or int 0/1); with it, A is the response shown first
and ``shown_order=True``, otherwise A/B is the label-independent hash order.
Validation and the skip/error policy: see :mod:`repo.data.records`.
Rows are numbered from 0 in source order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.table import InMemoryTable

from repo.data.errors import DataError
from repo.data.records import (
    Duplicates,
    OnEmpty,
    OnIdentical,
    OnInvalid,
    PreferenceData,
    RecordCollector,
    Text,
    check_id,
    check_text,
)
from repo.data.tables import read_table

__all__ = [
    "check_row",
    "is_dataset_name",
    "iter_rows",
    "load_preferences",
    "open_dataset",
    "read_dataset",
    "split_shared_prompt",
]

_BATCH = 1024

Source = datasets.Dataset | datasets.DatasetDict | str | os.PathLike | Sequence[Mapping[str, Any]]


def read_dataset(path: str | os.PathLike) -> datasets.Dataset:
    """Read a local JSON / JSONL(.gz) / Parquet file (no hub access) through the
    reader label tables use too (:func:`repo.data.tables.read_table`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    table = read_table(path, kinds=("json", "parquet"))
    return datasets.Dataset(InMemoryTable(table))


_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv", ".tsv")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_dataset_name(value: str) -> bool:
    """Whether ``value`` reads as a Hugging Face data set name (``"Anthropic/hh-rlhf"``,
    ``"imdb"``) rather than a file path: at most one ``/``, no data-file suffix."""
    return bool(_NAME.match(value)) and not value.lower().endswith(_FILE_SUFFIXES)


def open_dataset(source: str | os.PathLike, *, split: str = "train") -> datasets.Dataset:
    """The rows of ``source``: a local JSON / JSONL(.gz) / Parquet file
    (:func:`read_dataset`; ``split`` does not apply), or a data set folder or Hugging
    Face data set name through ``datasets.load_dataset(source, split=split)``.

    :raises FileNotFoundError: no such file, folder or data set (or no such split); the
        message names ``source`` and ``datasets``' reason.
    """
    path = Path(source)
    if path.is_file():
        return read_dataset(path)
    if not path.is_dir() and not is_dataset_name(str(source)):
        raise FileNotFoundError(f"no such data file: {path}")
    try:
        data = datasets.load_dataset(str(source), split=split)
    except Exception as error:  # datasets raises many types (hub, builder, split errors)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileNotFoundError(
            f"cannot read data set {str(source)!r} (split {split!r}) with "
            f"datasets.load_dataset: {reason}"
        ) from error
    if not isinstance(data, datasets.Dataset):  # an IterableDataset or a DatasetDict
        raise ValueError(f"data set {str(source)!r}: expected one split, got {type(data).__name__}")
    return data


def _pick_split(data: datasets.DatasetDict, split: str | None) -> datasets.Dataset:
    if split is None:
        if len(data) != 1:
            raise ValueError(f"the DatasetDict has splits {list(data)}; pass split=")
        return next(iter(data.values()))
    if split not in data:
        raise ValueError(f"no split {split!r}; available: {list(data)}")
    return data[split]


def iter_rows(
    source: Source, *, split: str | None = None
) -> tuple[list[str], Iterator[tuple[int, Mapping[str, Any]]]]:
    """``(columns, iterator of (row, mapping))`` for any supported source.

    For a list of dicts the columns are the union of the keys (a key absent from
    a row reads as null there); its rows are yielded as given, so check that each
    is a mapping (:func:`check_row`).
    """
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, split)
    elif isinstance(source, (str, os.PathLike)):
        source = open_dataset(source, split=split or "train")
    elif split is not None:
        raise ValueError("split= applies to a DatasetDict, a data set folder or a name only")
    if isinstance(source, datasets.Dataset):
        ds = source

        def dataset_rows() -> Iterator[tuple[int, Mapping[str, Any]]]:
            i = 0
            for batch in ds.iter(batch_size=_BATCH):
                cols = list(batch)
                for values in zip(*(batch[c] for c in cols), strict=True):
                    yield i, dict(zip(cols, values, strict=True))
                    i += 1

        return list(ds.column_names), dataset_rows()
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rows = list(source)
        columns: dict[str, None] = {}
        for row in rows:
            if isinstance(row, Mapping):
                columns.update(dict.fromkeys(row))

        return list(columns), enumerate(rows)
    raise TypeError(
        "source must be a datasets.Dataset / DatasetDict, a path to a JSON, JSONL or "
        f"Parquet file, or a list of dicts; got {type(source).__name__}"
    )


def check_row(row: Any, *, row_index: int) -> Mapping[str, Any]:
    """A row must be a mapping (column -> value)."""
    if not isinstance(row, Mapping):
        raise DataError(
            f"row must be a mapping, got {type(row).__name__}",
            row=row_index,
            field=None,
            reason="type",
        )
    return row


def _position(value: Any, *, row: int, field: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(int(value))
    raise DataError(
        f"position must be a bool or 0/1 (chosen shown first), got {value!r}",
        row=row,
        field=field,
        reason="missing" if value is None else "bad_position",
    )


def split_shared_prompt(chosen: Text, rejected: Text, *, row: int = 0) -> tuple[Text, Text, Text]:
    """Implicit-prompt layout: ``(prompt, chosen_response, rejected_response)``.

    Strings: longest common prefix, less one trailing space (TRL's rule).
    Conversations: the longest shared message prefix followed by an assistant
    message in both; ``DataError`` (reason ``"no_shared_prompt"``) if there is none.
    """
    if isinstance(chosen, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        if n > 0 and chosen[n - 1] == " ":
            n -= 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n >= 0:
        if (
            n < len(chosen)
            and n < len(rejected)
            and chosen[n]["role"] == "assistant"
            and rejected[n]["role"] == "assistant"
        ):
            return chosen[:n], chosen[n:], rejected[n:]
        n -= 1
    raise DataError(
        "chosen and rejected share no prompt followed by an assistant message in both",
        row=row,
        field="chosen/rejected",
        reason="no_shared_prompt",
    )


def _require(columns: Sequence[str], needed: Sequence[str]) -> None:
    for column in needed:
        if column not in columns:
            raise DataError(
                f"missing column (columns: {', '.join(columns) or 'none'})",
                row=None,
                field=column,
                reason="missing_column",
            )


def load_preferences(
    source: Source,
    *,
    split: str | None = None,
    prompt_column: str | None = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    annotator_column: str | None = None,
    item_column: str | None = None,
    position_column: str | None = None,
    on_invalid: OnInvalid = "error",
    on_empty: OnEmpty = "skip",
    on_identical: OnIdentical = "skip",
    duplicates: Duplicates = "error",
) -> PreferenceData:
    """Load and validate preference pairs in TRL's layout (see the module docstring).

    ``prompt_column=None`` (or the default ``"prompt"`` being absent) selects the
    implicit-prompt layout.  ``position_column`` holds whether chosen was shown
    first.  Policies: ``on_invalid`` for malformed rows, ``on_empty``,
    ``on_identical`` and ``duplicates`` as in :mod:`repo.data.records`.
    """
    collector = RecordCollector(
        on_invalid=on_invalid,
        on_empty=on_empty,
        on_identical=on_identical,
        duplicates=duplicates,
    )
    columns, rows = iter_rows(source, split=split)
    implicit = prompt_column is None or (prompt_column == "prompt" and "prompt" not in columns)
    needed = [chosen_column, rejected_column]
    needed += [] if implicit else [prompt_column]
    needed += [c for c in (annotator_column, item_column, position_column) if c is not None]
    _require(columns, needed)

    for i, row in rows:
        try:
            row = check_row(row, row_index=i)
            annotator = item = chosen_first = None
            if annotator_column is not None:
                annotator = check_id(
                    row.get(annotator_column), row=i, field=annotator_column, what="annotator id"
                )
            if item_column is not None:
                item = check_id(row.get(item_column), row=i, field=item_column, what="item id")
            if position_column is not None:
                chosen_first = _position(row.get(position_column), row=i, field=position_column)
            if implicit:
                chosen = check_text(
                    row.get(chosen_column), row=i, field=chosen_column, what="chosen"
                )
                kind = str if isinstance(chosen, str) else list
                rejected = check_text(
                    row.get(rejected_column),
                    row=i,
                    field=rejected_column,
                    kind=kind,
                    what="rejected",
                )
                prompt: Text = "" if kind is str else []
                if chosen != rejected:
                    prompt, chosen, rejected = split_shared_prompt(chosen, rejected, row=i)
            else:
                prompt = check_text(
                    row.get(prompt_column), row=i, field=prompt_column, what="prompt"
                )
                kind = str if isinstance(prompt, str) else list
                chosen = check_text(
                    row.get(chosen_column), row=i, field=chosen_column, kind=kind, what="chosen"
                )
                rejected = check_text(
                    row.get(rejected_column),
                    row=i,
                    field=rejected_column,
                    kind=kind,
                    what="rejected",
                )
        except DataError as error:
            collector.invalid(error)
            continue
        collector.add_pair(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            row=i,
            annotator=annotator,
            item=item,
            chosen_first=chosen_first,
            chosen_field=chosen_column,
            rejected_field=rejected_column,
            item_field=item_column or "item",
            annotator_field=annotator_column or "annotator",
        )
    return collector.result()
