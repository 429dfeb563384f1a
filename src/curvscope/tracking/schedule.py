"""When a tracker takes a snapshot: every k steps, log-spaced steps, or an explicit list.

A schedule answers one question, ``due(step)``, and round-trips through a short string so the
command line and the run folder (``run.json``) can carry it:

    every:50          steps 0, 50, 100, ...
    every:50:10       steps 10, 60, 110, ... (k, then the first step)
    log:1:10000:10    10 steps per decade from 1 to 10000, rounded and deduplicated
    steps:0,10,100    exactly these steps
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Training steps at which to take a snapshot.

    Build one with :meth:`every`, :meth:`log`, :meth:`at` or :meth:`parse`; ``Schedule(...)``
    directly is for internal use.

    Attributes:
        period: k of an every-k schedule (None for a list of steps).
        start: First step of an every-k schedule.
        steps: Sorted explicit steps (empty for an every-k schedule).
        spec: The string that :meth:`parse` turns back into this schedule.
    """

    period: int | None
    start: int
    steps: tuple[int, ...]
    spec: str

    @classmethod
    def every(cls, k: int, start: int = 0) -> Schedule:
        """Every ``k`` steps from ``start``: start, start + k, start + 2k, ..."""
        k, start = _int(k, "k"), _int(start, "start")
        if k < 1:
            raise ValueError(f"every k steps needs k >= 1, got {k}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        spec = f"every:{k}" if start == 0 else f"every:{k}:{start}"
        return cls(period=k, start=start, steps=(), spec=spec)

    @classmethod
    def log(cls, first: int = 1, last: int = 10_000, per_decade: int = 10) -> Schedule:
        """About ``per_decade`` steps per factor of 10 from ``first`` to ``last`` (both kept).

        The points first * 10^(i / per_decade) are rounded to the nearest integer and
        deduplicated, so early decades hold fewer distinct steps (1, 2, 3, 4, 5, 6, 8, 10, ...
        for per_decade=10). Add step 0 with ``Schedule.at([0, *s.steps])`` if it is wanted.
        """
        first, last, per_decade = _int(first, "first"), _int(last, "last"), _int(per_decade, "")
        if first < 1 or last < first:
            raise ValueError(
                f"log schedule needs 1 <= first <= last, got first={first}, last={last}"
            )
        if per_decade < 1:
            raise ValueError(f"per_decade must be >= 1, got {per_decade}")
        count = math.floor(per_decade * math.log10(last / first) + 1e-9)
        points = {first, last}
        for i in range(count + 1):
            points.add(min(last, math.floor(first * 10 ** (i / per_decade) + 0.5)))
        return cls(
            period=None,
            start=0,
            steps=tuple(sorted(points)),
            spec=f"log:{first}:{last}:{per_decade}",
        )

    @classmethod
    def at(cls, steps: Iterable[int]) -> Schedule:
        """Exactly the given steps (sorted, duplicates removed)."""
        unique = sorted({_int(step, "step") for step in steps})
        if not unique:
            raise ValueError("an explicit schedule needs at least one step")
        if unique[0] < 0:
            raise ValueError(f"steps must be >= 0, got {unique[0]}")
        return cls(
            period=None, start=0, steps=tuple(unique), spec="steps:" + ",".join(map(str, unique))
        )

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Read "every:K[:START]", "log:FIRST:LAST:PER_DECADE" or "steps:S1,S2,...".

        A bare integer "K" means "every:K".
        """
        if not isinstance(text, str):
            raise TypeError(f"a schedule string is expected, got {type(text).__name__}")
        kind, _, rest = text.strip().partition(":")
        kind = kind.strip().lower()
        try:
            if not rest and kind.isdigit():
                return cls.every(int(kind))
            fields = [field.strip() for field in rest.split(":")] if rest else []
            if kind == "every" and len(fields) in (1, 2):
                return cls.every(*(int(field) for field in fields))
            if kind == "log" and len(fields) in (2, 3):
                return cls.log(*(int(field) for field in fields))
            if kind == "steps" and len(fields) == 1:
                return cls.at(int(step) for step in fields[0].split(",") if step.strip())
        except ValueError as error:
            raise ValueError(f"bad schedule {text!r}: {error}") from error
        raise ValueError(
            f"bad schedule {text!r}: expected 'every:K', 'every:K:START', "
            "'log:FIRST:LAST:PER_DECADE' or 'steps:S1,S2,...' (e.g. 'every:50', "
            "'log:1:10000:10', 'steps:0,10,100')"
        )

    @classmethod
    def coerce(cls, value: Schedule | str | int | Iterable[int]) -> Schedule:
        """A Schedule from a Schedule, a spec string, an int k (every k) or a list of steps."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.every(value)
        if isinstance(value, Iterable):
            return cls.at(value)
        raise TypeError(
            f"schedule must be a Schedule, a string such as 'every:50', an int or a list of "
            f"steps, got {type(value).__name__}"
        )

    def due(self, step: int) -> bool:
        """True when a snapshot is due at ``step``."""
        if self.period is not None:
            return step >= self.start and (step - self.start) % self.period == 0
        return step in self._step_set

    def until(self, last: int) -> list[int]:
        """All due steps in [0, last]."""
        if self.period is not None:
            return list(range(self.start, last + 1, self.period))
        return [step for step in self.steps if step <= last]

    @property
    def _step_set(self) -> frozenset[int]:
        cached = self.__dict__.get("_cached_set")
        if cached is None:
            cached = frozenset(self.steps)
            object.__setattr__(self, "_cached_set", cached)
        return cached

    def __str__(self) -> str:
        return self.spec


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ValueError(f"{name or 'value'} must be an integer, got {value!r}") from None
        if as_int != value:
            raise ValueError(f"{name or 'value'} must be an integer, got {value!r}")
        return as_int
    return value
