"""Anthropic HH-RLHF: ``{"chosen": dialogue, "rejected": dialogue}`` JSONL(.gz).

Each dialogue is ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.  The rule that turns a
pair into (prompt, chosen response, rejected response):

* **prompt** = the longest common prefix of the two dialogues, cut just after its
  last ``"\\n\\nAssistant:"`` marker; **responses** = the two remainders (so
  ``prompt + response`` is the original dialogue, byte for byte; responses keep
  their leading space).  For ordinary pairs this is "the shared dialogue up to and
  including the last assistant turn marker".
* **diverge early** (the two dialogues already differ before the last assistant
  turn, so a remainder holds further ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``
  turns): the same rule applies -- the prompt ends at the last *shared* assistant
  marker and the responses are the diverging continuations.  Policy
  ``diverge_early="keep"`` (default; counted in ``notes["diverge_early"]``),
  ``"skip"`` (counted in ``skipped["diverge_early"]``) or ``"error"``.
* **identical** chosen and rejected: skipped, ``skipped["identical"]``
  (``on_identical``).
* **empty** response (a remainder that is blank, e.g. ``" "``): skipped,
  ``skipped["empty"]`` (``on_empty``).
* no shared ``"\\n\\nAssistant:"`` at all: a malformed row (``on_invalid``, reason
  ``"no_shared_prompt"``); does not occur in the released test splits.

Counts on the four released test splits (8,552 pairs): 36 identical, 17 diverge
early, 11 with an empty response (a remainder of one space), 0 without a shared
prompt.  HH-RLHF records neither annotator ids nor display order, so A/B is the
label-independent hash order (``shown_order=False``) and ``annotator`` is None.

``as_messages=True`` parses the dialogue into chat messages: ``"\\n\\nHuman:"`` ->
``user``, ``"\\n\\nAssistant:"`` -> ``assistant``, contents stripped; the prompt is
the messages before the final assistant turn and each response a list starting
with that assistant message (several messages for pairs that diverge early).
Markers without the two leading newlines (``"  Human:"`` inside a turn, which the
data contain) are left in the text.

With no path, :func:`load_hh_rlhf` reads the subsample shipped in the package
(``repo/resources/data/hh-rlhf/subsample.jsonl.gz``: 2,000 test pairs from
helpful-base and harmless-base, MIT, Copyright 2022 Anthropic; see SOURCE.txt).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from repo.data.errors import DataError
from repo.data.loaders import check_row, iter_rows, read_dataset
from repo.data.records import (
    OnEmpty,
    OnIdentical,
    OnInvalid,
    PreferenceData,
    RecordCollector,
    check_text,
)

__all__ = [
    "HUMAN",
    "ASSISTANT",
    "HH_SUBSAMPLE",
    "load_hh_rlhf",
    "split_hh_pair",
    "parse_hh_dialogue",
]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
HH_SUBSAMPLE = "data/hh-rlhf/subsample.jsonl.gz"
"""Path of the shipped subsample inside the ``repo.resources`` package."""

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str, bool]:
    """``(prompt, chosen_response, rejected_response, diverged_early)`` by the module rule.

    Raises ``ValueError`` when the dialogues are identical or share no assistant marker.
    """
    if chosen == rejected:
        raise ValueError("chosen and rejected dialogues are identical")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("the dialogues share no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    chosen_rest, rejected_rest = chosen[cut:], rejected[cut:]
    early = ASSISTANT in chosen_rest or ASSISTANT in rejected_rest
    return chosen[:cut], chosen_rest, rejected_rest, early


def parse_hh_dialogue(text: str, *, first_role: str | None = None) -> list[dict[str, str]]:
    """Split HH text into ``[{"role", "content"}]`` at ``"\\n\\nHuman:"``/``"\\n\\nAssistant:"``.

    Text before the first marker becomes a message of role ``first_role`` (used for
    a response, which starts right after an assistant marker) or, if it is not
    blank and ``first_role`` is None, a ``system`` message.  A final marker with
    nothing after it (the prompt's trailing ``"\\n\\nAssistant:"``) is dropped.
    """
    parts = _TURN.split(text)
    messages = []
    head = parts[0]
    if first_role is not None:
        messages.append({"role": first_role, "content": head.strip()})
    elif head.strip():
        messages.append({"role": "system", "content": head.strip()})
    for k in range(1, len(parts), 2):
        role, content = _ROLE[parts[k]], parts[k + 1]
        if k + 2 >= len(parts) and not content.strip() and first_role is None:
            break  # trailing "\n\nAssistant:" of a prompt
        messages.append({"role": role, "content": content.strip()})
    return messages


def _paths(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Any]:
    if isinstance(path, (str, os.PathLike)):
        return [path]
    return list(path)


def load_hh_rlhf(
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    as_messages: bool = False,
    diverge_early: Literal["keep", "skip", "error"] = "keep",
    on_invalid: OnInvalid = "error",
    on_empty: OnEmpty = "skip",
    on_identical: OnIdentical = "skip",
) -> PreferenceData:
    """Load HH-RLHF JSONL(.gz) file(s) by the module's rule; default: the shipped subsample.

    Several paths are read in order; rows are numbered 0.. across them.  Extra
    columns (the subsample's ``split`` and ``index``) are ignored.
    """
    if diverge_early not in ("keep", "skip", "error"):
        raise ValueError(f"diverge_early must be 'keep', 'skip' or 'error', got {diverge_early!r}")
    collector = RecordCollector(on_invalid=on_invalid, on_empty=on_empty, on_identical=on_identical)
    with ExitStack() as stack:
        if path is None:
            shipped = resources.files("repo.resources").joinpath(HH_SUBSAMPLE)
            paths = [stack.enter_context(resources.as_file(shipped))]
        else:
            paths = [Path(p) for p in _paths(path)]
        offset = 0
        for file in paths:
            ds = read_dataset(file)
            columns, rows = iter_rows(ds)
            for column in ("chosen", "rejected"):
                if column not in columns:
                    raise DataError(
                        f"missing column in {Path(file).name} (columns: {', '.join(columns)})",
                        row=None,
                        field=column,
                        reason="missing_column",
                    )
            for i, row in rows:
                _add_row(
                    collector, row, offset + i, as_messages=as_messages, diverge_early=diverge_early
                )
            offset += len(ds)
    return collector.result()


def _add_row(
    collector: RecordCollector,
    row: Any,
    i: int,
    *,
    as_messages: bool,
    diverge_early: str,
) -> None:
    try:
        row = check_row(row, row_index=i)
        chosen = check_text(row.get("chosen"), row=i, field="chosen", kind=str, what="chosen")
        rejected = check_text(
            row.get("rejected"), row=i, field="rejected", kind=str, what="rejected"
        )
        if chosen == rejected:
            collector.add_pair(prompt="", chosen=chosen, rejected=rejected, row=i)  # identical
            return
        try:
            prompt, chosen, rejected, early = split_hh_pair(chosen, rejected)
        except ValueError as error:
            raise DataError(
                str(error), row=i, field="chosen/rejected", reason="no_shared_prompt"
            ) from None
    except DataError as error:
        collector.invalid(error)
        return
    if early and diverge_early != "keep":
        if diverge_early == "error":
            raise DataError(
                "chosen and rejected diverge before the last assistant turn",
                row=i,
                field="chosen/rejected",
                reason="diverge_early",
            )
        collector.skip("diverge_early")
        return
    if as_messages:
        prompt = parse_hh_dialogue(prompt)
        chosen = parse_hh_dialogue(chosen, first_role="assistant")
        rejected = parse_hh_dialogue(rejected, first_role="assistant")
    record = collector.add_pair(prompt=prompt, chosen=chosen, rejected=rejected, row=i)
    if record is not None and early:
        collector.note("diverge_early")
