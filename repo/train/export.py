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
from typing import Any, Literal

__all__ = ["ExportMode", "export_run"]

ExportMode = Literal["annotate", "relabel", "filter"]
MODES: tuple[str, ...] = ("annotate", "relabel", "filter")


def _read_posteriors(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the run has not finished, or ran with [em] enabled = "
            "false or [run] posteriors = false"
        )
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {n + 1} is not JSON ({error})") from None
    return out


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
    from repo.train.config import load_run_config
    from repo.train.trainer import load_records

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    run_dir = Path(run_dir)
    config, _ = load_run_config(run_dir)
    records = load_records(config)
    posteriors = _read_posteriors(run_dir / "posteriors.jsonl")
    out = Path(out) if out is not None else run_dir / f"export-{mode}.jsonl"
    counts = {"labels": len(posteriors), "written": 0, "flipped": 0}
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for p in posteriors:
            n = int(p["record"])
            if not 0 <= n < len(records) or records[n].item != p["item"]:
                raise ValueError(
                    f"{run_dir}: posterior of record {n} does not match the data any more "
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
