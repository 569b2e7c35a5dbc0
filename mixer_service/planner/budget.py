"""A wall-clock budget and a cancel flag for one planner request.

Every linear solve of a fit is a check point (``check``), so a fit stops within one solve of its deadline
or of its client leaving, without threading the budget through each stage: the budget of the fit running
in this thread (or task) is held in a context variable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from mixer_contract.errors import TooLarge


class FitTimeout(TooLarge):
    """The fit needs more wall-clock time than the request's budget (413: ask for less work)."""


class FitCancelled(Exception):
    """The client went away; the fit stops and nobody reads its answer."""


class Deadline:
    """``seconds`` from now (None: no limit), and a flag another thread sets to cancel."""

    def __init__(self, seconds: float | None = None, cancel: threading.Event | None = None,
                 what: str = "the planner's wall-clock budget") -> None:
        if seconds is not None and not seconds > 0:
            raise TooLarge(f"{what} must be > 0 seconds, got {seconds}")
        self.seconds, self.what = seconds, what
        self.cancel = cancel or threading.Event()
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self) -> None:
        if self.cancel.is_set():
            raise FitCancelled("the request was cancelled")
        if self.expired():
            raise FitTimeout(f"the fit did not finish within {self.what} of {self.seconds:g} s; "
                             "ask for fewer bootstrap refits or fewer runs")

    def share(self, fraction: float) -> Deadline:
        """A deadline ``fraction`` of the remaining time away, cancelled with this one."""
        child = Deadline(None, self.cancel, self.what)
        child.seconds = self.seconds
        child.end = None if self.end is None else time.monotonic() + fraction * self.remaining()
        return child


_CURRENT: ContextVar[Deadline | None] = ContextVar("planner_deadline", default=None)


def check() -> None:
    """Raise if the running fit's budget is spent or its request cancelled."""
    deadline = _CURRENT.get()
    if deadline is not None:
        deadline.check()


@contextmanager
def running_under(deadline: Deadline) -> Iterator[Deadline]:
    """Make ``deadline`` the one ``check()`` sees in this context."""
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)
