"""The engine backend's port: engine containers (or swarm services) on one Docker
host or a swarm, their state and their events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from rtmanager.domain.errors import ServiceUnavailable


class PullPolicy(StrEnum):
    """When the engine image is pulled."""

    IF_MISSING = "if_missing"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class EngineUser:
    """The numeric user and group an engine runs as, which also own its state directory.

    Numeric on purpose: a name would be resolved in each image's own
    /etc/passwd, and the host, which gives the state directory to the same
    ids, could not know what it resolves to.
    """

    uid: int
    gid: int

    def __str__(self) -> str:
        """Docker's `User` form, `uid:gid`."""
        return f"{self.uid}:{self.gid}"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one game's engine workload.

    Besides what the fields say, every engine is hardened the same way: all
    capabilities dropped, no new privileges, not privileged, no swap beyond
    `memory_bytes`, Docker's init, restart policy `no`. `state_host_path`
    is the game's state directory on a backend with `host_state_dirs`; a
    backend keeping state in storage of its own names that by the game.
    """

    name: str
    image_ref: str
    network: str
    network_alias: str
    labels: dict[str, str]
    env: dict[str, str]
    state_host_path: str
    state_mount_path: str
    memory_bytes: int
    nano_cpus: int
    pids_limit: int
    user: EngineUser
    # json-file log rotation: at most this many files of at most this many bytes.
    log_max_bytes: int
    log_max_files: int
    read_only_rootfs: bool = False


@dataclass(frozen=True)
class ContainerInfo:
    """What the backend says about one engine container.

    `id` is the container's id: on the single-host backend the container's
    own, on a cluster backend the container of the game's workload (the
    running task's). `owned` is True only when the container carries the
    owner label and belongs to this deployment's cluster (a missing
    cluster label counts as `default`). `image_ref` is the reference the
    engine was started from, `image_id` the id of the image it runs
    (`sha256:...`). `exit_code` is None until the container has exited;
    `oom_killed` says the kernel killed it for memory; `health` is None
    when the container has no health check; `restart_count` counts restarts
    by the container runtime itself. `node_id` and `node_hostname` name the
    cluster node the container is placed on; both are empty on a backend
    with one host.
    """

    id: str
    name: str
    state: str
    running: bool
    owned: bool
    labels: dict[str, str] = field(default_factory=dict)
    image_ref: str = ""
    game_id: str = ""
    exit_code: int | None = None
    health: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    oom_killed: bool = False
    restart_count: int = 0
    image_id: str = ""
    node_id: str = ""
    node_hostname: str = ""


@dataclass(frozen=True)
class ContainerEvent:
    """One event of an owned engine container, as the backend delivers it."""

    action: str
    container_id: str
    game_id: str
    time: datetime
    exit_code: int | None = None


class EventStream(Protocol):
    """A live stream of container events; `close()` ends iteration from any thread."""

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None: ...


class BackendMismatch(ServiceUnavailable):
    """The backend's endpoint answers but is not what the backend needs.

    E.g. `RTMANAGER_BACKEND=swarm` pointed at a Docker engine that is not a
    swarm manager. Raised by `EngineBackend.ping`; the service refuses to
    start on it, where a daemon that does not answer is only waited for.
    """


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend declares about itself where backends truly differ.

    The lifecycles read these instead of asking which backend they run on.

    `host_state_dirs`: True when a game's state is the host directory
    `ContainerSpec.state_host_path`, bind-mounted into the engine, which the
    service itself creates and gives to the engine's user before `create`
    (and removes on cleanup when told to): the single-host backend. False
    when the backend keeps each game's state in storage it manages itself
    (a named volume per game on a cluster, SPEC §10), which the service
    neither creates nor removes.
    """

    host_state_dirs: bool


