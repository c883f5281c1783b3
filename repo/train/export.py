"""The training data with each label's posterior, in TRL's layout (``re-po export``).

A finished run holds ``posteriors.jsonl``: per label ``w`` (the posterior that the
label is correct), ``q`` (that A is truly better) and ``flipped`` (``w < 0.5``).
Joined back to the run's records, one row per label is written as JSON lines:
``prompt``, ``chosen``, ``rejected`` (as labelled), ``annotator``, ``item``, ``row``
(the source row), ``w`` and ``flipped``, in one of three modes:

* ``annotate`` (default): every label as labelled, with ``w`` and ``flipped``;
* ``relabel``: labels with ``w < threshold`` have chosen and rejected swapped
  (``relabelled: true``): what the noise model believes the annotator meant;
* ``filter``: labels with ``w < threshold`` are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from repo.train.build import load_records
from repo.train.run_dir import RunDir

__all__ = ["ExportMode", "export_run"]

ExportMode = Literal["annotate", "relabel", "filter"]
MODES: tuple[str, ...] = ("annotate", "relabel", "filter")


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    mode: ExportMode = "annotate",
    threshold: float = 0.5,
) -> tuple[Path, dict[str, int]]:
    """Write the run's labelled data with posteriors (see the module docstring).

    :param out: the JSONL file to write (default ``<run_dir>/export-<mode>.jsonl``).
    :return: the path written and counts (``labels``, ``written``, ``flipped``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    run = RunDir(run_dir)
    config = run.read_config()
    posteriors = run.read_posteriors()
    records = load_records(config)
    out = Path(out) if out is not None else run.export_file(mode)
    counts = {"labels": len(posteriors), "written": 0, "flipped": 0}
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for p in posteriors:
            n = int(p["record"])
            if not 0 <= n < len(records) or records[n].item != p["item"]:
                raise ValueError(
                    f"{run.path}: posterior of record {n} does not match the data any more "
                    "(was the data file changed after training?)"
                )
            record = records[n]
            low = p["w"] < threshold
            counts["flipped"] += int(low)
            if mode == "filter" and low:
                continue
            chosen, rejected = record.chosen, record.rejected
            row = {"prompt": record.prompt}
            if mode == "relabel" and low:
                chosen, rejected = rejected, chosen
                row["relabelled"] = True
            elif mode == "relabel":
                row["relabelled"] = False
            row.update(
                chosen=chosen,
                rejected=rejected,
                annotator=p["annotator"],
                item=record.item,
                row=record.row,
                w=p["w"],
                flipped=bool(low),
            )
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["written"] += 1
    os.replace(tmp, out)
    return out, counts
