"""Preference records: the canonical schema, the A/B rule and the validation policy.

A *record* is one label: annotator ``k`` compared responses A and B of comparison
(item) ``i`` to a prompt and preferred A (``label = 1``) or B (``label = 0``).
Several annotators labelling the same pair give several records of one item.

Which response is A (DESIGN.md, "The probabilistic core")
----------------------------------------------------------
* When the data record the order the annotator saw (PandaLM's response1/response2,
  or a position column), A is the response shown first and ``shown_order=True``.
* Otherwise the order is **label independent**: A is the response whose
  :func:`response_key` (sha256 of its text; for a message list, of its canonical
  JSON) is smaller, and ``shown_order=False``.  The same pair therefore gets the
  same A whichever response was chosen, and A is the chosen one about half the
  time.  Never "A = chosen": then every label is 1 and any model with a
  per-annotator bias learns "always A".

Item ids: the item column's value when the loader is given one, else
:func:`comparison_id` -- a hash of (prompt, A, B) -- so rows repeating the same
comparison (several annotators, no item column) share an item.

Validation policy (one per loader call; nothing is half-written: a raised error
leaves no partial result, a skipped row leaves no record)
--------------------------------------------------------------------------------
* **Required column absent** from the source: always a ``DataError`` (row None).
* **Malformed row** -- null or non-string prompt / response, malformed chat
  messages, a response form unlike the prompt's (text vs messages), null
  annotator id when the annotator column exists, null item id, an item id reused
  for a different comparison, a bad position value, no shared prompt (implicit
  layout): ``on_invalid="error"`` (default) raises; ``"skip"`` drops the row and
  counts it in ``skipped`` under the error's ``reason`` (``"missing"``, ``"type"``,
  ``"missing_id"``, ``"bad_id"``, ``"item_conflict"``, ``"bad_position"``,
  ``"no_shared_prompt"``).
* **Ids** (annotator, item) follow the one rule of :mod:`repo.data.ids`, shared
  with the label tables of ``re-po fit-noise``: NFC text, stripped; integers and
  integral floats (``3``, ``3.0``) in decimal; ``2.5`` or a boolean is a bad id.
* **Duplicate (annotator, item) labels**: ``duplicates="error"`` (default) raises,
  naming both rows; ``"first"`` keeps the first and counts the rest as
  ``"duplicate"``. Records without an annotator id are not checked.
* **chosen == rejected**: ``on_identical="skip"`` (default; counted as
  ``"identical"``) or ``"error"``.  Checked first.
* **Empty response** (blank after strip; a message list whose contents are all
  blank): ``on_empty="skip"`` (default; counted as ``"empty"``), ``"error"``, or
  ``"keep"`` (kept and counted in ``notes["empty"]``).
* An empty prompt (``""`` or ``[]``) is valid.

Every error is a :class:`~repo.data.errors.DataError` naming the 0-based source row
and the field.  Skips are counted in :attr:`PreferenceData.skipped` (by reason);
records kept under a special rule are counted in :attr:`PreferenceData.notes`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, overload

import pandas as pd

from repo.data.errors import DataError
from repo.data.ids import canonical_id

__all__ = [
    "Text",
    "OnInvalid",
    "OnEmpty",
    "OnIdentical",
    "Duplicates",
    "PreferenceRecord",
    "PreferenceData",
    "RecordCollector",
    "response_key",
    "comparison_id",
    "is_blank",
    "check_text",
    "check_messages",
    "check_id",
]

Text = str | list[dict[str, Any]]
"""A prompt or response: plain text, or chat messages ``[{"role", "content"}, ...]``."""

OnInvalid = Literal["error", "skip"]
OnEmpty = Literal["skip", "error", "keep"]
OnIdentical = Literal["skip", "error"]
Duplicates = Literal["error", "first"]


# ----------------------------------------------------------------------------- keys


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def response_key(response: Text) -> str:
    """sha256 (hex) of a response's text; of its canonical JSON for a message list."""
    text = response if isinstance(response, str) else _canonical(response)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def comparison_id(prompt: Text, response_a: Text, response_b: Text) -> str:
    """Content id of a comparison: first 16 hex digits of sha256 over (prompt, A, B)."""
    payload = _canonical([prompt, response_a, response_b])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- record


