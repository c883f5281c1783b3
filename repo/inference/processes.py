"""Run a function over jobs in worker processes, whatever defined the jobs' classes.

:func:`map_in_processes` deals the jobs to the ``workers`` round-robin; each worker
runs its share one after another and writes the results (or the exception it
raised, re-raised in the parent) to a file, and the results come back in the jobs'
order. If waiting is interrupted (Ctrl-C) or a worker dies, the other workers are
killed. A worker starts in one of two ways (``start``):

* ``"fork"``: a copy of this process (``os.fork``). The worker inherits the function
  and the jobs as they are in memory: nothing is pickled on the way in, nothing is
  imported again, and objects that cannot be pickled (a traced TorchScript function)
  travel as they are. It leaves by ``os._exit`` once its results are written, never
  returning into the parent's code.
* ``"fresh"``: a new Python running this module's ``_main`` (:data:`WORKER`) with the
  parent's ``sys.path``, sent the function and its jobs serialised by ``cloudpickle``
  (which pickles by value what lives in ``__main__``: a noise model class defined in
  a script, a notebook or on stdin). No ``multiprocessing`` start method is involved,
  so the parent's main module is never re-imported (the ``spawn`` method re-runs it
  from its path, which fails for ``<stdin>`` and notebooks, and plain pickling fails
  for classes defined there). It pays the worker's imports (seconds for torch and
  Pyro).

:func:`default_start` chooses: ``fork`` on Linux unless CUDA is initialised in this
process (a forked child cannot use it; macOS forks unsafely, Windows not at all),
else ``fresh``; the environment variable ``REPO_WORKER_START`` (``fork`` or
``fresh``) overrides it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import cloudpickle

WORKER = "import sys; from repo.inference.processes import _main; _main(*sys.argv[1:])"
"""A fresh worker's program (not ``-m``: the package imports this module first, and
runpy warns when a module it is asked to run is already imported)."""

Start = Literal["fork", "fresh"]
START_VARIABLE = "REPO_WORKER_START"


class WorkerError(RuntimeError):
    """A worker process ended without a result (killed, or failed before running)."""


def default_start() -> Start:
    """How workers start here: ``$REPO_WORKER_START`` when set, else ``"fork"`` on
    Linux with CUDA not initialised in this process, else ``"fresh"``."""
    chosen = os.environ.get(START_VARIABLE)
    if chosen is not None:
        if chosen not in ("fork", "fresh"):
            raise ValueError(f"{START_VARIABLE} must be 'fork' or 'fresh', got {chosen!r}")
        return chosen  # type: ignore[return-value]
    torch = sys.modules.get("torch")
    cuda_in_use = torch is not None and torch.cuda.is_initialized()
    return "fork" if sys.platform == "linux" and not cuda_in_use else "fresh"


def map_in_processes(
    function: Callable,
    jobs: Sequence[Any],
    workers: int,
    *,
    start: Start | None = None,
    meanwhile: Callable[[], Any] | None = None,
) -> list[Any]:
    """``[function(job) for job in jobs]`` in ``min(workers, len(jobs))`` processes.

    :param start: ``"fork"`` or ``"fresh"`` (module docstring); default
        :func:`default_start`.
    :param meanwhile: called in this process once the workers run (work it would
        otherwise do after them, e.g. imports it needs next).
    """
    start = start or default_start()
    if start not in ("fork", "fresh"):
        raise ValueError(f"start must be 'fork' or 'fresh', got {start!r}")
    workers = max(1, min(workers, len(jobs)))
    shares = [list(range(w, len(jobs), workers)) for w in range(workers)]
    with tempfile.TemporaryDirectory(prefix="repo-workers-") as folder:
        running: list[_Worker] = []
        try:
            for w, share in enumerate(shares):
                result = Path(folder, f"result-{w}.pkl")
                part = [jobs[i] for i in share]
                if start == "fork":
                    running.append(_Forked(function, part, result))
                else:
                    running.append(_Fresh(function, part, Path(folder, f"jobs-{w}.pkl"), result))
            if meanwhile is not None:
                meanwhile()
            outcomes = [worker.collect() for worker in running]
        except BaseException:  # e.g. KeyboardInterrupt: no worker is left running
            for worker in running:
                worker.kill()
            raise
    out: list[Any] = [None] * len(jobs)
    for share, (ok, values) in zip(shares, outcomes, strict=True):
        if not ok:
            raise values
        for i, value in zip(share, values, strict=True):
            out[i] = value
    return out


class _Worker:
    """A started worker: :meth:`collect` waits for its ``(ok, values or exception)``."""

    result: Path

    def collect(self) -> tuple[bool, Any]:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def _read(self, code: int, detail: str = "") -> tuple[bool, Any]:
        if not self.result.is_file():
            raise WorkerError(f"a worker process exited with code {code}{detail}")
        return cloudpickle.loads(self.result.read_bytes())


class _Forked(_Worker):
    """A copy of this process running ``function`` over ``jobs``."""

    def __init__(self, function: Callable, jobs: list[Any], result: Path) -> None:
        self.result = result
        sys.stdout.flush()  # what is buffered is printed once, by the parent
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python 3.12+ warns when a process with threads forks. Ours are native
            # threads of torch and of pyarrow's allocator, idle here, which install
            # their own fork handlers; the worker runs one-threaded torch code and
            # leaves by os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:  # the worker
            code = 1
            try:
                _run(function, jobs, result)
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def collect(self) -> tuple[bool, Any]:
        _, status = os.waitpid(self.pid, 0)
        return self._read(os.waitstatus_to_exitcode(status))

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already reaped
            pass


class _Fresh(_Worker):
    """A new Python running :data:`WORKER` on ``jobs`` pickled to ``payload``."""

    def __init__(self, function: Callable, jobs: list[Any], payload: Path, result: Path) -> None:
        self.result = result
        payload.write_bytes(cloudpickle.dumps((function, jobs)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        command = [sys.executable, "-c", WORKER, str(payload), str(result)]
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    def collect(self) -> tuple[bool, Any]:
        _, stderr = self.process.communicate()
        if stderr:
            sys.stderr.write(stderr)
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return self._read(self.process.returncode, f": {tail}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _run(function: Callable, jobs: list[Any], result: Path) -> None:
    """A worker's work: ``function`` over ``jobs``; ``(True, values)`` or ``(False,
    the exception)`` written to ``result``."""
    try:
        outcome = (True, [function(job) for job in jobs])
    except Exception as error:  # re-raised in the parent
        outcome = (False, error)
    result.write_bytes(cloudpickle.dumps(outcome))


def _main(payload: str, result: str) -> None:
    """A fresh worker: read the function and jobs, run them."""
    function, jobs = cloudpickle.loads(Path(payload).read_bytes())
    _run(function, jobs, Path(result))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
