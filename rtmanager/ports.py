"""The ports: what the lifecycle layer needs from PostgreSQL, Redis and the engine backend.

Each port is a `typing.Protocol` whose docstring is its contract. Adapters in
`rtmanager.adapters` implement them against the real systems; tests exercise
the contracts against those adapters and use fakes for fast unit tests.

Every port method may raise `ServiceUnavailable` when its backing system is
unreachable or times out; other errors are listed per method.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.domain.explanation import LeaseHolder
from rtmanager.domain.jobs import JobKind, JobMark, LobbyJob, PendingJob
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; `next_page_token` is empty on the last page."""

    items: Sequence[T]
    next_page_token: str = ""


@dataclass(frozen=True)
class StatusChange:
    """A compare-and-swap status transition of one runtime record.

    The store applies it only when the stored status equals `expected_from`
    and, when `expected_container_id` is not None, the stored
    `current_container_id` equals it (empty string matching NULL). It derives
    `stopped_at` / `removed_at` / `started_at` and `last_op_at` from `now`
    exactly as `RuntimeRecord.with_status` does. `container_id`, when not
    None, replaces the current container id (empty string stores NULL).
    """

    game_id: str
    expected_from: RuntimeStatus
    to: RuntimeStatus
    now: datetime
    expected_container_id: str | None = None
    container_id: str | None = None


class RuntimeRecordStore(Protocol):
    """Runtime records, one per game.

    Methods run inside the unit of work that owns them and see its
    uncommitted writes.
    """

    def get(self, game_id: str) -> RuntimeRecord:
        """Return the game's record; raise `NotFound` when there is none."""
        ...

    def get_for_update(self, game_id: str) -> RuntimeRecord | None:
        """Return the game's record locked until the unit of work ends, or None."""
        ...

    def upsert(self, record: RuntimeRecord) -> None:
        """Insert the record, or overwrite every column of the existing row.

        Raises `InvalidRuntimeRecord` when the record breaks a domain rule
        (the adapter validates; the table's CHECK constraints back it up).
        """
        ...

    def update_status(self, change: StatusChange) -> RuntimeRecord:
        """Apply a CAS status transition and return the updated record.

        Raises `InvalidTransition` for a pair the status machine forbids
        (without touching the store), `NotFound` when there is no record and
        `ConcurrentModification` when a CAS guard fails.
        """
        ...

    def list(
        self, *, status: RuntimeStatus | None = None, page_size: int = 100, page_token: str = ""
    ) -> Page[RuntimeRecord]:
        """Return records ordered by game id, optionally of one status.

        Raises `InvalidRequest` for a malformed page token or page size.
        """
        ...

    def list_by_status(self, status: RuntimeStatus) -> builtins.list[RuntimeRecord]:
        """Return every record of one status, ordered by game id."""
        ...

    def list_stopped_before(self, cutoff: datetime, limit: int) -> builtins.list[RuntimeRecord]:
        """Return up to `limit` stopped records whose `last_op_at` is before `cutoff`."""
        ...


class RecordReader(Protocol):
    """Reads of runtime records for the RPCs served on the server's event loop.

    Each read is one statement in autocommit on a connection of the
    reader's own pool, awaited without blocking the loop. `timeout` bounds
    the statement (None: the session's default). A read whose connection
    turns out broken (PostgreSQL restarted since it was pooled) is retried
    once on a fresh connection. Both raise `ServiceUnavailable` when
    PostgreSQL is unreachable, no connection frees up in time or the
    statement times out.
    """

    async def get(self, game_id: str, *, timeout: timedelta | None = None) -> RuntimeRecord:
        """Return the game's record; raise `NotFound` when there is none."""
        ...

    async def list(
        self,
        *,
        status: RuntimeStatus | None,
        page_size: int,
        page_token: str,
        timeout: timedelta | None = None,
    ) -> Page[RuntimeRecord]:
        """One page of records ordered by game id, as `RuntimeRecordStore.list`."""
        ...


@dataclass(frozen=True)
class OperationFilter:
    """Filters of an operation-log listing; None means any."""

    game_id: str | None = None
    op_kind: OpKind | None = None
    op_source: OpSource | None = None
    outcome: Outcome | None = None
    since: datetime | None = None
    until: datetime | None = None


