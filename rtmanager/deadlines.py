"""The caller's deadline, visible to every layer of one request's thread.

The gRPC layer opens a scope with the time the caller allows; lifecycle code
bounds its database reads and its wait for a starting engine with
`bounded(ceiling)` and checks `require_time_left` before each long Docker
step, so an operation whose caller gave up stops early. A graceful stop is
never cut short by a deadline: game data matters more than the caller's
patience.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

from rtmanager.domain.errors import ServiceUnavailable

_deadline: ContextVar[float | None] = ContextVar("rtmanager_deadline", default=None)
_FLOOR = timedelta(milliseconds=10)
# gRPC reports "no deadline" as an enormous remaining time.
_NO_DEADLINE_SECONDS = 365 * 86400.0


@contextmanager
def deadline_scope(seconds: float | None) -> Iterator[None]:
    """Within the block, waits are bounded by `seconds` from now (None: unbounded)."""
    unbounded = seconds is None or seconds >= _NO_DEADLINE_SECONDS
    token = _deadline.set(None if unbounded else time.monotonic() + seconds)  # type: ignore[operator]
    try:
        yield
    finally:
        _deadline.reset(token)


def bounded(ceiling: timedelta) -> timedelta:
    """The smaller of `ceiling` and the time left before the current deadline."""
    deadline = _deadline.get()
    if deadline is None:
        return ceiling
    left = timedelta(seconds=deadline - time.monotonic())
    return max(min(ceiling, left), _FLOOR)


def cut_by_deadline(ceiling: timedelta) -> bool:
    """Whether the current deadline leaves less than `ceiling`."""
    return bounded(ceiling) < ceiling


def require_time_left(step: str) -> None:
    """Raise `ServiceUnavailable` when the caller's deadline has already passed.

    Checked before each long step, so an operation whose caller gave up
    stops early (releasing its lease) instead of running on unseen.
    """
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise ServiceUnavailable(f"the caller's deadline passed before {step}")
