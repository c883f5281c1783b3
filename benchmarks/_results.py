"""Recording a benchmark's figures: ``benchmarks/results/NAME[-quick].json`` and the
JSON object as the last line printed."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """The machine and torch's thread count, for the record."""
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {threads} torch thread(s), torch {torch.__version__}"


def record(name: str, quick: bool, figures: dict, out: Path | None = None) -> dict:
    """Write ``figures`` (with name, quick flag and machine) and print it as one line."""
    result = {"benchmark": name, "quick": quick, "machine": machine(), **figures}
    out = out or RESULTS / f"{name}{'-quick' if quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result