class OperationLog(Protocol):
    """The append-only operation log."""

    def append(self, entry: OperationEntry, *, reserved_id: int = 0) -> OperationEntry:
        """Append a validated entry and return it with its id.

        The id is the log's next one, or `reserved_id`, which `reserve_id`
        drew for this row. Raises `InvalidOperationEntry` when the entry
        breaks a rule or already has an id; a reserved id can be appended once.
        """
        ...

    def reserve_id(self) -> int:
        """Draw the id of a row that will be appended later, with `reserved_id`.

        A composite operation (restart, patch, forced cleanup) appends its
        row after its inner steps have committed theirs; reserving its id
        first lets each inner row name it. The id is never handed out again,
        whatever becomes of this unit of work (like a database sequence), and
        ids appended later without a reservation are higher. Needs no commit.
        """
        ...

    def list(
        self, filters: OperationFilter, *, page_size: int = 100, page_token: str = ""
    ) -> Page[OperationEntry]:
        """Return entries newest first (by id), filtered, one page at a time.

        `since` bounds `started_at` inclusively, `until` exclusively. Raises
        `InvalidRequest` for a malformed page token or page size.
        """
        ...


@dataclass(frozen=True)
class RuntimeEvent:
    """One committed record change, as the event feed delivers it.

    `source_ref`, `parent_op_kind` and `parent_operation_id` are those of
    the operation's row. An event naming a parent is an inner step of a
    restart, patch or forced cleanup (its stop or start); the parent's own
    event, `operation_id == parent_operation_id`, follows its inner steps'
    events and says how the whole operation ended.
    """

    id: int
    operation_id: int
    op_kind: OpKind
    op_source: OpSource
    outcome: Outcome
    record: RuntimeRecord
    committed_at: datetime
    source_ref: str = ""
    parent_op_kind: OpKind | None = None
    parent_operation_id: int = 0

    @property
    def inner_step(self) -> bool:
        """Whether this change is a step of a composite operation still under way."""
        return self.parent_op_kind is not None


class RuntimeEventLog(Protocol):
    """The outbox of record changes, written in the change's own transaction."""

    def append(self, operation: OperationEntry, record: RuntimeRecord) -> int:
        """Append the change `operation` made (the record after it); return the event id.

        The feed reads the operation's kind, source, outcome, source_ref and
        parent from its operation-log row, appended first in the same unit
        of work.

        Event ids grow in commit order: an event committed later never has a
        smaller id than one a reader has already seen.
        """
        ...


class JobMarkStore(Protocol):
    """Each game's Lobby job watermark: the newest Lobby job applied to it (SPEC §4).

    Read and written under the game's lease; written in the same unit of
    work as the record change and audit row the job caused.
    """

    def get(self, game_id: str) -> JobMark | None:
        """The game's watermark, or None before its first Lobby job."""
        ...

    def advance(self, mark: JobMark) -> bool:
        """Make `mark` the game's watermark unless the stored one is as new or newer.

        Never moves a watermark back: an older mark is ignored, and False
        says so (True: `mark` is now the watermark).
        """
        ...


class UnitOfWork(Protocol):
    """One database transaction over records and the operation log.

    Used as a context manager: what is written inside is committed by
    `commit()`; leaving the block without committing rolls it back. A record
    change and its audit row therefore commit together or not at all.
    """

    records: RuntimeRecordStore
    operations: OperationLog
    events: RuntimeEventLog
    job_marks: JobMarkStore

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def commit(self) -> None:
        """Commit everything written in this unit of work."""
        ...


class CursorExpired(Exception):
    """A watch cursor older than the feed's retention."""


@dataclass(frozen=True)
class EventFilter:
    """Which changes a watcher wants: empty sets mean every game, every status."""

    game_ids: frozenset[str] = frozenset()
    statuses: frozenset[RuntimeStatus] = frozenset()

    def wants(self, record: RuntimeRecord) -> bool:
        """Whether a record (after a change) passes the filter."""
        return (not self.game_ids or record.game_id in self.game_ids) and (
            not self.statuses or record.status in self.statuses
        )


EVERY_EVENT = EventFilter()


