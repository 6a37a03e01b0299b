"""How many unary RPCs run at once: the overload bound, and what drain waits for.

Every lifecycle and read RPC runs inside `CallLimiter.admit()`. When
`limit` calls already run, the next one is refused at once with
`Overloaded` (RESOURCE_EXHAUSTED, reason `too_many_requests`, see
`rtmanager.api.errors.overloaded_status`) instead of queueing for a pooled
connection until it times out as UNAVAILABLE. WatchRuntimes streams are not
counted (RTMANAGER_WATCH_MAX_SUBSCRIBERS bounds them), nor are health checks
and reflection.

Graceful shutdown uses the same count: `wait_idle` returns once every
admitted call has returned, which grpc's own `stop(grace)` does not tell
(its event is set when calls are cancelled, while their handlers may still
run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Overloaded(Exception):
    """A call refused because `limit` calls already run."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the server is running its limit of {limit} concurrent calls "
            "(RTMANAGER_GRPC_MAX_CONCURRENT_RPCS); retry with backoff"
        )
        self.limit = limit
        self.message = str(self)


class CallLimiter:
    """Counts running calls; refuses those beyond `limit`. Thread-safe."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"call limit must be at least 1, got {limit}")
        self.limit = limit
        self._running = 0
        self._changed = threading.Condition()

    @property
    def running(self) -> int:
        """Calls admitted and not yet returned."""
        with self._changed:
            return self._running

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Run the block as one admitted call; raise `Overloaded` at once when full."""
        with self._changed:
            if self._running >= self.limit:
                raise Overloaded(self.limit)
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no admitted call runs; return False when `timeout` passed first."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._changed:
            while self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True
