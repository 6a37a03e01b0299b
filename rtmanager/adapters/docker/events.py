"""The single-host backend's event stream: owned containers' events, from Docker's.

`DockerEngineAdapter.follow_events` opens Docker's stream, narrowed on the
daemon by label; here each event is narrowed further, to the actions that
say something about an engine's life and to this deployment's containers,
and a stream the daemon ended is told apart from one closed on purpose.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import docker.errors
from docker.types import CancellableStream

from rtmanager.adapters.docker.calls import TRANSPORT_ERRORS, explain, int_or_none
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.ports import ContainerEvent

__all__ = ["INTERESTING_EVENT_ACTIONS", "DockerEventStream"]

# Container event actions passed on to consumers; Docker also emits exec_*,
# attach, resize, ... which say nothing about the engine's life.
# `health_status: <status>` events are passed on too (see `_to_event`).
INTERESTING_EVENT_ACTIONS = frozenset(
    {"create", "start", "restart", "die", "oom", "kill", "stop", "destroy", "pause", "unpause"}
)

_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    *TRANSPORT_ERRORS,
    docker.errors.DockerException,
)


def _event_time(raw: dict[str, Any]) -> datetime:
    """Return an event's time from `timeNano` (or `time`), as aware UTC."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    nanos = raw.get("timeNano")
    if isinstance(nanos, int):
        return epoch + timedelta(microseconds=nanos // 1000)
    seconds = raw.get("time")
    if isinstance(seconds, int | float):
        return epoch + timedelta(seconds=seconds)
    return datetime.now(UTC)


class DockerEventStream:
    """Owned containers' events from Docker's event stream (an `EventStream`).

    Iteration ends quietly after `close()`, which may be called from any
    thread; the daemon closing the stream or going away raises
    `ServiceUnavailable`, so the consumer knows to reconnect and reconcile.
    """

    def __init__(self, stream: CancellableStream[dict[str, Any]], cluster: str) -> None:
        """Wrap a decoded docker-py event stream for deployment `cluster`."""
        self._stream = stream
        self._cluster = cluster
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[ContainerEvent]:
        """Yield owned containers' events until closed or disconnected."""
        try:
            # CancellableStream turns socket errors into StopIteration, so a
            # dead daemon and a close() look alike here: `_closed` tells them apart.
            for raw in self._stream:
                if self._closed.is_set():
                    return
                event = self._to_event(raw)
                if event is not None:
                    yield event
        except _STREAM_ERRORS as exc:
            if self._closed.is_set():
                return
            raise ServiceUnavailable(f"docker: event stream broken: {explain(exc)}") from exc
        if not self._closed.is_set():
            raise ServiceUnavailable("docker: event stream ended: the daemon closed it")

    def close(self) -> None:
        """End iteration (from any thread); closing twice is harmless."""
        self._closed.set()
        # The stream may already be finished or its socket gone; either way
        # there is nothing left to cancel.
        with contextlib.suppress(Exception):
            self._stream.close()

    def _to_event(self, raw: object) -> ContainerEvent | None:
        if not isinstance(raw, dict) or raw.get("Type", "container") != "container":
            return None
        action = str(raw.get("Action") or raw.get("status") or "")
        if action not in INTERESTING_EVENT_ACTIONS and not action.startswith("health_status"):
            return None
        actor = raw.get("Actor") or {}
        attributes: dict[str, str] = dict(actor.get("Attributes") or {})
        # Event attributes carry the container's labels (plus name, image, ...).
        if not galaxy_labels.is_owned(attributes, self._cluster):
            return None
        container_id = str(actor.get("ID") or raw.get("id") or "")
        if not container_id:
            return None
        return ContainerEvent(
            action=action,
            container_id=container_id,
            game_id=attributes.get(galaxy_labels.GAME_ID, ""),
            time=_event_time(raw),
            exit_code=int_or_none(attributes.get("exitCode")) if action == "die" else None,
        )