class Subscription(Protocol):
    """One watcher's live view of the feed: the events it wants, in id order, as
    they commit.

    A subscription belongs to the asyncio event loop it was made on: `get`
    and `close` are called there, and the feed hands it events there.
    """

    @property
    def position(self) -> int:
        """The newest event id the feed had dispatched when this watcher subscribed."""
        ...

    async def get(self, timeout: float) -> RuntimeEvent | int:
        """The next wanted event, or, after `timeout` seconds without one, a
        bookmark: the id through which every dispatched event has been handed
        over or was not wanted.

        Raises `SubscriberOverflow` when the watcher fell too far behind and
        `FeedClosed` when the feed is shutting down or the watch was closed.
        """
        ...

    def close(self) -> None:
        """End this watch (on its event loop): a waiting `get` raises `FeedClosed` at once."""
        ...


class SubscriberOverflow(Exception):
    """The watcher did not keep up; events were not queued for it."""


class FeedClosed(Exception):
    """The feed is shutting down."""


class TooManyWatchers(Exception):
    """The process already serves as many watchers as configured."""


class RuntimeFeed(Protocol):
    """The durable, ordered stream of committed runtime changes (WatchRuntimes)."""

    async def subscribe(self, wanted: EventFilter = EVERY_EVENT) -> Subscription:
        """Register a watcher of the events `wanted` passes (filtered as they are
        queued, not by the watcher) on the running event loop; raise
        `TooManyWatchers` at the configured bound, `FeedClosed` when shutting down.

        The same `RuntimeEvent` object is handed to every watcher of an event.
        """
        ...

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a watcher (on its event loop; a second call does nothing)."""
        ...

    # The reads below block on the database: call them off the event loop.

    def snapshot(self) -> tuple[builtins.list[RuntimeRecord], int]:
        """Every record and the newest event id, read in one consistent snapshot."""
        ...

    def events_after(self, after_id: int, limit: int) -> builtins.list[RuntimeEvent]:
        """Up to `limit` stored events with id > `after_id`, in id order."""
        ...

    def check_cursor(self, cursor: int) -> None:
        """Raise `CursorExpired` when events after `cursor` were already pruned,
        `InvalidRequest` when the cursor was never issued."""
        ...


class UnitOfWorkFactory(Protocol):
    """Makes a fresh unit of work; `timeout` bounds its statements."""

    def __call__(self, *, timeout: timedelta | None = None) -> UnitOfWork: ...

    def read(self, work: Callable[[UnitOfWork], T], *, timeout: timedelta | None = None) -> T:
        """Run `work`, a read of a single statement, and return its result.

        Nothing is written and nothing committed: the statement runs on its
        own, without a transaction around it. A read that fails because the
        database connection turned out broken is run once more on a fresh
        connection (reads are idempotent).
        """
        ...


@dataclass(frozen=True)
class Lease:
    """A held game lease: the game and the token that proves holding it.

    The token is unguessable and names its holder's instance; only the
    whole token proves holding the lease.
    """

    game_id: str
    token: str


class GameLeases(Protocol):
    """Per-game mutual exclusion across threads, processes and replicas.

    Each lease names the instance (`RTMANAGER_INSTANCE_ID`) that took it,
    so anyone can tell who holds a game (`holder`).
    """

    def acquire(self, game_id: str, ttl: timedelta) -> Lease | None:
        """Take the game's lease for `ttl`; return None when another holder has it."""
        ...

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        """Extend a held lease; False when it expired or another holder has it."""
        ...

    def release(self, lease: Lease) -> bool:
        """Release a held lease; False when it was no longer ours (nothing is deleted)."""
        ...

    def holder(self, game_id: str) -> LeaseHolder | None:
        """Who holds the game's lease now and its time left; None when nobody does."""
        ...


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


@dataclass(frozen=True)
class JobEntry:
    """One entry of a Lobby job stream, delivered to this consumer.

    `fields` is empty when the entry was deleted or trimmed from its stream
    while still pending. `deliveries` counts how often Redis has handed the
    entry to a consumer, this delivery included.
    """

    job: LobbyJob
    fields: Mapping[bytes, bytes]
    deliveries: int

    @property
    def stream(self) -> str:
        """The job stream the entry belongs to."""
        return self.job.stream

    @property
    def entry_id(self) -> str:
        """The entry's id in its stream."""
        return self.job.entry_id


