"""grpc.health.v1 status driven by the reachability of the service's dependencies.

SERVING only when every check passes (PostgreSQL reachable with a current
schema, Redis, Docker) and the application has declared itself ready (after
the start-up reconcile); NOT_SERVING while draining, for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

HealthCheck = Callable[[], None]


class HealthMonitor:
    """Runs the dependency checks periodically and publishes the result."""

    def __init__(
        self,
        checks: Mapping[str, HealthCheck],
        *,
        services: Sequence[str],
        interval: timedelta = timedelta(seconds=2),
    ) -> None:
        self.servicer = health.HealthServicer()
        self._checks = dict(checks)
        self._services = ["", *services]
        self._interval = interval.total_seconds()
        self._ready = False
        self._draining = False
        self._problems: dict[str, str] = {"startup": "not ready yet"}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish(serving=False)

    @property
    def problems(self) -> dict[str, str]:
        """What failed in the latest check, by dependency name."""
        with self._lock:
            return dict(self._problems)

    def check_now(self) -> bool:
        """Run every check once, publish the status and return whether serving."""
        problems: dict[str, str] = {}
        for name, check in self._checks.items():
            try:
                check()
            except Exception as error:  # any failure means not healthy
                problems[name] = str(error) or type(error).__name__
        with self._lock:
            if problems != self._problems:
                for name, problem in problems.items():
                    log.warning("dependency unhealthy", extra={"check": name, "problem": problem})
                for name in self._problems.keys() - problems.keys() - {"startup"}:
                    log.info("dependency healthy again", extra={"check": name})
            if not self._ready:
                problems.setdefault("startup", "not ready yet")
            self._problems = problems
            serving = not problems and not self._draining
        self._publish(serving)
        return serving

    def set_ready(self) -> None:
        """Declare start-up complete; SERVING follows once the checks pass."""
        with self._lock:
            self._ready = True
        self.check_now()

    def start(self) -> None:
        """Start the periodic checker thread."""
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Report NOT_SERVING from now on (graceful shutdown)."""
        with self._lock:
            self._draining = True
        self._stop.set()
        self.servicer.enter_graceful_shutdown()

    def stop(self, timeout: float) -> bool:
        """Stop the checker thread; return whether it ended within `timeout` seconds.

        A check in progress is waited for: it borrows pooled connections.
        """
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            self._stop.wait(self._interval)

    def _publish(self, serving: bool) -> None:
        if self._draining:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in self._services:
            self.servicer.set(service, status)


class LoopHealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """`grpc.health.v1.Health` of a `HealthServicer`, served by grpc.aio.

    `Check` runs in the server's thread pool as before. `Watch` is a task on
    the server's event loop fed by the servicer's callbacks: grpc.aio runs
    a synchronous stream in pool threads and never calls the close
    callbacks its `Watch` registers, so a finished watch would stay
    registered and keep a thread until the next status update.
    """

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer

    def Check(  # noqa: N802 - gRPC method names
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return self._servicer.Check(request, context)

    async def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[health_pb2.HealthCheckResponse | None] = asyncio.Queue()
        closers: list[Callable[[], None]] = []

        def send(response: health_pb2.HealthCheckResponse | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(updates.put_nowait, response)

        self._servicer.Watch(request, _Closers(closers), send)  # type: ignore[arg-type]
        try:
            while (response := await updates.get()) is not None:
                yield response
        finally:
            for close in closers:
                close()


class _Closers:
    """The one part of a servicer context `HealthServicer.Watch` uses: `add_callback`."""

    def __init__(self, closers: list[Callable[[], None]]) -> None:
        self.add_callback = closers.append
