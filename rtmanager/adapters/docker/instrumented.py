"""A `DockerEngine` that measures every call of the one it wraps."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

from rtmanager.ports import ContainerInfo, ContainerSpec, DockerEngine, EventStream, PullPolicy
from rtmanager.telemetry import Telemetry

T = TypeVar("T")


class InstrumentedDocker:
    """Observes each Docker call's latency (`rtmanager_docker_call_seconds`, by call)."""

    def __init__(self, inner: DockerEngine, telemetry: Telemetry) -> None:
        self._inner = inner
        self._telemetry = telemetry

    def _timed(self, call: str, action: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return action()
        finally:
            self._telemetry.docker_call(call, time.monotonic() - started)

    def ping(self) -> None:
        """See `DockerEngine.ping`."""
        self._timed("ping", self._inner.ping)

    def ensure_image(self, image_ref: str, policy: PullPolicy) -> None:
        """See `DockerEngine.ensure_image`."""
        self._timed("ensure_image", lambda: self._inner.ensure_image(image_ref, policy))

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """See `DockerEngine.ensure_network`."""
        self._timed("ensure_network", lambda: self._inner.ensure_network(name, labels))

    def create_container(self, spec: ContainerSpec) -> str:
        """See `DockerEngine.create_container`."""
        return self._timed("create_container", lambda: self._inner.create_container(spec))

    def start_container(self, container_id: str) -> None:
        """See `DockerEngine.start_container`."""
        self._timed("start_container", lambda: self._inner.start_container(container_id))

    def stop_container(self, container_id: str, timeout: timedelta) -> None:
        """See `DockerEngine.stop_container`."""
        self._timed("stop_container", lambda: self._inner.stop_container(container_id, timeout))

    def remove_container(self, container_id: str, *, force: bool = False) -> None:
        """See `DockerEngine.remove_container`."""
        self._timed(
            "remove_container", lambda: self._inner.remove_container(container_id, force=force)
        )

    def inspect_container(self, id_or_name: str) -> ContainerInfo | None:
        """See `DockerEngine.inspect_container`."""
        return self._timed("inspect_container", lambda: self._inner.inspect_container(id_or_name))

    def owns_container(self, container_id: str) -> bool | None:
        """See `DockerEngine.owns_container` (timed as `owns_container`, also when remembered)."""
        return self._timed("owns_container", lambda: self._inner.owns_container(container_id))

    def list_owned_containers(self) -> list[ContainerInfo]:
        """See `DockerEngine.list_owned_containers`."""
        return self._timed("list_owned_containers", self._inner.list_owned_containers)

    def container_logs_tail(self, container_id: str, lines: int = 20) -> str:
        """See `DockerEngine.container_logs_tail`."""
        return self._timed(
            "container_logs_tail", lambda: self._inner.container_logs_tail(container_id, lines)
        )

    def follow_events(self, since: datetime | None = None) -> EventStream:
        """See `DockerEngine.follow_events` (only opening the stream is timed)."""
        return self._timed("follow_events", lambda: self._inner.follow_events(since))
