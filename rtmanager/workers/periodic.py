"""A thread that runs one job every interval until drained."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

log = logging.getLogger(__name__)


class PeriodicWorker:
    """Runs `job` every `interval` (first run after one interval) on its own thread.

    A failing run is logged and does not stop the worker. `begin_drain()`
    starts no new run (a run in progress goes on); `stop(timeout)` waits for
    that run.
    """

    def __init__(self, name: str, job: Callable[[], object], interval: timedelta) -> None:
        self.name = name
        self._job = job
        self._interval = interval.total_seconds()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Start no new run; returns at once."""
        self._stop.set()

    def stop(self, timeout: float) -> bool:
        """Stop after the current run; return whether the thread ended within `timeout`."""
        self.begin_drain()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._job()
            except Exception:
                log.exception("periodic job failed", extra={"worker": self.name})
