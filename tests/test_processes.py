"""repo.inference.processes: jobs in forked or fresh worker processes, results in order,
a worker's exception re-raised, and no worker left running after a failure."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from repo.inference import processes
from repo.inference.processes import WorkerError, default_start, map_in_processes

STARTS = ["fork", "fresh"]


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"job {x}")
    return x


def _die_or_wait(job):
    """A worker's job: record the pid and wait, or exit without a result once the
    other worker has recorded its pid."""
    kind, pid_file = job
    if kind == "die":
        while not Path(pid_file).exists():
            time.sleep(0.05)
        os._exit(3)
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


@pytest.mark.parametrize("start", STARTS)
def test_results_come_back_in_the_jobs_order_from_other_processes(start):
    called = []
    out = map_in_processes(
        _square_and_pid, list(range(5)), 2, start=start, meanwhile=lambda: called.append(1)
    )
    assert [value for value, _ in out] == [0, 1, 4, 9, 16]
    pids = {pid for _, pid in out}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, neither this one
    assert out[0][1] == out[2][1] == out[4][1]  # dealt round-robin
    assert called == [1]


@pytest.mark.parametrize("start", STARTS)
def test_a_workers_exception_is_raised_here(start):
    with pytest.raises(KeyError, match="job 3"):
        map_in_processes(_fail_on_three, [1, 2, 3, 4], 2, start=start)


@pytest.mark.parametrize("start", STARTS)
def test_a_dead_worker_takes_the_others_down(tmp_path, start):
    # Chains run in processes by default: a failure (or Ctrl-C) leaves none running.
    pid_file = str(tmp_path / "pid")
    with pytest.raises(WorkerError, match="exited with code 3"):
        map_in_processes(
            _die_or_wait, [("die", pid_file), ("wait", pid_file)], workers=2, start=start
        )
    with pytest.raises(ProcessLookupError):  # the waiting worker is gone
        os.kill(int(open(pid_file).read()), 0)


def test_forked_workers_take_what_cannot_be_pickled():
    # a traced TorchScript function in a closure: a fresh worker could not be sent it
    traced = torch.jit.trace(lambda x: 2 * x + 1, torch.zeros(3))
    out = map_in_processes(
        lambda x: traced(torch.full((3,), float(x))).tolist(), [0, 1], 2, start="fork"
    )
    assert out == [[1.0] * 3, [3.0] * 3]


def test_the_start_method_is_fork_on_linux_unless_cuda_is_in_use(monkeypatch):
    monkeypatch.delenv(processes.START_VARIABLE, raising=False)
    monkeypatch.setattr(processes.sys, "platform", "linux")
    assert default_start() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert default_start() == "fresh"  # a forked child could not use CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for platform in ("darwin", "win32"):
        monkeypatch.setattr(processes.sys, "platform", platform)
        assert default_start() == "fresh"
    monkeypatch.setenv(processes.START_VARIABLE, "fork")
    assert default_start() == "fork"
    monkeypatch.setenv(processes.START_VARIABLE, "spawn")
    with pytest.raises(ValueError, match="REPO_WORKER_START must be 'fork' or 'fresh'"):
        default_start()
    with pytest.raises(ValueError, match="start must be"):
        map_in_processes(_square_and_pid, [1], 1, start="spawn")
