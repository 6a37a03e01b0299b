"""The runtime record, its status vocabulary and the status machine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from rtmanager.domain.errors import Conflict
from rtmanager.domain.ids import is_valid_game_id
from rtmanager.domain.timeutil import require_utc


class RuntimeStatus(StrEnum):
    """Lifecycle state of a runtime record."""

    RUNNING = "running"
    STOPPED = "stopped"
    REMOVED = "removed"

    @property
    def is_terminal(self) -> bool:
        """Removed is terminal: no transition leaves it."""
        return self is RuntimeStatus.REMOVED


ALLOWED_TRANSITIONS: frozenset[tuple[RuntimeStatus, RuntimeStatus]] = frozenset(
    {
        (RuntimeStatus.RUNNING, RuntimeStatus.STOPPED),
        (RuntimeStatus.RUNNING, RuntimeStatus.REMOVED),
        (RuntimeStatus.STOPPED, RuntimeStatus.RUNNING),
        (RuntimeStatus.STOPPED, RuntimeStatus.REMOVED),
    }
)


class InvalidTransition(Conflict):
    """A status change the status machine forbids."""


def transition(from_status: RuntimeStatus, to_status: RuntimeStatus) -> None:
    """Raise `InvalidTransition` unless `from_status -> to_status` is allowed."""
    if (from_status, to_status) not in ALLOWED_TRANSITIONS:
        raise InvalidTransition(f"runtime status cannot change from {from_status} to {to_status}")


class InvalidRuntimeRecord(ValueError):
    """A runtime record breaks a record invariant."""


@dataclass(frozen=True)
class RuntimeRecord:
    """The durable record of one game's engine runtime.

    `node_id` and `node_hostname` name the cluster node the record's
    container was placed on, as the engine backend reported it when the
    container was started or adopted; they stay while the record is
    stopped or removed (a game's data may live on that node). Both are
    empty on the single-host backend. Empty strings stand for SQL NULL in
    `current_container_id`, `current_image_ref`, `node_id` and
    `node_hostname`.
    """

    game_id: str
    status: RuntimeStatus
    engine_endpoint: str
    state_path: str
    docker_network: str
    last_op_at: datetime
    created_at: datetime
    current_container_id: str = ""
    current_image_ref: str = ""
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    removed_at: datetime | None = None
    node_id: str = ""
    node_hostname: str = ""

    def validate(self) -> None:
        """Raise `InvalidRuntimeRecord` unless every record invariant holds."""
        bad = InvalidRuntimeRecord
        if not is_valid_game_id(self.game_id):
            raise bad(f"game id {self.game_id!r} is invalid")
        try:
            status = RuntimeStatus(self.status)
        except ValueError:
            raise bad(f"status {self.status!r} is unsupported") from None
        for name in ("engine_endpoint", "state_path", "docker_network"):
            if not getattr(self, name).strip():
                raise bad(f"{name.replace('_', ' ')} must not be empty")
        if self.node_hostname and not self.node_id:
            raise bad("node hostname must come with a node id")
        require_utc("last op at", self.last_op_at, bad)
        require_utc("created at", self.created_at, bad)
        for name in ("started_at", "stopped_at", "removed_at"):
            value = getattr(self, name)
            if value is not None:
                require_utc(name.replace("_", " "), value, bad)
        if self.last_op_at < self.created_at:
            raise bad("last op at must not be before created at")
        if status is RuntimeStatus.RUNNING:
            if not self.current_container_id.strip():
                raise bad("current container id must not be empty for running records")
            if not self.current_image_ref.strip():
                raise bad("current image ref must not be empty for running records")
            if self.started_at is None:
                raise bad("started at must be set for running records")
        elif status is RuntimeStatus.STOPPED:
            if not self.current_image_ref.strip():
                raise bad("current image ref must not be empty for stopped records")
            if self.stopped_at is None:
                raise bad("stopped at must be set for stopped records")
        elif self.removed_at is None:
            raise bad("removed at must be set for removed records")
        if self.started_at is not None and self.started_at < self.created_at:
            raise bad("started at must not be before created at")
        if (
            self.stopped_at is not None
            and self.started_at is not None
            and self.stopped_at < self.started_at
        ):
            raise bad("stopped at must not be before started at")
        if self.removed_at is not None and self.removed_at < self.created_at:
            raise bad("removed at must not be before created at")

    def with_status(
        self, to_status: RuntimeStatus, now: datetime, *, container_id: str | None = None
    ) -> RuntimeRecord:
        """Return the record after a status transition at `now`.

        Derives the timestamps the way the store's CAS update does: stopped
        stamps `stopped_at`, removed stamps `removed_at`, running stamps
        `started_at` and clears `stopped_at`; `last_op_at` is always `now`.
        `container_id`, when given, replaces the current container id.
        """
        to_status = RuntimeStatus(to_status)
        transition(RuntimeStatus(self.status), to_status)
        changes: dict[str, object] = {"status": to_status, "last_op_at": now}
        if to_status is RuntimeStatus.STOPPED:
            changes["stopped_at"] = now
        elif to_status is RuntimeStatus.REMOVED:
            changes["removed_at"] = now
        else:
            changes["started_at"] = now
            changes["stopped_at"] = None
        if container_id is not None:
            changes["current_container_id"] = container_id
        return replace(self, **changes)  # type: ignore[arg-type]
