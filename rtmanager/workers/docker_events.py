"""The Docker events listener: notices an engine dying within a second.

Follows Docker's event stream for this deployment's containers. A `die` (or
an `oom` that left the container stopped) of a running record's current
container marks the record stopped, with op_kind `stop`, op_source
`auto_reconcile` and a source_ref naming the event and exit code. When
Docker goes away the listener reconnects with backoff, resuming from the
last event it saw, and runs a reconcile pass after every reconnect because
events may have been missed meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from rtmanager.domain.errors import RuntimeManagerError
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.ports import ContainerEvent, DockerEngine, EventStream

log = logging.getLogger(__name__)


class DockerEventsListener:
    """Owns one thread that follows Docker's events."""

    def __init__(
        self,
        docker: DockerEngine,
        reconciler: Reconciler,
        *,
        backoff_base: timedelta = timedelta(milliseconds=500),
        backoff_max: timedelta = timedelta(seconds=10),
        on_reconnect: Callable[[], object] | None = None,
    ) -> None:
        self._docker = docker
        self._reconciler = reconciler
        self._backoff_base = backoff_base.total_seconds()
        self._backoff_max = backoff_max.total_seconds()
        self._on_reconnect = on_reconnect or reconciler.run_pass
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        """Start following events."""
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop following; return whether the thread ended within `timeout`."""
        self._stop.set()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        since: datetime | None = None
        delay = self._backoff_base
        first = True
        while not self._stop.is_set():
            try:
                stream = self._docker.follow_events(since=since)
                with self._lock:
                    if self._stop.is_set():
                        stream.close()
                        return
                    self._stream = stream
                self.connected.set()
                if not first:
                    log.info("docker event stream reconnected; reconciling")
                    self._on_reconnect()
                first, delay = False, self._backoff_base
                for event in stream:
                    since = event.time
                    self._handle(event)
            except RuntimeManagerError as error:
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning(
                    "docker event stream lost; reconnecting",
                    extra={"problem": error.message, "retry_in_seconds": delay},
                )
            except Exception:
                self.connected.clear()
                log.exception("docker events listener failed; reconnecting")
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self._backoff_max)

    def _handle(self, event: ContainerEvent) -> None:
        if event.action not in ("die", "oom") or not event.game_id:
            return
        if event.action == "oom":
            # An OOM kill of one process may leave the engine running.
            info = self._docker.inspect_container(event.container_id)
            if info is not None and info.running:
                return
        try:
            self._reconciler.observe_exit(
                event.game_id, event.container_id, event=event.action, exit_code=event.exit_code
            )
        except RuntimeManagerError as error:
            # The next reconcile pass repairs what this could not record.
            log.warning(
                "could not record an engine exit",
                extra={"game_id": event.game_id, "problem": error.message},
            )