@dataclass(frozen=True)
class PreferenceRecord:
    """One label of one comparison.

    ``label`` is 1 when the annotator preferred ``response_a``, 0 for ``response_b``.
    ``shown_order`` is True when A/B is the order the annotator saw; False when A/B
    is the label-independent hash order.  ``row`` is the 0-based source row.
    """

    item: str
    prompt: Text
    response_a: Text
    response_b: Text
    label: int
    annotator: str | None
    shown_order: bool
    row: int

    @classmethod
    def from_pair(
        cls,
        *,
        prompt: Text,
        chosen: Text,
        rejected: Text,
        row: int,
        annotator: str | None = None,
        item: str | None = None,
        chosen_first: bool | None = None,
    ) -> PreferenceRecord:
        """Build a record from a chosen/rejected pair by the A/B rule (module docstring).

        ``chosen_first`` is the recorded display order (True: chosen was shown first);
        ``None`` when the data do not record it -- then A is the response with the
        smaller :func:`response_key`.
        """
        if chosen_first is None:
            kc, kr = response_key(chosen), response_key(rejected)
            if kc == kr:
                raise ValueError("chosen and rejected are identical; no A/B order exists")
            chosen_is_a, shown = kc < kr, False
        else:
            chosen_is_a, shown = bool(chosen_first), True
        a, b = (chosen, rejected) if chosen_is_a else (rejected, chosen)
        return cls(
            item=comparison_id(prompt, a, b) if item is None else item,
            prompt=prompt,
            response_a=a,
            response_b=b,
            label=int(chosen_is_a),
            annotator=annotator,
            shown_order=shown,
            row=row,
        )

    @property
    def chosen(self) -> Text:
        return self.response_a if self.label == 1 else self.response_b

    @property
    def rejected(self) -> Text:
        return self.response_b if self.label == 1 else self.response_a


# ----------------------------------------------------------------------------- data


