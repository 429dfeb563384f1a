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
"""

from __future__ import annotations

import os

#: What the program sets in its environment where the user has not, before torch loads.
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def main() -> int:
    """Set :data:`THREAD_ENV` where unset, then run the command line (``sys.argv``)."""
    for name, value in THREAD_ENV.items():
        os.environ.setdefault(name, value)
    from .cli import main as run_command_line

    return run_command_line()
