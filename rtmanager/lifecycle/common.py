"""What the lifecycle services share: settings, dependencies, small helpers."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from rtmanager.domain.errors import Conflict, InternalError
from rtmanager.domain.ids import engine_endpoint
from rtmanager.domain.images import ImageRef, parse_image_ref, require_allowed
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.ports import ContainerInfo, EngineBackend, EngineUser, PullPolicy, UnitOfWork


@dataclass(frozen=True)
class LifecycleSettings:
    """The settings the lifecycle services act on (a slice of `Settings`)."""

    cluster: str
    engine_network: str
    engine_port: int
    state_root: Path
    engine_state_mount: Path
    image_allowlist: tuple[str, ...]
    image_pull_policy: PullPolicy
    engine_memory: int
    engine_cpus: float
    engine_pids: int
    # Who the engine runs as; its state directory is given to them.
    engine_user: EngineUser
    engine_log_max_size: int
    engine_log_max_files: int
    start_timeout: timedelta
    stop_timeout: timedelta
    start_settle: timedelta = timedelta(seconds=1)
    engine_read_only: bool = False
    remove_state_on_cleanup: bool = False
    container_labels: dict[str, str] = field(default_factory=dict)

    def endpoint(self, game_id: str) -> str:
        """The engine endpoint of a game."""
        return engine_endpoint(game_id, self.engine_port)

    def state_dir(self, game_id: str) -> Path:
        """The host state directory of a game, guaranteed to lie under the root."""
        root = self.state_root.resolve()
        path = (root / game_id).resolve()
        if path.parent != root:
            raise InternalError(f"state directory of {game_id!r} escapes {root}")
        return path


@dataclass(frozen=True)
class LifecycleDeps:
    """The collaborators every lifecycle service (and the reconciler) needs."""

    recorder: OperationRecorder
    lock: GameLock
    engine: EngineBackend
    settings: LifecycleSettings
    clock: Callable[[], datetime] = utc_now


class LifecycleService:
    """Base of the lifecycle services: unpacks their shared dependencies."""

    def __init__(self, deps: LifecycleDeps) -> None:
        self._recorder = deps.recorder
        self._lock = deps.lock
        self._engine = deps.engine
        self._settings = deps.settings
        self._clock = deps.clock


def allowed_image(image_ref: str, settings: LifecycleSettings) -> ImageRef:
    """Parse an image reference and check it against the allowlist."""
    image = parse_image_ref(image_ref)
    require_allowed(image, settings.image_allowlist)
    return image


def new_correlation_id() -> str:
    """A fresh opaque id linking an outer operation to its inner steps."""
    return f"rtm-{secrets.token_urlsafe(12)}"


def op_time(clock: Callable[[], datetime], record: RuntimeRecord | None) -> datetime:
    """The time to stamp on a record change: now, but never before its last operation.

    Replicas' clocks may disagree slightly; a record's timestamps must still
    move forward (the store's CHECK constraints insist).
    """
    now = clock()
    return max(now, record.last_op_at) if record is not None else now


def forget_container(
    uow: UnitOfWork, game_id: str, container_id: str, now: datetime
) -> RuntimeRecord | None:
    """Unbind a record from its container after that container was removed.

    Used when an operation removed the old container and then failed to
    start a new one: the record must not point at a container that no
    longer exists. A running record becomes stopped (its engine is gone); a
    record bound to another container, or none, is left as it is (None is
    returned then).
    """
    record = uow.records.get_for_update(game_id)
    if (
        record is None
        or record.status is RuntimeStatus.REMOVED
        or not container_id
        or record.current_container_id != container_id
    ):
        return None
    when = max(now, record.last_op_at)
    if record.status is RuntimeStatus.RUNNING:
        record = record.with_status(RuntimeStatus.STOPPED, when)
    updated = replace(record, current_container_id="", last_op_at=when)
    uow.records.upsert(updated)
    return updated


def owned_container(engine: EngineBackend, container_id: str) -> ContainerInfo | None:
    """What the backend says about one of our containers; None when it is gone.

    Raises `Conflict` when the id names a container this deployment does not
    own: such containers are never touched.
    """
    if not container_id:
        return None
    info = engine.inspect(container_id)
    if info is not None and not info.owned:
        raise Conflict(f"container {container_id[:12]} is not owned by this rtmanager deployment")
    return info


def ours_to_act_on(engine: EngineBackend, container_id: str) -> bool:
    """Whether a stop or removal of one of our containers has anything to act on.

    False without an id or when the backend has no such container; True when it
    is ours (it may be gone by the time of the call, which stop and remove
    take as done). Unlike `owned_container` this asks the backend nothing when
    the adapter already knows the container is ours (`owns_container`).
    Raises `Conflict` when the id names a container this deployment does
    not own: such containers are never touched.
    """
    if not container_id:
        return False
    owned = engine.owns(container_id)
    if owned is False:
        raise Conflict(f"container {container_id[:12]} is not owned by this rtmanager deployment")
    return owned is True
