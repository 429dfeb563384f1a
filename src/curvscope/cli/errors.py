"""How the command reports a failure: one line on stderr and an exit status.

Exit status 2 for what the user can fix (:func:`is_user_error`), 1 for anything else.
"""

from __future__ import annotations

import traceback
from pathlib import Path

PROG = "curvscope"


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type's name when it has none)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


USER_ERRORS = (CLIError, ValueError, TypeError, ImportError)
#: Errors that curvscope's own checks raise with a message for the user (a checkpoint that a
#: new run would overwrite, a missing or truncated result file, a basis that cannot fit in
#: memory): user errors when raised by curvscope with a message, not by the system (errno).
CHECK_ERRORS = (
    FileExistsError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    EOFError,
    MemoryError,
)

#: The folder of the curvscope package.
_PACKAGE = Path(__file__).resolve().parents[1]


def raised_outside_curvscope(error: BaseException) -> bool:
    """True when the innermost frame of the error is not curvscope's.

    That is, torch, the model or the loss raised it: not one of curvscope's own checks.
    """
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    return _PACKAGE not in Path(frames[-1].filename).resolve().parents


def is_user_error(error: BaseException) -> bool:
    """True for a failure the user can fix (exit status 2).

    That is :data:`USER_ERRORS`, and :data:`CHECK_ERRORS` raised by curvscope's own checks with a
    message.
    """
    if isinstance(error, USER_ERRORS):
        return True
    return (
        isinstance(error, CHECK_ERRORS)
        and getattr(error, "errno", None) is None
        and bool(str(error).strip())
        and bool(traceback.extract_tb(error.__traceback__))
        and not raised_outside_curvscope(error)
    )