class EngineBackend(Protocol):
    """Where game engines run: one engine workload per game, in workload terms.

    A *workload* is what the backend runs for one game, named
    `ContainerSpec.name` (`galaxy-game-{game_id}`): on the single-host
    backend (`adapters/docker/`) a container, on a cluster backend a
    replicated service of one replica whose running task's container is the
    engine. Either way the engine is one container, and the runtime record
    keeps that container's id (`current_container_id`).

    Ids: `create` returns the workload's id; `start` returns the id of the
    running container. Every other method taking an id accepts either, or
    the id of any container `inspect` or `list_owned` reported, and acts on
    the workload that id belongs to. On the single-host backend all of them
    are the one container id.

    Ownership: a workload is *ours* only when labelled
    `com.galaxy.owner=rtmanager` and of this deployment's
    `RTMANAGER_CLUSTER` (a missing cluster label counts as `default`).
    The backend reports others (`inspect` with `owned=False`) but never
    lists, follows, stops or removes them on its own; the lifecycles refuse
    to act on them.

    Every method raises `ServiceUnavailable` when the backend's daemon is
    unreachable or times out.
    """

    @property
    def capabilities(self) -> BackendCapabilities:
        """What this backend declares about itself (fixed for its lifetime)."""
        ...

    def ping(self) -> None:
        """Raise `ServiceUnavailable` unless the backend's daemon answers.

        Called once at start-up (where `BackendMismatch` refuses the
        endpoint) and by every health check, every 2 s: it is cheap and
        should return soon. A daemon known to keep answering a bare ping
        while the lifecycles' calls hang is probed with one of those calls
        too, under a short timeout of its own (the single-host backend lists
        the engine network: `DockerEngineAdapter.ping`).
        """
        ...

    def ensure_image(self, image_ref: str, policy: PullPolicy) -> None:
        """Make the image present per the pull policy; raise `ImagePullFailed` if not.

        A backend may take an image it has seen present as present without
        asking (except under `ALWAYS`); if it is gone, `create` raises
        `ImagePullFailed` and forgets it, and a second call asks.
        """
        ...

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """Create the engine network (internal, with `labels`) unless it exists.

        A backend may remember the network it settled on and answer later
        calls without asking; if that network is removed behind its back,
        `create` or `start` raises `EngineNetworkGone` and forgets it, and a
        second call settles again.
        """
        ...

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the game's workload and return the workload's id.

        Raises `Conflict` when a workload of that name already exists,
        `ImagePullFailed` when the image is absent, `EngineNetworkGone`
        when the remembered engine network is gone, and `ContainerStartFailed`
        when the backend refuses the configuration otherwise.
        """
        ...

    def start(self, workload_id: str) -> str:
        """Start a created workload and return the id of its running container.

        On the single-host backend that is `workload_id` itself; on a
        cluster backend, the container of the task it placed. Raises
        `ContainerStartFailed` if the backend refuses (`EngineNetworkGone`
        when that is because the engine network is gone). Whether the engine
        then stays up (and turns healthy) is for the caller to watch through
        `inspect`.
        """
        ...

    def stop(self, container_id: str, timeout: timedelta) -> None:
        """Stop the engine gracefully, killing it after `timeout`; one already gone is fine."""
        ...

    def remove(self, container_id: str, *, force: bool = False) -> None:
        """Remove the workload the id belongs to; one already gone is fine.

        Raises `Conflict` when it still runs and `force` is not set.
        """
        ...

    def inspect(self, id_or_name: str) -> ContainerInfo | None:
        """Return what the backend says about an engine container, owned or not.

        `id_or_name` is an id (see the class docstring) or a workload name;
        None when there is no such container. Has everything
        `ContainerInfo` describes: state, exit code, health, OOM kill,
        restart count, image id, start and finish times, and the node.
        """
        ...

    def owns(self, container_id: str) -> bool | None:
        """Whether the container with this full id is this deployment's; None if there is none.

        Ownership never changes for an id (labels are fixed when a workload
        is created, ids are never reused), so a backend may answer True
        without asking its daemon when it has seen the id owned before; the
        container may be gone by then, which `stop` and `remove` take as done.
        """
        ...

    def list_owned(self) -> list[ContainerInfo]:
        """Return the container of every workload owned by this deployment, running or not.

        From one listing: `exit_code`, `health`, `started_at`,
        `finished_at`, `oom_killed` and `restart_count` are not part of a
        listing and are None, False and 0 here (`inspect` of one container
        has them); the node is reported.
        """
        ...

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """Return the last lines of an engine's output (empty when unavailable)."""
        ...

    def follow_events(self, since: datetime | None = None) -> EventStream:
        """Stream events of owned engine containers from `since` (or now) on.

        Actions are Docker's container actions (`start`, `die` with its
        exit code, `oom`, `destroy`, `health_status: <status>`, ...), named
        by the container's id and game; consumers are idempotent, since a
        resumed stream may repeat an event.
        """
        ...
