"""benchmarks/gpu.py: its ``--quick`` run (the GPU script's code on the CPU, a tiny model)
writes every configuration's figures and the record of the machine and settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("trl")


def test_quick_run_records_every_configuration(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--out", str(out)],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gpu" and result["quick"] is True
    assert result["device"] == "cpu"
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "trl", "cuda"}
    settings = result["settings"]
    assert settings["gradient_checkpointing"] is True
    assert settings["batch_size"] == 2 and settings["timed_steps"] == 2
    assert settings["parameters"]["tiny"] > 0 and settings["mean_pair_tokens"] > 0
    runs = result["runs"]
    assert {(r["tuning"], r["system"]) for r in runs} == {
        (tuning, system)
        for tuning in ("lora", "full")
        for system in ("ours/dpo", "ours/re-dpo", "trl/dpo")
    }
    for run in runs:
        assert run["status"] == "ok", run
        assert run["timed_steps"] == 2
        assert run["step_s"] > 0
        assert run["pairs_per_s"] == pytest.approx(2 / run["step_s"], rel=0.01)
        assert run["tokens_per_s"] == pytest.approx(
            run["pairs_per_s"] * settings["mean_pair_tokens"], rel=0.01
        )
        assert run["peak_memory_gb"] is None  # no CUDA allocator on the CPU
