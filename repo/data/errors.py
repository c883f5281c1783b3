"""The one exception raised for bad preference data.

:class:`DataError` is a :class:`ValueError` that says *where* the problem is: the
source row (0-based, in the order the source yields rows; ``None`` when the whole
source is affected, e.g. a missing column) and the field (column name, possibly with
a message path such as ``"chosen[0].content"``).  Its message always names both::

    row 17, field 'chosen': empty response
    all rows, field 'annotator': missing column (columns: prompt, chosen, rejected)
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DataError", "describe_skipped"]


class DataError(ValueError):
    """Invalid preference data at ``row`` / ``field``.

    Attributes
    ----------
    row:
        0-based source row, or ``None`` when the problem is not tied to one row.
    field:
        Column (or message path) at fault, or ``None`` when not tied to one field.
    problem:
        The bare description, without the location prefix.
    reason:
        Short machine-readable code (``"missing"``, ``"type"``, ``"empty"``, ...);
        the key under which a skipped row is counted in ``PreferenceData.skipped``.
    """

    def __init__(
        self,
        problem: str,
        *,
        row: int | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ) -> None:
        self.problem = problem
        self.row = row
        self.field = field
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        where = f"row {self.row}" if self.row is not None else "all rows"
        what = f"field {self.field!r}" if self.field is not None else "no single field"
        return f"{where}, {what}: {self.problem}"

    def __reduce__(self):  # keep row/field across pickling (multiprocessing, datasets.map)
        return (_rebuild, (self.problem, self.row, self.field, self.reason))


def describe_skipped(skipped: Mapping[str, int]) -> str | None:
    """The one console line that says which rows were left out, by reason (None when
    none were): ``[re-po] skipped 3 row(s): 1 self_comparison, 2 tie``."""
    counts = {reason: int(n) for reason, n in skipped.items() if n}
    if not counts:
        return None
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    return f"[re-po] skipped {sum(counts.values())} row(s): {reasons}"


def _rebuild(problem: str, row: int | None, field: str | None, reason: str) -> DataError:
    return DataError(problem, row=row, field=field, reason=reason)
