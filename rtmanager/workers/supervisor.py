"""The one place that starts and stops every background worker.

Start order: the Docker events listener first (so no exit is missed), then a
reconcile pass that must succeed before the service reports SERVING, then
the stream consumer and the periodic reconciler and TTL cleanup.

Stopping has two phases, so that the whole process drains under one shared
deadline (SPEC §5 Shutdown):

1. `begin_drain()` returns at once: the start-up pass is not retried, and
   the stream consumer and the periodic workers take no new work (the
   consumer stops reading; jobs it has not started stay pending in Redis
   for another consumer, never acknowledged unanswered).
2. `stop(timeout)` waits, until one deadline `timeout` seconds away, for the
   work they already run: the consumer's in-flight jobs and the periodic
   runs, then stops the Docker events listener (it may still be recording
   an exit the drained work caused). No lease is left behind by a worker
   that ended: every operation releases its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Protocol

from rtmanager.lifecycle.reconcile import ReconcileReport

log = logging.getLogger(__name__)

_STARTUP_RETRY = timedelta(seconds=2)


class StoppableWorker(Protocol):
    """A worker with its own threads (the Docker events listener)."""

    def start(self) -> None:
        """Start the worker's threads; returns at once."""
        ...

    def stop(self, timeout: float) -> bool:
        """Stop; return whether every thread ended within `timeout` seconds."""
        ...


class DrainableWorker(StoppableWorker, Protocol):
    """A worker that takes work in: it can stop taking more before it stops.

    `begin_drain()` returns at once and is idempotent; after it no new work
    is started. `stop(timeout)` implies `begin_drain()` and waits for the
    work in flight until `timeout`.
    """

    def begin_drain(self) -> None:
        """Take no new work from now on; return at once."""
        ...


class StartupReconciler(Protocol):
    """The reconcile pass that must succeed before the service is ready."""

    def run_pass(self) -> ReconcileReport:
        """Run one reconcile pass; raises when a dependency fails."""
        ...


class Workers:
    """Every sidecar thread of one process."""

    def __init__(
        self,
        *,
        reconciler: StartupReconciler,
        events: StoppableWorker,
        periodic: Sequence[DrainableWorker],
        stream_consumer: DrainableWorker | None,
        startup_retry: timedelta = _STARTUP_RETRY,
    ) -> None:
        self._reconciler = reconciler
        self._events = events
        self._periodic = list(periodic)
        self._stream_consumer = stream_consumer
        self._startup_retry = startup_retry.total_seconds()
        self._lock = threading.Lock()
        self._draining = threading.Event()
        self._events_started = False
        self._drainable: list[DrainableWorker] = []

    def start(self, on_ready: Callable[[], None]) -> bool:
        """Start everything; call `on_ready` after the start-up reconcile pass.

        Blocks until that pass succeeded (it is retried while a dependency
        fails). Returns False when draining began first; then nothing more
        is started.
        """
        with self._lock:
            if self._draining.is_set():
                return False
            self._events.start()
            self._events_started = True
        while not self._draining.is_set():
            try:
                report = self._reconciler.run_pass()
                log.info(
                    "start-up reconcile pass done",
                    extra={"actions": len(report.actions), "skipped": report.skipped},
                )
                break
            except Exception as error:
                log.warning(
                    "start-up reconcile pass failed; retrying", extra={"problem": str(error)}
                )
                self._draining.wait(self._startup_retry)
        if self._draining.is_set():
            return False
        on_ready()
        with self._lock:
            if self._draining.is_set():
                return False
            later: list[DrainableWorker] = list(self._periodic)
            if self._stream_consumer is not None:
                later.insert(0, self._stream_consumer)
            for worker in later:
                worker.start()
                self._drainable.append(worker)
        return True

    def begin_drain(self) -> None:
        """Take no new work: no start-up retry, no new jobs or periodic runs. Returns at once."""
        with self._lock:
            self._draining.set()
            drainable = list(self._drainable)
        for worker in drainable:
            worker.begin_drain()

    def stop(self, timeout: float) -> bool:
        """Drain, then wait for in-flight work until one deadline; True when all ended in time.

        The draining workers share the deadline (each waits only for what is
        left of it); the events listener is stopped last.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        self.begin_drain()
        with self._lock:
            drainable = list(reversed(self._drainable))
            self._drainable.clear()
            events_started, self._events_started = self._events_started, False
        clean = True
        for worker in drainable:
            clean = worker.stop(_left(deadline)) and clean
        if events_started:
            clean = self._events.stop(_left(deadline)) and clean
        if not clean:
            log.warning("some workers did not stop within the grace period")
        return clean


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
