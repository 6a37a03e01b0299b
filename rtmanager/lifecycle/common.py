"""What the lifecycle services share: settings, stop reasons, small helpers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from rtmanager.domain.errors import Conflict, InternalError, NotFound
from rtmanager.domain.ids import engine_endpoint
from rtmanager.domain.images import ImageRef, parse_image_ref, require_allowed
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.ports import ContainerInfo, DockerEngine, PullPolicy, UnitOfWork


class StopReason(StrEnum):
    """Why a runtime is being stopped."""

    ADMIN_REQUEST = "admin_request"
    LOBBY_REQUEST = "lobby_request"
    GAME_FINISHED = "game_finished"
    ENGINE_EXITED = "engine_exited"


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


def allowed_image(image_ref: str, settings: LifecycleSettings) -> ImageRef:
    """Parse an image reference and check it against the allowlist."""
    image = parse_image_ref(image_ref)
    require_allowed(image, settings.image_allowlist)
    return image


def new_correlation_id() -> str:
    """A fresh opaque id linking an outer operation to its inner steps."""
    return f"rtm-{secrets.token_urlsafe(12)}"


def load_record(uow: UnitOfWork, game_id: str) -> RuntimeRecord | None:
    """The game's record, or None when there is none."""
    try:
        return uow.records.get(game_id)
    except NotFound:
        return None


def owned_container(docker: DockerEngine, container_id: str) -> ContainerInfo | None:
    """What Docker says about one of our containers; None when it is gone.

    Raises `Conflict` when the id names a container this deployment does not
    own: such containers are never touched.
    """
    if not container_id:
        return None
    info = docker.inspect_container(container_id)
    if info is not None and not info.owned:
        raise Conflict(f"container {container_id[:12]} is not owned by this rtmanager deployment")
    return info
