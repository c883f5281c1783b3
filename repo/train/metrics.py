"""What a run writes as it goes: metrics, the annotator trajectory, and summaries.

Files in the run directory (one JSON object a line, appended and flushed each
logged step; a resumed run first drops the lines after its checkpoint's step):

* ``metrics.jsonl``: ``step``, ``epoch``, ``loss`` (the policy step's loss), TRL's
  ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (``chosen`` is what
  each label chose), ``learning_rate``, ``grad_norm``, and for RE-PO
  ``marginal_nll`` (``-log p(o)`` per unit at the E-step), ``w/mean``,
  ``w/frac_below_0.5`` (labels more likely wrong than right) and a
  ``<param>/min|mean|max`` summary of every annotator parameter (``eta/...`` for the
  flip models);
* ``annotators.jsonl``: ``step`` and every annotator parameter as a list in the
  order of ``annotators.json`` (the per-annotator trajectory).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["JsonlLog", "MetricSums", "parameter_summary"]


class JsonlLog:
    """An append-only JSON-lines file keyed by ``step``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep only the lines with ``step <= step`` (a resumed run rewrites the rest)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x]


class MetricSums:
    """Sums over an optimizer step's micro-batches, reduced over processes in one call.

    ``add(name, total, count)`` accumulates a sum and its count; :meth:`means`
    all-reduces every pair at once and returns ``total / count`` per name.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: Tensor | float, count: Tensor | float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def means(self, reduce=None) -> dict[str, float]:
        names = sorted(self.totals)
        flat = torch.tensor(
            [self.totals[n] for n in names] + [self.counts[n] for n in names], dtype=torch.float64
        )
        if reduce is not None:
            flat = reduce(flat)
        k = len(names)
        return {
            n: float(flat[i] / flat[k + i]) if flat[k + i] > 0 else math.nan
            for i, n in enumerate(names)
        }


def parameter_summary(parameters: dict[str, Tensor]) -> dict[str, float]:
    """``<name>/min``, ``<name>/mean``, ``<name>/max`` of every annotator parameter."""
    out = {}
    for name, value in parameters.items():
        v = value.detach().double().reshape(-1)
        out[f"{name}/min"] = float(v.min())
        out[f"{name}/mean"] = float(v.mean())
        out[f"{name}/max"] = float(v.max())
    return out
