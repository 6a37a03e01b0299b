"""The engine events listener: notices an engine dying within a second.

Follows the engine backend's event stream (`EngineBackend.follow_events`)
for this deployment's containers. A `die` (or
an `oom` that left the container stopped) of a running record's current
container marks the record stopped, with op_kind `stop`, op_source
`auto_reconcile` and a source_ref naming the event and exit code. When
the backend goes away the listener reconnects with backoff, resuming from the
last event it saw, and runs a reconcile pass after every reconnect because
events may have been missed meanwhile.

An exit is handed to `Reconciler.observe_exit` on a small pool of its own
threads: observing one exit may wait for the operation that caused it
(see there), and the stream must keep flowing meanwhile so that other
games' exits are still recorded within a second. An exit already being
observed is not observed twice (a resumed stream may repeat events).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from datetime import datetime, timedelta

from rtmanager.backoff import Backoff
from rtmanager.domain.errors import RuntimeManagerError
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.ports import ContainerEvent, EngineBackend, EventStream

log = logging.getLogger(__name__)

# Exits observed at once; more wait in the pool's queue.
_EXIT_THREADS = 4


class EngineEventsListener:
    """Owns one thread that follows the engine backend's events."""

    def __init__(
        self,
        engine: EngineBackend,
        reconciler: Reconciler,
        *,
        backoff_base: timedelta = timedelta(milliseconds=500),
        backoff_max: timedelta = timedelta(seconds=10),
        on_reconnect: Callable[[], object] | None = None,
    ) -> None:
        self._engine = engine
        self._reconciler = reconciler
        self._reconnect = Backoff(backoff_base, backoff_max)
        self._on_reconnect = on_reconnect or reconciler.run_pass
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None
        self._exits = ThreadPoolExecutor(
            max_workers=_EXIT_THREADS, thread_name_prefix="engine-exit"
        )
        self._observing: dict[tuple[str, str], Future[None]] = {}
        self.connected = threading.Event()

    def start(self) -> None:
        """Start following events."""
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop following; return whether every thread ended within `timeout`.

        Exits still waiting for their game's operation are given up (the
        next reconcile pass covers them); one being recorded finishes.
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
            pending = list(self._observing.values())
        self._exits.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        _, not_done = wait_for_futures(pending, timeout=max(deadline - time.monotonic(), 0.0))
        return not not_done

    def _run(self) -> None:
        since: datetime | None = None
        failures = 0
        first = True
        while not self._stop.is_set():
            try:
                stream = self._engine.follow_events(since=since)
                with self._lock:
                    if self._stop.is_set():
                        stream.close()
                        return
                    self._stream = stream
                self.connected.set()
                if not first:
                    log.info("docker event stream reconnected; reconciling")
                    self._on_reconnect()
                first, failures = False, 0
                for event in stream:
                    since = event.time
                    self._handle(event)
            except RuntimeManagerError as error:
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning(
                    "docker event stream lost; reconnecting",
                    extra={"problem": error.message, "failures": failures + 1},
                )
            except Exception:
                self.connected.clear()
                log.exception("docker events listener failed; reconnecting")
            failures += 1
            if self._stop.wait(self._reconnect.delay(failures)):
                return

    def _handle(self, event: ContainerEvent) -> None:
        if event.action not in ("die", "oom") or not event.game_id:
            return
        key = (event.game_id, event.container_id)
        with self._lock:
            if key in self._observing or self._stop.is_set():
                return
            future = self._exits.submit(self._observe, event)
            self._observing[key] = future
        future.add_done_callback(lambda _: self._forget(key))

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._observing.pop(key, None)

    def _observe(self, event: ContainerEvent) -> None:
        try:
            if event.action == "oom":
                # An OOM kill of one process may leave the engine running.
                info = self._engine.inspect(event.container_id)
                if info is not None and info.running:
                    return
            self._reconciler.observe_exit(
                event.game_id,
                event.container_id,
                event=event.action,
                exit_code=event.exit_code,
                stop=self._stop,
            )
        except RuntimeManagerError as error:
            # The next reconcile pass repairs what this could not record.
            log.warning(
                "could not record an engine exit",
                extra={"game_id": event.game_id, "problem": error.message},
            )
        except Exception:
            log.exception("observing an engine exit failed", extra={"game_id": event.game_id})
