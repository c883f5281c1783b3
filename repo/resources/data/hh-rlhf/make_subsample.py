"""Rebuild ``subsample.jsonl.gz``: a small deterministic sample of Anthropic HH-RLHF.

Usage::

    python make_subsample.py [SOURCE_DIR]

SOURCE_DIR holds the HH-RLHF test splits as ``<split>/test.jsonl.gz`` (default:
``/work/shared/data/hh-rlhf-test``, a copy of github.com/anthropics/hh-rlhf, MIT,
Copyright 2022 Anthropic; see SOURCE.txt beside this script).

What it writes (standard library only, byte-for-byte reproducible):

- 1,000 pairs from each of ``helpful-base`` and ``harmless-base`` test splits,
  2,000 in all, in source order (split, then line index);
- every *odd* pair of those two splits is kept on purpose, so that the loader's
  rules are exercised on real data: pairs whose chosen and rejected dialogues are
  identical, and pairs that diverge before the last ``"\\n\\nAssistant:"`` turn
  (2 + 14 pairs; this over-represents them, about 3 would be expected by chance);
- the remaining slots are a uniform sample without replacement, drawn with
  ``random.Random(SEED)`` from the ordinary pairs of each split;
- each line is the original ``{"chosen", "rejected"}`` object plus provenance:
  ``"split"`` (source split) and ``"index"`` (0-based line in its test.jsonl.gz);
- gzip with mtime 0, so the bytes depend only on the data.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from pathlib import Path

SEED = 20240615
PER_SPLIT = 1000
SPLITS = ("helpful-base", "harmless-base")
DEFAULT_SOURCE = Path("/work/shared/data/hh-rlhf-test")
OUTPUT = Path(__file__).with_name("subsample.jsonl.gz")
MARKER = "\n\nAssistant:"


def is_odd(chosen: str, rejected: str) -> bool:
    """Identical pair, or the two dialogues diverge before the last assistant turn."""
    if chosen == rejected:
        return True
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(MARKER)
    if cut < 0:
        return True
    cut += len(MARKER)
    return MARKER in chosen[cut:] or MARKER in rejected[cut:]


def sample_split(path: Path, rng: random.Random) -> list[tuple[int, dict]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    odd = [i for i, r in enumerate(rows) if is_odd(r["chosen"], r["rejected"])]
    ordinary = [i for i, r in enumerate(rows) if not is_odd(r["chosen"], r["rejected"])]
    picked = sorted(odd + rng.sample(ordinary, PER_SPLIT - len(odd)))
    return [(i, rows[i]) for i in picked]


def main(source: Path = DEFAULT_SOURCE, output: Path = OUTPUT) -> None:
    rng = random.Random(SEED)
    lines = []
    for split in SPLITS:
        for index, row in sample_split(source / split / "test.jsonl.gz", rng):
            record = {
                "chosen": row["chosen"],
                "rejected": row["rejected"],
                "split": split,
                "index": index,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    with (
        open(output, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as fh,
    ):
        fh.write(payload)
    print(f"wrote {len(lines)} pairs, {output.stat().st_size} bytes -> {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)
