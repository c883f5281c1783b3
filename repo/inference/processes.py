"""Run a function over jobs in worker processes, whatever defined the jobs' classes.

:func:`map_in_processes` sends each worker its jobs serialised by ``cloudpickle``
(which pickles by value what lives in ``__main__``: a noise model class defined in
a script, a notebook or on stdin) and starts it as a fresh Python running this
module's ``_main`` (:data:`WORKER`) with the parent's ``sys.path``. No ``multiprocessing``
start method is involved, so the parent's main module is never re-imported (the
``spawn`` method re-runs it from its path, which fails for ``<stdin>`` and
notebooks, and plain pickling fails for classes defined there).

Each worker runs its share of the jobs one after another and writes the results
(or the exception it raised, re-raised in the parent) to a file; jobs are dealt to
the ``workers`` round-robin, and the results come back in the jobs' order. If
waiting is interrupted (Ctrl-C) or a worker dies, the other workers are killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

WORKER = "import sys; from repo.inference.processes import _main; _main(*sys.argv[1:])"
"""A worker's program (not ``-m``: the package imports this module first, and runpy
warns when a module it is asked to run is already imported)."""


class WorkerError(RuntimeError):
    """A worker process ended without a result (killed, or failed before running)."""


def map_in_processes(function: Callable, jobs: Sequence[Any], workers: int) -> list[Any]:
    """``[function(job) for job in jobs]`` in ``min(workers, len(jobs))`` processes."""
    workers = max(1, min(workers, len(jobs)))
    shares = [list(range(w, len(jobs), workers)) for w in range(workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with tempfile.TemporaryDirectory(prefix="repo-workers-") as folder:
        running = []
        for w, share in enumerate(shares):
            payload, result = Path(folder, f"jobs-{w}.pkl"), Path(folder, f"result-{w}.pkl")
            payload.write_bytes(cloudpickle.dumps((function, [jobs[i] for i in share])))
            command = [sys.executable, "-c", WORKER, str(payload), str(result)]
            process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
            running.append((process, result))
        outcomes = []
        try:
            for process, result in running:
                outcomes.append(_collect(process, result))
        except BaseException:  # e.g. KeyboardInterrupt: no worker is left running
            for process, _ in running:
                process.kill()
                process.wait()
            raise
    out: list[Any] = [None] * len(jobs)
    for share, (ok, values) in zip(shares, outcomes, strict=True):
        if not ok:
            raise values
        for i, value in zip(share, values, strict=True):
            out[i] = value
    return out


def _collect(process: subprocess.Popen, result: Path) -> tuple[bool, Any]:
    """Wait for a worker; its ``(ok, values or exception)``, its stderr passed on."""
    _, stderr = process.communicate()
    if stderr:
        sys.stderr.write(stderr)
    if not result.is_file():
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise WorkerError(f"a worker process exited with code {process.returncode}: {tail}")
    return cloudpickle.loads(result.read_bytes())


def _main(payload: str, result: str) -> None:
    function, jobs = cloudpickle.loads(Path(payload).read_bytes())
    try:
        outcome = (True, [function(job) for job in jobs])
    except Exception as error:  # re-raised in the parent
        outcome = (False, error)
    Path(result).write_bytes(cloudpickle.dumps(outcome))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
