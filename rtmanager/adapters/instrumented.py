"""An `EngineBackend` that measures every call of the backend it wraps."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from rtmanager.ports import (
    BackendCapabilities,
    ContainerInfo,
    ContainerSpec,
    EngineBackend,
    EventStream,
    PullPolicy,
)
from rtmanager.telemetry import Telemetry

T = TypeVar("T")


class InstrumentedBackend:
    """Observes each backend call's latency (`rtmanager_docker_call_seconds`, by call).

    The `call` label keeps the names dashboards know (`create_container`,
    `start_container`, ...), whichever backend is wrapped.
    """

    def __init__(self, inner: EngineBackend, telemetry: Telemetry) -> None:
        self._inner = inner
        self._telemetry = telemetry

    def _timed(self, call: str, action: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return action()
        finally:
            self._telemetry.docker_call(call, time.monotonic() - started)

    @property
    def capabilities(self) -> BackendCapabilities:
        """See `EngineBackend.capabilities` (not timed: no call)."""
        return self._inner.capabilities

    def ping(self) -> None:
        """See `EngineBackend.ping`."""
        self._timed("ping", self._inner.ping)

    def ensure_image(self, image_ref: str, policy: PullPolicy) -> None:
        """See `EngineBackend.ensure_image`."""
        self._timed("ensure_image", lambda: self._inner.ensure_image(image_ref, policy))

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """See `EngineBackend.ensure_network`."""
        self._timed("ensure_network", lambda: self._inner.ensure_network(name, labels))

    def create(self, spec: ContainerSpec) -> str:
        """See `EngineBackend.create`."""
        return self._timed("create_container", lambda: self._inner.create(spec))

    def start(self, workload_id: str) -> str:
        """See `EngineBackend.start`."""
        return self._timed("start_container", lambda: self._inner.start(workload_id))

    def stop(self, container_id: str, timeout: timedelta) -> None:
        """See `EngineBackend.stop`."""
        self._timed("stop_container", lambda: self._inner.stop(container_id, timeout))

    def remove(self, container_id: str, *, force: bool = False) -> None:
        """See `EngineBackend.remove`."""
        self._timed("remove_container", lambda: self._inner.remove(container_id, force=force))

    def inspect(self, id_or_name: str) -> ContainerInfo | None:
        """See `EngineBackend.inspect`."""
        return self._timed("inspect_container", lambda: self._inner.inspect(id_or_name))

    def owns(self, container_id: str) -> bool | None:
        """See `EngineBackend.owns` (timed as `owns_container`, also when remembered)."""
        return self._timed("owns_container", lambda: self._inner.owns(container_id))

    def list_owned(self) -> list[ContainerInfo]:
        """See `EngineBackend.list_owned`."""
        return self._timed("list_owned_containers", self._inner.list_owned)

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """See `EngineBackend.logs_tail`."""
        return self._timed(
            "container_logs_tail", lambda: self._inner.logs_tail(container_id, lines)
        )

    def follow_events(self, since: datetime | None = None) -> EventStream:
        """See `EngineBackend.follow_events` (only opening the stream is timed)."""
        return self._timed("follow_events", lambda: self._inner.follow_events(since))


if TYPE_CHECKING:

    def _implements_port(backend: InstrumentedBackend) -> EngineBackend:
        # mypy proves here that the wrapper satisfies the port's protocol.
        return backend