class AnswerOutcome(StrEnum):
    """What became of an answer handed to `JobStreams.answer`."""

    # Published and the entry acknowledged, in one atomic step.
    ANSWERED = "answered"
    # The job had been answered before: acknowledged, nothing published.
    ALREADY_ANSWERED = "already_answered"
    # The entry is no longer pending for this consumer (another consumer
    # took it over, or it was acknowledged): nothing was done; whoever
    # holds it now answers it.
    NOT_OURS = "not_ours"


@dataclass(frozen=True)
class PendingJobs:
    """A game's unanswered Lobby jobs in Lobby's order, from a bounded scan.

    `truncated` says the scan stopped at its bound: more of the game's jobs
    may wait behind the entries it looked at.
    """

    jobs: Sequence[PendingJob]
    truncated: bool = False


class JobStreams(Protocol):
    """Lobby's job streams as one consumer of the consumer group sees them (SPEC §4).

    The consumer is named (`RTMANAGER_INSTANCE_ID`); its *presence* (a key
    with a TTL, renewed by `keep_name`) tells other consumers it is alive.
    Entries pending on a consumer without presence are *abandoned* and may
    be claimed by another consumer once idle long enough; entries of a live
    consumer are never taken from it. Every job gets exactly one answer (a
    result or a dead letter): `answer` publishes it and acknowledges the
    entry atomically, only while the entry is pending for this consumer,
    and never a second time for the same job.

    Every method raises `ServiceUnavailable` when Redis is unreachable or
    times out. A missing stream or consumer group is recreated by the
    adapter, never reported.
    """

    def ensure_groups(self) -> None:
        """Create the consumer group on both job streams unless it exists."""
        ...

    def claim_name(self) -> bool:
        """Take this consumer's presence; False while another live process holds the name."""
        ...

    def keep_name(self) -> bool:
        """Renew this consumer's presence; False when it was lost (call `claim_name`)."""
        ...

    def release_name(self) -> None:
        """Give up this consumer's presence (on shutdown), if still ours."""
        ...

    def redeliver_own(self, kind: JobKind, after: str, count: int) -> builtins.list[JobEntry]:
        """Up to `count` entries of the `kind` stream pending on this consumer, ids > `after`.

        Used on start-up to take back what this consumer held when it last
        ran; each counts as a delivery again (a crash on an entry counts).
        Entries deleted from the stream meanwhile are dead-lettered instead
        of returned; an empty list means nothing more is pending.
        """
        ...

    def read_new(self, count: int, block: timedelta) -> builtins.list[JobEntry]:
        """Up to `count` new entries of each stream, waiting up to `block` when none.

        Each returned entry is pending on this consumer (its first delivery).
        """
        ...

    def claim_abandoned(self, min_idle: timedelta, count: int) -> builtins.list[JobEntry]:
        """Take up to `count` entries idle for `min_idle` on consumers without presence."""
        ...

    def answer(
        self, entry: JobEntry, fields: Mapping[str, str], *, dead_letter: bool = False
    ) -> AnswerOutcome:
        """Publish `fields` to the results (or dead-letter) stream and acknowledge `entry`.

        Atomic: either both happen or neither (see `AnswerOutcome`). The
        target stream is trimmed to its configured length.
        """
        ...

    def remove_idle_consumers(self, min_idle: timedelta) -> builtins.list[str]:
        """Delete group consumers idle for `min_idle`, without presence or pending entries."""
        ...

    def lag(self) -> dict[str, int]:
        """Entries of each job stream the group has not read yet."""
        ...

    def pending_jobs(self, game_id: str, scan: int) -> PendingJobs:
        """The jobs of `game_id` in both job streams that the group has not acknowledged.

        Both those delivered to a consumer and pending there and those not
        delivered yet (after the group's last-delivered id), in Lobby's
        order. Bounded: in each stream at most `scan` pending entries and
        `scan` undelivered ones are looked at, oldest first (`truncated`
        when a bound was reached). An entry deleted from its stream while
        pending is not reported (its game cannot be told). Only reads; works
        for any consumer of the group, and with no group yet (then every
        entry is undelivered).
        """
        ...
