"""The ``curvscope`` command: curvature of a model's loss from the command line.

Hessian density, top eigenpairs and trace of a model's loss, its split into Gauss-Newton and class
terms, the gradient's overlap with the top eigenspace, per-layer densities, and its curvature
tracked during training (``track``) with the figures of a run (``plot``); saved densities drawn
together (``compare``).

Models, data and losses are given as import paths ``package.module:name`` (as uvicorn and
Lightning take them); the built-in digits problem of :mod:`curvscope.zoo` is the default.
Every failure the user can fix ends in one line ``curvscope: error: ...`` on stderr and exit
status 2 (``--debug`` shows the traceback as well); anything else exits with status 1. Ctrl-C
and SIGTERM end a command in order, at any point, with one line and status 130 or 143.

Layout: one module per command (:data:`COMMANDS`, each with ``register(commands)`` and
``run(args)``; a new command is one module and one entry there), and the modules they share:
:mod:`~curvscope.cli.problem` (the problem from its import paths, :mod:`.imports`,
:mod:`.explain`), :mod:`~curvscope.cli.options` (option groups, results folder, progress, the
rank-0 policy), :mod:`.jsonout` (--json), :mod:`.report` (printed text), :mod:`.errors`,
:mod:`.signals`, :mod:`.threads`. No command imports another, and nothing outside this package
imports it but :mod:`curvscope.program`, the program itself.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

import torch

from .._version import __version__
from ..distributed import init_from_environment
from . import (
    blocks,
    compare,
    decompose,
    density,
    explain,
    overlap,
    plot,
    report_command,
    top,
    trace,
    track,
)
from .errors import PROG, CLIError, is_user_error, one_line
from .jsonout import json_output
from .options import FORMATTER, CLIParser, rank0_output
from .signals import Signals, Terminated, interrupted
from .threads import num_threads

#: The commands, in the order ``curvscope --help`` lists them.
COMMANDS = (
    density,
    top,
    trace,
    track,
    plot,
    decompose,
    overlap,
    blocks,
    compare,
    report_command,
)

MAIN_EPILOG = """\
examples:
  curvscope density                          # built-in digits MLP: density.png in results/density
  curvscope top -k 5                         # its 5 largest Hessian eigenvalues
  curvscope trace --probes 60                # tr(H) by Hutch++
  curvscope track --out runs/gd              # train while tracking: edge of stability
  curvscope plot runs/gd                     # sharpness, density evolution, traces
  curvscope compare results/a results/b      # two saved densities in one figure
  curvscope report runs/gd                   # one self-contained HTML page of a folder
  curvscope density --model mymodels:build --data mymodels:batches --loss mse

Models, data and losses are import paths package.module:name; a callable is called with no
arguments (a factory). Run 'curvscope COMMAND --help' for each command's options.
"""

__all__ = ["COMMANDS", "CLIError", "Terminated", "build_parser", "is_user_error", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``curvscope`` argument parser, with every command of :data:`COMMANDS`."""
    parser = CLIParser(
        prog=PROG,
        description="Hessian spectra of neural-network losses: eigenvalue density (SLQ), top "
        "eigenpairs, trace.",
        epilog=MAIN_EPILOG,
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None, *, program: bool = False) -> int:
    """Run the ``curvscope`` command with ``argv`` (default ``sys.argv[1:]``).

    torch gets --threads threads, or as many as the CPUs the process may use (unless
    OMP_NUM_THREADS or MKL_NUM_THREADS is set). The program itself (``curvscope``,
    ``python -m curvscope``: :mod:`curvscope.program`) also makes OpenMP's idle threads sleep,
    unless OMP_WAIT_POLICY is set; called from Python, this function leaves the environment
    alone.

    Ctrl-C and SIGTERM end the command in order (``finally`` blocks run, temporary files are
    removed; results already written stay) with one line on stderr and status 130 or 143.
    With ``program`` (the ``curvscope`` program), a signal that arrives after the command,
    while the interpreter shuts down, ends the process at once with the same line and status.

    Returns:
        Exit status: 0 on success, 2 for a usage or input error, 1 for any other failure,
        130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM).
    """
    signals = Signals(program)
    try:
        try:
            code = _run_main(list(sys.argv[1:] if argv is None else argv))
            if program:  # the last output goes out while a signal still unwinds in order
                sys.stdout.flush()
                sys.stderr.flush()
        except KeyboardInterrupt as stop:  # during the error message or the flush
            code = interrupted(stop)
        if signals.pending is not None and code == 0:  # swallowed by a finalizer
            code = interrupted(signals.pending)
    finally:
        signals.finish()
    return code


def _run_main(argv: list[str]) -> int:
    """Parse, dispatch to the command's ``run(args)``, and turn a failure into its status.

    The command gets the parsed options plus ``argv`` (the command line, recorded with its
    results) and ``default_threads`` (no --threads and no OMP_NUM_THREADS: small models get
    one thread); it reads them and never writes them.
    """
    debug = "--debug" in argv
    explain.forget()
    try:
        parsed = build_parser().parse_args(argv, namespace=argparse.Namespace(argv=tuple(argv)))
        init_from_environment()  # under torchrun/SLURM: join the process group
        threads = num_threads(parsed)
        if threads:
            torch.set_num_threads(threads)
        default_threads = threads is not None and not getattr(parsed, "threads", None)
        args = argparse.Namespace(**vars(parsed), default_threads=default_threads)
        with rank0_output(), json_output(args):
            return int(args.run(args))
    except SystemExit as stop:  # --help and --version
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt as stop:
        if debug:
            traceback.print_exc()
        return interrupted(stop)
    except Exception as error:
        if debug:
            traceback.print_exc()
        error = explain.explain_failure(error) or error
        user = is_user_error(error)
        message = one_line(error)
        if not user:
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2 if user else 1