class PreferenceData(Sequence[PreferenceRecord]):
    """Validated records plus what was skipped (``skipped``) or specially kept (``notes``).

    ``skipped`` and ``notes`` count records/rows by reason (see the module docstring).
    """

    def __init__(
        self,
        records: Iterable[PreferenceRecord],
        *,
        skipped: Mapping[str, int] | None = None,
        notes: Mapping[str, int] | None = None,
    ) -> None:
        self.records: list[PreferenceRecord] = list(records)
        self.skipped: dict[str, int] = dict(skipped or {})
        self.notes: dict[str, int] = dict(notes or {})

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> PreferenceRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[PreferenceRecord]: ...
    def __getitem__(self, index):
        return self.records[index]

    def __iter__(self) -> Iterator[PreferenceRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return (
            f"PreferenceData({len(self)} records, {len(self.items)} items, "
            f"{len(self.annotators)} annotators, skipped={self.skipped}, notes={self.notes})"
        )

    @property
    def annotators(self) -> list[str]:
        """Sorted unique annotator ids (records without an id are not listed)."""
        return sorted({r.annotator for r in self.records if r.annotator is not None})

    @property
    def items(self) -> list[str]:
        """Unique item ids in order of first appearance."""
        return list(dict.fromkeys(r.item for r in self.records))

    @property
    def shown_order(self) -> bool:
        """True when every record's A/B is the displayed order (position data exist)."""
        return bool(self.records) and all(r.shown_order for r in self.records)

    def to_pandas(self) -> pd.DataFrame:
        """One row per record; columns are the :class:`PreferenceRecord` fields."""
        columns = list(PreferenceRecord.__dataclass_fields__)
        return pd.DataFrame([asdict(r) for r in self.records], columns=columns)

    def labels_frame(self, unknown_annotator: str = "unknown") -> pd.DataFrame:
        """``DataFrame(annotator, item, label)`` for the noise-fitting code.

        ``label`` is 1 when A was preferred.  Records without an annotator id (data
        sets with no annotator column) get ``unknown_annotator``: one shared pool.
        """
        return pd.DataFrame(
            {
                "annotator": [
                    unknown_annotator if r.annotator is None else r.annotator for r in self.records
                ],
                "item": [r.item for r in self.records],
                "label": pd.Series([r.label for r in self.records], dtype="int64"),
            }
        )


# ----------------------------------------------------------------------------- checks


def is_blank(response: Text) -> bool:
    """True for blank text, an empty message list, or messages with only blank contents."""
    if isinstance(response, str):
        return not response.strip()
    return all(not m["content"].strip() for m in response)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_messages(value: Any, *, row: int, field: str) -> list[dict[str, Any]]:
    """Validate chat messages; return copies with null-valued keys dropped.

    Each message must be a mapping with a string ``role`` and a string ``content``
    (Arrow-backed data pad missing optional keys with None; those are removed).
    """
    out = []
    for j, message in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(message, Mapping):
            raise DataError(
                f"message must be a mapping, got {_type_name(message)}",
                row=row,
                field=where,
                reason="type",
            )
        for key in ("role", "content"):
            v = message.get(key)
            if not isinstance(v, str):
                raise DataError(
                    f"message {key!r} must be a string, got {_type_name(v)}",
                    row=row,
                    field=f"{where}.{key}",
                    reason="missing" if v is None else "type",
                )
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def check_text(
    value: Any, *, row: int, field: str, kind: type | None = None, what: str = "text"
) -> Text:
    """Validate a prompt/response: a string or a list of chat messages.

    ``kind`` (``str`` or ``list``) forces one of the two forms, e.g. responses must
    have the prompt's form.
    """
    if value is None:
        raise DataError(f"{what} is null", row=row, field=field, reason="missing")
    if isinstance(value, str) and kind in (None, str):
        return value
    if isinstance(value, (list, tuple)) and kind in (None, list):
        return check_messages(value, row=row, field=field)
    expected = {None: "a string or a list of messages", str: "a string", list: "a list of messages"}
    raise DataError(
        f"{what} must be {expected[kind]}, got {_type_name(value)}",
        row=row,
        field=field,
        reason="type",
    )


def check_id(value: Any, *, row: int, field: str, what: str) -> str:
    """Validate an id (annotator, item) and return its canonical text: the one rule
    of :mod:`repo.data.ids` (NFC text with surrounding whitespace removed, integers
    and integral floats in decimal), shared with the label tables of
    ``re-po fit-noise``. A missing id is a :class:`DataError` with reason
    ``"missing_id"``, a value that is no id (``2.5``, ``true``) ``"bad_id"``."""
    return canonical_id(value, row=row, field=field, what=what)


# ----------------------------------------------------------------------------- collector


_POLICIES = {
    "on_invalid": ("error", "skip"),
    "on_empty": ("skip", "error", "keep"),
    "on_identical": ("skip", "error"),
    "duplicates": ("error", "first"),
}


def _check_policy(name: str, value: str) -> None:
    if value not in _POLICIES[name]:
        raise ValueError(f"{name} must be one of {_POLICIES[name]}, got {value!r}")


class RecordCollector:
    """Applies the validation policy while a loader builds records.

    Loaders raise :class:`DataError` for malformed rows and pass it to
    :meth:`invalid`; :meth:`add_pair` applies the identical/empty policies and the
    A/B rule.  :meth:`result` returns the :class:`PreferenceData`.
    """

    def __init__(
        self,
        *,
        on_invalid: OnInvalid = "error",
        on_empty: OnEmpty = "skip",
        on_identical: OnIdentical = "skip",
        duplicates: Duplicates = "error",
    ) -> None:
        _check_policy("on_invalid", on_invalid)
        _check_policy("on_empty", on_empty)
        _check_policy("on_identical", on_identical)
        _check_policy("duplicates", duplicates)
        self.on_invalid = on_invalid
        self.on_empty = on_empty
        self.on_identical = on_identical
        self.duplicates = duplicates
        self._labelled: dict[tuple[str, str], int] = {}
        self.records: list[PreferenceRecord] = []
        self.skipped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self._item_rows: dict[str, tuple[int, tuple[str, ...]]] = {}

    def invalid(self, error: DataError) -> None:
        """A malformed row: raise (``on_invalid="error"``) or count under ``error.reason``."""
        if self.on_invalid == "error":
            raise error
        self.skipped[error.reason] += 1

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def note(self, reason: str, n: int = 1) -> None:
        self.notes[reason] += n

    def add_pair(
        self,
        *,
        prompt: Text,
        chosen: Text,
        rejected: Text,
        row: int,
        annotator: str | None = None,
        item: str | None = None,
        chosen_first: bool | None = None,
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        item_field: str = "item",
        annotator_field: str = "annotator",
    ) -> PreferenceRecord | None:
        """Apply the identical / empty policies, then add the record (None if skipped).

        An explicit ``item`` already used for a different comparison (another prompt or
        another pair of responses) is a malformed row (reason ``"item_conflict"``,
        handled by ``on_invalid``). A second label of one annotator on one item is
        an error naming both rows (``duplicates="error"``) or skipped, counted as
        ``"duplicate"`` (``"first"``); labels without an annotator id are not checked.
        """
        if chosen == rejected:
            if self.on_identical == "error":
                raise DataError(
                    "chosen is identical to rejected",
                    row=row,
                    field=f"{chosen_field}/{rejected_field}",
                    reason="identical",
                )
            self.skipped["identical"] += 1
            return None
        for field, response in ((chosen_field, chosen), (rejected_field, rejected)):
            if is_blank(response):
                if self.on_empty == "error":
                    raise DataError("empty response", row=row, field=field, reason="empty")
                if self.on_empty == "skip":
                    self.skipped["empty"] += 1
                    return None
                self.notes["empty"] += 1
                break
        if item is not None:
            signature = (
                response_key(prompt),
                *sorted((response_key(chosen), response_key(rejected))),
            )
            first = self._item_rows.setdefault(item, (row, signature))
            if first[1] != signature:
                self.invalid(
                    DataError(
                        f"item {item!r} is a different comparison (prompt or responses) "
                        f"than at row {first[0]}",
                        row=row,
                        field=item_field,
                        reason="item_conflict",
                    )
                )
                return None
        record = PreferenceRecord.from_pair(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            row=row,
            annotator=annotator,
            item=item,
            chosen_first=chosen_first,
        )
        if annotator is not None:
            first_row = self._labelled.setdefault((annotator, record.item), row)
            if first_row != row:
                if self.duplicates == "error":
                    raise DataError(
                        f"duplicate label: annotator {annotator!r} labelled this item at row "
                        f"{first_row} (policy: duplicates='error'; 'first' keeps the first)",
                        row=row,
                        field=annotator_field,
                        reason="duplicate",
                    )
                self.skipped["duplicate"] += 1
                return None
        self.records.append(record)
        return record

    def result(self) -> PreferenceData:
        return PreferenceData(self.records, skipped=self.skipped, notes=self.notes)
