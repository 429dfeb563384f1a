"""Ctrl-C and SIGTERM while a command runs: unwound in order, one line, status 130 or 143."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from .errors import PROG


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command: unwinds like Ctrl-C.

    So ``finally`` blocks run and temporary files are removed, and the command exits with status
    128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """The program's handling of Ctrl-C and SIGTERM while :func:`curvscope.cli.main` runs.

    While the command runs, SIGINT raises KeyboardInterrupt and SIGTERM raises
    :class:`Terminated`. An interrupt raised inside a finalizer (``__del__``), where Python
    prints "Exception ignored" and goes on, is remembered instead of printed: the command
    runs on (Python gives no way to raise it after the finalizer; a second Ctrl-C stops it)
    and ends with the interrupt's status. Once the command is over (``finish``), for the
    program the handlers stay and print one line and exit at once (results are written and
    stdout flushed: nothing is left to clean up); called from Python, the caller's handlers
    come back. Handlers are only replaced in the main thread and where they are Python's
    defaults (an ignored SIGINT, in a background job, stays ignored).
    """

    def __init__(self, program: bool) -> None:
        self.program = program
        self.finished = False
        self.pending: KeyboardInterrupt | None = None
        self.previous: dict[int, Any] = {}
        self.previous_hook = sys.unraisablehook
        if threading.current_thread() is not threading.main_thread():
            return
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                self.previous[signum] = signal.signal(signum, self._handle)
        sys.unraisablehook = self._unraisable

    def _handle(self, signum: int, frame: Any) -> None:
        if self.finished:  # the program after the command: say so and stop here
            try:
                os.write(2, f"{signal_line(signum)}\n".encode())
            finally:
                os._exit(128 + signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def _unraisable(self, unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.pending = self.pending or unraisable.exc_value
            return
        self.previous_hook(unraisable)

    def finish(self) -> None:
        """The command is over: the program exits at the next signal.

        From Python, the caller's handlers and unraisable hook are restored.
        """
        if self.program:
            self.finished = True
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self.previous_hook


def signal_line(signum: int) -> str:
    """The one line of a command ended by ``signum``."""
    if signum == signal.SIGINT:
        return f"{PROG}: interrupted"
    return f"{PROG}: terminated ({signal.Signals(signum).name})"


def interrupted(stop: KeyboardInterrupt) -> int:
    """Print the one line of an interrupted command; return its exit status.

    130 for Ctrl-C, 143 for SIGTERM.
    """
    signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
    print(signal_line(signum), file=sys.stderr)
    return 128 + signum
