"""The ``curvscope`` program (console script and ``python -m curvscope``).

It sets the OpenMP environment *before* torch loads (OpenMP reads it once, when torch loads
it): idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user has
set the policy. torch's CPU build runs its own and MKL's parallel regions on GNU OpenMP, whose
idle threads spin about 3 ms by default (GOMP_SPINCOUNT 300000); with another busy process on
the machine they steal the CPU the working threads need, and 2 threads ran several times
slower than 1 (docs/benchmarks.md, Threads). ``KMP_BLOCKTIME`` would be the same knob for
Intel's OpenMP, which this build does not load; ``OMP_WAIT_POLICY`` is read by both.

This module imports nothing heavy, and ``import curvscope`` loads torch only when one of its
names is used, so the program reaches this point before torch is loaded. Calling
:func:`curvscope.cli.main` from Python (a notebook, a test) leaves the environment alone.

The program also ends itself: once the command has returned and every other atexit callback
has run, stdout and stderr are flushed and the process exits with the command's status
(``os._exit``), skipping the interpreter's teardown of torch's modules. That teardown is C
code that ran about 0.5 s after every command (measured: ``import torch`` alone exits 0.4 s
later without it), and a Ctrl-C there was lost without a word (exit status 0): no Python
signal handler runs once the interpreter has stopped running Python code. Results are
written and synced before the command returns, so nothing of the program's is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

#: What the program sets in its environment where the user has not, before torch loads.
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


#: The command's exit status, once it has returned (read by :func:`_exit_now`).
_status: list[int] = []


def _exit_now() -> None:
    """The program's last atexit callback: flush and end the process with the command's status.

    Registered before torch loads, so it runs after every other one; it flushes stdout and stderr
    and skips the interpreter's teardown.
    """
    if not _status:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more to say
            stream.flush()
    os._exit(_status[-1])


def main() -> int:
    """Set :data:`THREAD_ENV` where unset, then run the command line (``sys.argv``) as the program.

    Ctrl-C or SIGTERM at any point, even while the interpreter shuts down after the command, ends it
    with one line and status 130 or 143 (:func:`curvscope.cli.main`).
    """
    for name, value in THREAD_ENV.items():
        os.environ.setdefault(name, value)
    atexit.register(_exit_now)
    try:
        from .cli import main as run_command_line  # loads torch: seconds
    except KeyboardInterrupt:
        sys.stderr.write("curvscope: interrupted\n")
        code = 130
    else:
        code = run_command_line(program=True)
    _status.append(code)
    return code
