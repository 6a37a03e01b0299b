"""The one place that starts and stops every background worker.

Start order: the Docker events listener first (so no exit is missed), then a
reconcile pass that must succeed before the service reports SERVING, then
the stream consumer and the periodic reconciler and TTL cleanup. Stop order
is the reverse; the stream consumer finishes its in-flight jobs (unfinished
ones stay pending in Redis for another consumer), and no lease is left
behind because every operation releases its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.workers.docker_events import DockerEventsListener
from rtmanager.workers.periodic import PeriodicWorker

log = logging.getLogger(__name__)

_STARTUP_RETRY = timedelta(seconds=2)


class StoppableWorker(Protocol):
    """A worker with its own threads."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> bool: ...


class Workers:
    """Every sidecar thread of one process."""

    def __init__(
        self,
        *,
        reconciler: Reconciler,
        events: DockerEventsListener,
        periodic: list[PeriodicWorker],
        stream_consumer: StoppableWorker | None,
    ) -> None:
        self._reconciler = reconciler
        self._events = events
        self._periodic = periodic
        self._stream_consumer = stream_consumer
        self._started: list[StoppableWorker] = []

    def start(self, stop: threading.Event, on_ready: Callable[[], None]) -> bool:
        """Start everything; call `on_ready` after the start-up reconcile pass.

        Returns False when `stop` was set before start-up completed.
        """
        self._events.start()
        self._started.append(self._events)
        while not stop.is_set():
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
                stop.wait(_STARTUP_RETRY.total_seconds())
        if stop.is_set():
            return False
        on_ready()
        later: list[StoppableWorker] = list(self._periodic)
        if self._stream_consumer is not None:
            later.insert(0, self._stream_consumer)
        for worker in later:
            worker.start()
            self._started.append(worker)
        return True

    def stop(self, timeout: float) -> bool:
        """Stop every started worker, newest first; return whether all ended in time."""
        clean = True
        for worker in reversed(self._started):
            clean = worker.stop(timeout) and clean
        self._started.clear()
        if not clean:
            log.warning("some workers did not stop within the grace period")
        return clean
