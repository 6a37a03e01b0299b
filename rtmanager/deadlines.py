"""The caller's deadline, visible to every layer of one request's thread.

The gRPC layer opens a scope with the time the caller allows; lifecycle code
and adapters bound their waits with `bounded(ceiling)`, so a request never
waits on Docker, PostgreSQL or Redis longer than its caller will.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

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
