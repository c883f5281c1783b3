"""Ending a process that a launcher (torchrun, ``accelerate launch``) started.

A process of a multi-process run holds a ``torch.distributed`` process group whose
backend keeps C++ worker threads. Left to interpreter finalization, such a thread can
drop the last reference to a tensor while the interpreter is being torn down; taking
the GIL then ends the thread by forced unwinding, and the process aborts with
"terminate called without an active exception" (SIGABRT) after its work is done
(pytorch/pytorch#179291 and #190489; seen with gloo in this project's CI even after
``destroy_process_group``). The launcher then reports a failed run whose outputs are
complete.

:func:`exit_process` ends such a process as finalization would, less the teardown that
aborts: the ``atexit`` handlers run (logging's flush among them) while the interpreter
is whole, the standard streams are flushed, the process group is closed, and the
process leaves with ``os._exit``. A process with no group, or a group of one process,
exits normally.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def launched_processes() -> int:
    """The number of processes in the open default process group (1 where none is)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def close_process_group() -> None:
    """Close the default process group, where one is open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Exit with status ``code``; in a multi-process run, without interpreter finalization.

    With an open group of two or more processes: run the ``atexit`` handlers, flush
    ``sys.stdout`` and ``sys.stderr``, close the group and ``os._exit(code)``. Otherwise
    close the group (if any) and ``sys.exit(code)``. Call it last, after every output is
    written and closed.
    """
    multi_process = launched_processes() > 1
    if not multi_process:
        close_process_group()
        sys.exit(code)
    atexit._run_exitfuncs()  # what finalization would run first, interpreter still whole
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    close_process_group()
    os._exit(code)
