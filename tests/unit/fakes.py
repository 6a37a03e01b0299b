"""In-memory fakes of the ports in `rtmanager.ports`, for fast unit tests.

- `FakeStore` is the committed state of a database: runtime records and the
  operation log. `FakeUnitOfWorkFactory` makes `FakeUnitOfWork`s over it with
  real transactional semantics: writes are staged, visible inside their unit
  of work, and reach the store only on `commit()`; leaving the block without
  committing discards them.
- `FakeLeases` is `GameLeases` on a dict, with games held by "another
  holder" and an outage switch; it records every call.
- `FakeBackend` is `EngineBackend` on a dict of containers, with per-image
  engine behaviours (crash, unhealthy, never healthy, ...), pull policies,
  failure injection per method, hooks run before a method, and a call log.
- `FakeRedisStreams` is a Redis holding Lobby's job streams: one consumer
  group with its pending-entries list, the results and dead-letter streams,
  answered markers and consumers' presence with a TTL. `FakeJobStreams` is
  `JobStreams` for one named consumer over it; several share one state, as
  replicas share one Redis.

Every fake raises what its port's contract says, so a lifecycle that works
against the fakes fails against the real adapters only where the adapters
break their contracts (which the integration tests check).
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NamedTuple, Self, TypeVar

from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import (
    ConcurrentModification,
    Conflict,
    ContainerStartFailed,
    ImagePullFailed,
    InternalError,
    InvalidRequest,
    NotFound,
    RuntimeManagerError,
    ServiceUnavailable,
)
from rtmanager.domain.explanation import LeaseHolder
from rtmanager.domain.ids import is_valid_game_id
from rtmanager.domain.jobs import JobKind, JobMark, LobbyJob, PendingJob, parse_entry_id
from rtmanager.domain.operation import InvalidOperationEntry, OperationEntry
from rtmanager.domain.runtime import (
    InvalidRuntimeRecord,
    RuntimeRecord,
    RuntimeStatus,
    transition,
)
from rtmanager.domain.timeutil import utc_now
from rtmanager.ports import (
    AnswerOutcome,
    BackendCapabilities,
    ContainerInfo,
    ContainerSpec,
    EventStream,
    JobEntry,
    JobMarkStore,
    Lease,
    OperationFilter,
    OperationLog,
    Page,
    PendingJobs,
    PullPolicy,
    RuntimeEvent,
    RuntimeEventLog,
    RuntimeRecordStore,
    StatusChange,
    UnitOfWork,
)

T = TypeVar("T")

if TYPE_CHECKING:
    from rtmanager.ports import (
        EngineBackend,
        GameLeases,
        JobStreams,
        UnitOfWork,
        UnitOfWorkFactory,
    )

MAX_PAGE_SIZE = 1000


def _check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size {page_size!r} is invalid: expected 1..{MAX_PAGE_SIZE}")


# --- database: records and the operation log ------------------------------------------


class FakeStore:
    """The committed state of the fake database.

    Tests seed it with `put` and read it with `record` / `entries`; lifecycle
    code reaches it only through units of work.
    """

    def __init__(self) -> None:
        self.records: dict[str, RuntimeRecord] = {}
        self.operations: list[OperationEntry] = []  # in id order (ListOperations' order)
        # The same rows in the order they were committed: a composite
        # operation's row commits after its inner steps' rows but has a
        # lower id (drawn before they ran).
        self.committed_operations: list[OperationEntry] = []
        self.events: list[tuple[int, int, RuntimeRecord]] = []  # (id, operation id, record)
        self.job_marks: dict[str, JobMark] = {}
        self._next_operation_id = 1
        self._reserved_ids: set[int] = set()
        self._append_failures: list[Exception] = []
        self.lock = threading.RLock()

    def put(self, record: RuntimeRecord) -> RuntimeRecord:
        """Store a (validated) record directly, as if committed long ago."""
        record.validate()
        with self.lock:
            self.records[record.game_id] = record
        return record

    def record(self, game_id: str) -> RuntimeRecord:
        """The committed record of a game (KeyError when there is none)."""
        with self.lock:
            return self.records[game_id]

    def entries(self, game_id: str | None = None) -> list[OperationEntry]:
        """Committed operation-log rows in commit order, optionally of one game."""
        with self.lock:
            return [e for e in self.committed_operations if game_id is None or e.game_id == game_id]

    def runtime_events(self, game_id: str | None = None) -> list[RuntimeEvent]:
        """Committed events as the feed delivers them: joined with their operation rows."""
        with self.lock:
            rows = {entry.id: entry for entry in self.operations}
            return [
                RuntimeEvent(
                    id=event_id,
                    operation_id=operation_id,
                    op_kind=rows[operation_id].op_kind,
                    op_source=rows[operation_id].op_source,
                    outcome=rows[operation_id].outcome,
                    record=record,
                    committed_at=rows[operation_id].finished_at or rows[operation_id].started_at,
                    source_ref=rows[operation_id].source_ref,
                    parent_op_kind=rows[operation_id].parent_op_kind,
                    parent_operation_id=rows[operation_id].parent_operation_id,
                )
                for event_id, operation_id, record in self.events
                if game_id is None or record.game_id == game_id
            ]

    def fail_next_appends(self, count: int = 1, *, error: Exception | None = None) -> None:
        """Make the next `count` `operations.append` calls raise `error`.

        The default error is `ServiceUnavailable` (the database went away).
        """
        failure = error or ServiceUnavailable("fake database: append to the operation log failed")
        self._append_failures.extend([failure] * count)

    def _take_append_failure(self) -> Exception | None:
        with self.lock:
            return self._append_failures.pop(0) if self._append_failures else None

    def _assign_operation_id(self) -> int:
        # Like a database sequence: ids of rolled-back rows are never reused.
        with self.lock:
            assigned = self._next_operation_id
            self._next_operation_id += 1
            return assigned

    def _reserve_operation_id(self) -> int:
        with self.lock:
            reserved = self._assign_operation_id()
            self._reserved_ids.add(reserved)
            return reserved

    def _check_reserved_id(self, reserved_id: int, staged: Iterable[OperationEntry]) -> None:
        """Refuse an id never reserved, or one a committed or staged row has (the primary key)."""
        with self.lock:
            if reserved_id not in self._reserved_ids:
                raise InvalidOperationEntry(f"operation id {reserved_id} was never reserved")
            if any(e.id == reserved_id for e in itertools.chain(self.operations, staged)):
                raise InternalError(f"duplicate key: operation id {reserved_id} exists")


FailurePoint = Literal["enter", "commit"]


@dataclass(frozen=True)
class Commit:
    """What one `commit()` of a unit of work wrote."""

    records: tuple[RuntimeRecord, ...]
    operations: tuple[OperationEntry, ...]
    job_marks: tuple[JobMark, ...] = ()


class FakeRuntimeRecordStore:
    """`RuntimeRecordStore` over one fake unit of work (sees its staged writes)."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def _read(self, game_id: str) -> RuntimeRecord | None:
        self._uow.require_active()
        staged = self._uow.staged_records.get(game_id)
        if staged is not None:
            return staged
        with self._uow.store.lock:
            return self._uow.store.records.get(game_id)

    def _all(self) -> builtins.list[RuntimeRecord]:
        self._uow.require_active()
        with self._uow.store.lock:
            merged = dict(self._uow.store.records)
        merged.update(self._uow.staged_records)
        return [merged[game_id] for game_id in sorted(merged)]

    def get(self, game_id: str) -> RuntimeRecord:
        """Return the game's record; raise `NotFound` when there is none."""
        record = self._read(game_id)
        if record is None:
            raise NotFound(f"no runtime record for game {game_id}", metadata={"game_id": game_id})
        return record

    def get_for_update(self, game_id: str) -> RuntimeRecord | None:
        """Return the game's record, or None (single-threaded tests need no row lock)."""
        return self._read(game_id)

    def upsert(self, record: RuntimeRecord) -> None:
        """Validate the record, then stage it (insert or overwrite)."""
        self._uow.require_active()
        record.validate()
        self._uow.staged_records[record.game_id] = record

    def update_status(self, change: StatusChange) -> RuntimeRecord:
        """Apply a CAS status transition as `StatusChange`'s docstring says.

        The result is validated like the table's CHECK constraints would:
        a record that breaks a rule raises `InternalError` (as the Postgres
        adapter reports a CHECK violation).
        """
        self._uow.require_active()
        transition(change.expected_from, change.to)
        current = self._read(change.game_id)
        if current is None:
            raise NotFound(
                f"no runtime record for game {change.game_id}",
                metadata={"game_id": change.game_id},
            )
        if current.status != change.expected_from or (
            change.expected_container_id is not None
            and current.current_container_id != change.expected_container_id
        ):
            raise ConcurrentModification(
                f"runtime record of game {change.game_id} changed concurrently: expected "
                f"{change.expected_from}/{change.expected_container_id!r}, found "
                f"{current.status}/{current.current_container_id!r}",
                metadata={"game_id": change.game_id},
            )
        updated = current.with_status(change.to, change.now, container_id=change.container_id)
        try:
            updated.validate()
        except InvalidRuntimeRecord as error:
            raise InternalError(f"CHECK constraint violated: {error}") from error
        self._uow.staged_records[change.game_id] = updated
        return updated

    def list(
        self, *, status: RuntimeStatus | None = None, page_size: int = 100, page_token: str = ""
    ) -> Page[RuntimeRecord]:
        """Records ordered by game id; the page token is the last game id of a page."""
        _check_page_size(page_size)
        if page_token and not is_valid_game_id(page_token):
            raise InvalidRequest(f"page_token {page_token!r} is malformed")
        matching = [
            r
            for r in self._all()
            if (status is None or r.status == status) and r.game_id > page_token
        ]
        items = matching[:page_size]
        more = len(matching) > page_size
        return Page(items=items, next_page_token=items[-1].game_id if more else "")

    def list_by_status(self, status: RuntimeStatus) -> builtins.list[RuntimeRecord]:
        """Every record of one status, ordered by game id."""
        return [r for r in self._all() if r.status == status]

    def list_stopped_before(self, cutoff: datetime, limit: int) -> builtins.list[RuntimeRecord]:
        """Up to `limit` stopped records with `last_op_at` before `cutoff`, oldest first."""
        if isinstance(limit, bool) or limit < 1:
            raise InvalidRequest(f"limit {limit!r} is invalid: expected at least 1")
        stopped = [
            r for r in self._all() if r.status is RuntimeStatus.STOPPED and r.last_op_at < cutoff
        ]
        stopped.sort(key=lambda r: (r.last_op_at, r.game_id))
        return stopped[:limit]


class FakeOperationLog:
    """`OperationLog` over one fake unit of work (sees its staged rows)."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def append(self, entry: OperationEntry, *, reserved_id: int = 0) -> OperationEntry:
        """Validate the entry, give it the next id (or the reserved one) and stage it.

        A reserved id may be appended once: a second append of it is refused
        as the table's primary key would refuse it (a rolled-back one is not
        there, so the id may be appended again).
        """
        self._uow.require_active()
        entry.validate()
        if entry.id != 0:
            raise InvalidOperationEntry(f"entry already has id {entry.id}; append it only once")
        failure = self._uow.store._take_append_failure()
        if failure is not None:
            raise failure
        if reserved_id:
            self._uow.store._check_reserved_id(reserved_id, self._uow.staged_operations)
        assigned = reserved_id or self._uow.store._assign_operation_id()
        stored = replace(entry, id=assigned)
        self._uow.staged_operations.append(stored)
        return stored

    def reserve_id(self) -> int:
        """Draw an id for a later append (never handed out again)."""
        self._uow.require_active()
        return self._uow.store._reserve_operation_id()

    def list(
        self, filters: OperationFilter, *, page_size: int = 100, page_token: str = ""
    ) -> Page[OperationEntry]:
        """Entries newest first; the page token is the last id of a page."""
        self._uow.require_active()
        _check_page_size(page_size)
        if page_token and not page_token.isdigit():
            raise InvalidRequest(f"page_token {page_token!r} is malformed")
        before = int(page_token) if page_token else None
        with self._uow.store.lock:
            every = [*self._uow.store.operations, *self._uow.staged_operations]

        def wanted(e: OperationEntry) -> bool:
            f = filters
            return (
                (before is None or e.id < before)
                and (f.game_id is None or e.game_id == f.game_id)
                and (f.op_kind is None or e.op_kind == f.op_kind)
                and (f.op_source is None or e.op_source == f.op_source)
                and (f.outcome is None or e.outcome == f.outcome)
                and (f.since is None or e.started_at >= f.since)
                and (f.until is None or e.started_at < f.until)
            )

        matching = sorted((e for e in every if wanted(e)), key=lambda e: e.id, reverse=True)
        items = matching[:page_size]
        more = len(matching) > page_size
        return Page(items=items, next_page_token=str(items[-1].id) if more else "")


class FakeRuntimeEventLog:
    """`RuntimeEventLog` over one fake unit of work (events staged until commit)."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def append(self, operation: OperationEntry, record: RuntimeRecord) -> None:
        """Stage the event with the next id."""
        self._uow.require_active()
        with self._uow.store.lock:
            event_id = len(self._uow.store.events) + len(self._uow.staged_events) + 1
        self._uow.staged_events.append((event_id, operation.id, record))


class FakeJobMarkStore:
    """`JobMarkStore` over one fake unit of work (marks staged until commit)."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def get(self, game_id: str) -> JobMark | None:
        """The staged or committed watermark of the game."""
        self._uow.require_active()
        staged = self._uow.staged_marks.get(game_id)
        if staged is not None:
            return staged
        with self._uow.store.lock:
            return self._uow.store.job_marks.get(game_id)

    def advance(self, mark: JobMark) -> bool:
        """Stage `mark` unless the current watermark is as new or newer (then False)."""
        current = self.get(mark.game_id)
        if current is not None and current.job.position >= mark.job.position:
            return False
        self._uow.staged_marks[mark.game_id] = mark
        return True


class FakeUnitOfWork:
    """One fake transaction: staged writes, applied to the store on `commit()`."""

    records: RuntimeRecordStore
    operations: OperationLog
    events: RuntimeEventLog
    job_marks: JobMarkStore

    def __init__(
        self,
        store: FakeStore,
        *,
        timeout: timedelta | None = None,
        fail_at: FailurePoint | None = None,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.fail_at = fail_at
        self.staged_records: dict[str, RuntimeRecord] = {}
        self.staged_operations: list[OperationEntry] = []
        self.staged_events: list[tuple[int, int, RuntimeRecord]] = []
        self.staged_marks: dict[str, JobMark] = {}
        self.commits: list[Commit] = []
        self.entered = False
        self.active = False
        self.rolled_back = False
        self.records = FakeRuntimeRecordStore(self)
        self.operations = FakeOperationLog(self)
        self.events = FakeRuntimeEventLog(self)
        self.job_marks = FakeJobMarkStore(self)

    def require_active(self) -> None:
        """Refuse use outside the `with` block (a bug in the code under test)."""
        if not self.active:
            raise RuntimeError("fake unit of work used outside its `with` block")

    def __enter__(self) -> Self:
        if self.entered:
            raise RuntimeError("fake unit of work entered twice")
        self.entered = True
        if self.fail_at == "enter":
            raise ServiceUnavailable("fake database: cannot connect")
        self.active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.staged_records or self.staged_operations:
            self.rolled_back = True
        self.staged_records.clear()
        self.staged_operations.clear()
        self.staged_events.clear()
        self.staged_marks.clear()
        self.active = False

    def commit(self) -> None:
        """Apply the staged writes to the store, atomically."""
        self.require_active()
        if self.fail_at == "commit":
            raise ServiceUnavailable("fake database: commit failed")
        with self.store.lock:
            self.store.records.update(self.staged_records)
            self.store.operations.extend(self.staged_operations)
            self.store.operations.sort(key=lambda e: e.id)
            self.store.committed_operations.extend(self.staged_operations)
            self.store.events.extend(self.staged_events)
            self.store.job_marks.update(self.staged_marks)
        self.commits.append(
            Commit(
                tuple(self.staged_records.values()),
                tuple(self.staged_operations),
                tuple(self.staged_marks.values()),
            )
        )
        self.staged_records.clear()
        self.staged_operations.clear()
        self.staged_events.clear()
        self.staged_marks.clear()

    @property
    def committed(self) -> bool:
        """Whether anything was committed by this unit of work."""
        return bool(self.commits)


class FakeUnitOfWorkFactory:
    """`UnitOfWorkFactory` over a `FakeStore`, with scheduled failures.

    `fail_next(count, at=..., after=...)` makes units of work fail with
    `ServiceUnavailable` on enter or on commit; `down = True` makes every unit
    fail on enter until set back to False.
    """

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store if store is not None else FakeStore()
        self.units: list[FakeUnitOfWork] = []
        self.down = False
        self._plan: list[FailurePoint | None] = []

    def __call__(self, *, timeout: timedelta | None = None) -> FakeUnitOfWork:
        planned = self._plan.pop(0) if self._plan else None
        fail_at: FailurePoint | None = "enter" if self.down else planned
        unit = FakeUnitOfWork(self.store, timeout=timeout, fail_at=fail_at)
        self.units.append(unit)
        return unit

    def read(self, work: Callable[[UnitOfWork], T], *, timeout: timedelta | None = None) -> T:
        """Run `work` on a fresh unit of work (a read: nothing is committed)."""
        with self(timeout=timeout) as unit:
            return work(unit)

    def fail_next(self, count: int = 1, *, at: FailurePoint = "enter", after: int = 0) -> None:
        """Let `after` units of work succeed, then fail the next `count` at `at`."""
        self._plan.extend([None] * after + [at] * count)

    def commits(self) -> list[Commit]:
        """Every commit of every unit of work made so far, in order."""
        return [c for unit in self.units for c in unit.commits]


# --- leases --------------------------------------------------------------------------


LeaseMethod = Literal["acquire", "renew", "release", "holder"]


class FakeLeases:
    """`GameLeases` on a dict of game id -> token, recording every call.

    Leases taken here are held by `instance_id` (their tokens name it), for
    the ttl they were last given. `busy` holds games another holder has
    (acquire returns None; `holder` says `busy_holder`); `failing` holds
    the methods that raise `ServiceUnavailable` (see `go_down`).
    Thread-safe: `GameLock`'s renewer thread calls `renew`.
    """

    def __init__(self, *, instance_id: str = "rtmanager-1") -> None:
        self.instance_id = instance_id
        self.busy_holder = LeaseHolder("rtmanager-2", timedelta(seconds=20))
        self.tokens: dict[str, str] = {}
        self.ttl_left: dict[str, timedelta] = {}
        self.busy: set[str] = set()
        self.failing: set[LeaseMethod] = set()
        self.acquired: list[Lease] = []
        self.renewed: list[Lease] = []
        self.released: list[Lease] = []
        self.refused: list[str] = []
        self.ttls: list[timedelta] = []
        self._counter = 0
        self._lock = threading.Lock()

    def go_down(self, *methods: LeaseMethod) -> None:
        """Make `methods` (default: all) raise `ServiceUnavailable`."""
        self.failing.update(methods or ("acquire", "renew", "release", "holder"))

    def _maybe_fail(self, method: LeaseMethod) -> None:
        if method in self.failing:
            raise ServiceUnavailable(f"fake redis: {method} failed: connection refused")

    def acquire(self, game_id: str, ttl: timedelta) -> Lease | None:
        """Take the lease unless it is held (by us or by `busy`)."""
        with self._lock:
            self._maybe_fail("acquire")
            self.ttls.append(ttl)
            if game_id in self.busy or game_id in self.tokens:
                self.refused.append(game_id)
                return None
            self._counter += 1
            lease = Lease(game_id, f"{self.instance_id}/token-{self._counter}")
            self.tokens[game_id] = lease.token
            self.ttl_left[game_id] = ttl
            self.acquired.append(lease)
            return lease

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        """Extend the lease while it still holds our token."""
        with self._lock:
            self._maybe_fail("renew")
            self.renewed.append(lease)
            if self.tokens.get(lease.game_id) != lease.token:
                return False
            self.ttl_left[lease.game_id] = ttl
            return True

    def release(self, lease: Lease) -> bool:
        """Delete the lease while it still holds our token."""
        with self._lock:
            self._maybe_fail("release")
            self.released.append(lease)
            if self.tokens.get(lease.game_id) != lease.token:
                return False
            del self.tokens[lease.game_id]
            return True

    def holder(self, game_id: str) -> LeaseHolder | None:
        """This instance for a lease taken here, `busy_holder` for a busy game, else None."""
        with self._lock:
            self._maybe_fail("holder")
            if game_id in self.tokens:
                return LeaseHolder(self.instance_id, self.ttl_left[game_id])
            if game_id in self.busy:
                return self.busy_holder
            return None

    def expire(self, game_id: str) -> None:
        """Let the game's lease expire, as its TTL would."""
        with self._lock:
            self.tokens.pop(game_id, None)

    def acquires_of(self, game_id: str) -> int:
        """How many times the game's lease was taken."""
        with self._lock:
            return sum(1 for lease in self.acquired if lease.game_id == game_id)

    @property
    def all_released(self) -> bool:
        """Every lease taken was released, and none is held now."""
        with self._lock:
            return not self.tokens and {lease.token for lease in self.acquired} == {
                lease.token for lease in self.released
            }


# --- docker --------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineBehaviour:
    """How an engine container of one image behaves after it is started.

    - `exits_on_inspect`: from the Nth inspect after start on (1-based), it
      is reported exited with `exit_code`; None means it keeps running.
    - `health`: None for no health check, else the health it reports
      (`starting`, `healthy`, `unhealthy`); with `healthy_after_inspects`,
      it reports `starting` until that many inspects, then `healthy`.
    - `refuses_start`: Docker refuses to start it (`ContainerStartFailed`).
    - `logs`: what it prints.
    """

    exits_on_inspect: int | None = None
    exit_code: int = 3
    health: str | None = None
    healthy_after_inspects: int | None = None
    refuses_start: bool = False
    logs: str = "engine listening on :8080"


RUNS = EngineBehaviour()
CRASHES = EngineBehaviour(
    exits_on_inspect=1, exit_code=3, logs="loading state\npanic: corrupt state file"
)
UNHEALTHY = EngineBehaviour(health="unhealthy", logs="health check: 503")
NEVER_HEALTHY = EngineBehaviour(health="starting", logs="still warming up")
HEALTHY = EngineBehaviour(health="healthy")


@dataclass(frozen=True)
class FakeNode:
    """A cluster node a fake backend can place engines on."""

    id: str
    hostname: str


@dataclass
class FakeContainer:
    """One container of the fake Docker engine."""

    id: str
    name: str
    image_ref: str
    labels: dict[str, str]
    spec: ContainerSpec | None = None
    state: str = "created"
    exit_code: int | None = None
    behaviour: EngineBehaviour = RUNS
    inspects_since_start: int = 0
    logs: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    oom_killed: bool = False
    restart_count: int = 0
    # The cluster node it was placed on; None on a single host.
    node: FakeNode | None = None

    @property
    def image_id(self) -> str:
        """The id of the image it runs (made up from the reference, stable per image)."""
        return f"sha256:{hashlib.sha256(self.image_ref.encode()).hexdigest()}"

    @property
    def running(self) -> bool:
        """Whether the container runs."""
        return self.state == "running"


class Call(NamedTuple):
    """One call of a `FakeBackend` method: its name and arguments."""

    method: str
    args: tuple[object, ...]


class FakeBackend:
    """`EngineBackend` in memory for deployment `cluster`: the single-host
    backend by default, a cluster backend's report of nodes when `node` is set.

    Each workload is one container, whose id `start` returns. Engines
    started (or put there) while `node` is set are placed on that node and
    report it; `host_state_dirs=False` declares state kept by the backend
    (no host directories). `images` are present locally; `pullable` can be pulled; `behaviours`
    maps an image to how its engines behave (default `RUNS`). `fail(method)`
    makes the next call(s) of a method raise; `before(method, fn)` runs `fn`
    with the call's arguments before every call of the method (to simulate
    something happening meanwhile). `calls` logs every call in order. Calls
    for different games may come from several threads (the stream
    consumer's workers); one game's calls are serialised by its lease.
    """

    def __init__(
        self,
        *,
        cluster: str = galaxy_labels.DEFAULT_CLUSTER,
        images: Iterable[str] = (),
        pullable: Iterable[str] = (),
        host_state_dirs: bool = True,
    ) -> None:
        self.cluster = cluster
        self.capabilities = BackendCapabilities(host_state_dirs=host_state_dirs)
        # Where the next engines are placed (started or put there); None: a
        # single host, which reports no node.
        self.node: FakeNode | None = None
        self.containers: dict[str, FakeContainer] = {}
        self.images: set[str] = set(images)
        self.pullable: set[str] = set(pullable)
        self.pulled: list[str] = []
        self.networks: dict[str, dict[str, str]] = {}
        self.behaviours: dict[str, EngineBehaviour] = {}
        self.calls: list[Call] = []
        self._failures: dict[str, list[RuntimeManagerError]] = {}
        self._hooks: dict[str, Callable[..., object]] = {}
        self._counter = 0
        self._id_lock = threading.Lock()

    # -- test controls ------------------------------------------------------------

    def fail(
        self, method: str, *, times: int = 1, error: RuntimeManagerError | None = None
    ) -> None:
        """Make the next `times` calls of `method` raise `error` (default: ServiceUnavailable)."""
        if not hasattr(self, method):
            raise AttributeError(f"FakeBackend has no method {method}")
        failure = error or ServiceUnavailable(f"docker: {method}: daemon unreachable (injected)")
        self._failures.setdefault(method, []).extend([failure] * times)

    def before(self, method: str, hook: Callable[..., object] | None) -> None:
        """Run `hook(*args)` before every call of `method` (None removes it)."""
        if hook is None:
            self._hooks.pop(method, None)
        else:
            self._hooks[method] = hook

    def add_container(
        self,
        *,
        name: str,
        image_ref: str,
        labels: dict[str, str] | None = None,
        running: bool = True,
        exit_code: int | None = None,
        behaviour: EngineBehaviour = RUNS,
    ) -> str:
        """Put a container on the host directly (not through the port); return its id."""
        container = FakeContainer(
            id=self._new_id(name),
            name=name,
            image_ref=image_ref,
            labels=dict(labels or {}),
            state="running" if running else "exited",
            exit_code=None if running else exit_code if exit_code is not None else 0,
            behaviour=behaviour,
            logs=behaviour.logs,
            started_at=utc_now(),
            node=self.node,
        )
        self.containers[container.id] = container
        return container.id

    def add_engine(
        self,
        game_id: str,
        image_ref: str,
        *,
        cluster: str | None = None,
        running: bool = True,
    ) -> str:
        """Put an engine container labelled as deployment `cluster` (default: ours) made it."""
        return self.add_container(
            name=f"galaxy-game-{game_id}",
            image_ref=image_ref,
            labels=galaxy_labels.engine_labels(
                cluster=cluster or self.cluster, game_id=game_id, image_ref=image_ref
            ),
            running=running,
        )

    def method_calls(self, *methods: str) -> list[Call]:
        """The calls of `methods` (default: all but inspect and log reads), in order."""
        quiet = {"inspect", "owns", "logs_tail"}
        return [
            c for c in self.calls if (c.method in methods if methods else c.method not in quiet)
        ]

    def call_names(self, *methods: str) -> list[str]:
        """The names of `method_calls(*methods)`."""
        return [c.method for c in self.method_calls(*methods)]

    def mutating_calls(self) -> list[Call]:
        """Calls that change the host (everything but ping, inspect, list and logs)."""
        reads = {
            "ping",
            "inspect",
            "owns",
            "list_owned",
            "logs_tail",
        }
        return [c for c in self.calls if c.method not in reads]

    def named(self, name: str) -> FakeContainer | None:
        """The container of that name, if any."""
        # A snapshot: the stream consumer's workers create containers of
        # other games meanwhile.
        return next((c for c in list(self.containers.values()) if c.name == name), None)

    # -- the port -----------------------------------------------------------------

    def _enter(self, method: str, *args: object) -> None:
        self.calls.append(Call(method, args))
        hook = self._hooks.get(method)
        if hook is not None:
            hook(*args)
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    def _new_id(self, name: str) -> str:
        with self._id_lock:
            self._counter += 1
            counter = self._counter
        return hashlib.sha256(f"{name}#{counter}".encode()).hexdigest()

    def _find(self, id_or_name: str) -> FakeContainer | None:
        found = self.containers.get(id_or_name)
        return found if found is not None else self.named(id_or_name.lstrip("/"))

    def ping(self) -> None:
        """Answer unless a failure is injected."""
        self._enter("ping")

    def ensure_image(self, image_ref: str, policy: PullPolicy) -> None:
        """Make the image present per `policy` (as the adapter documents it)."""
        self._enter("ensure_image", image_ref, policy)
        present = image_ref in self.images
        if policy is PullPolicy.NEVER:
            if not present:
                raise ImagePullFailed(f"image {image_ref} is not present and the policy is never")
            return
        if policy is PullPolicy.IF_MISSING and present:
            return
        self.pulled.append(image_ref)
        if image_ref not in self.pullable:
            raise ImagePullFailed(f"pull of {image_ref} failed: manifest unknown")
        self.images.add(image_ref)

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """Create the network unless it exists."""
        self._enter("ensure_network", name, dict(labels))
        self.networks.setdefault(name, dict(labels))

    def create(self, spec: ContainerSpec) -> str:
        """Create the container; `Conflict` on a taken name, `ImagePullFailed` without image."""
        self._enter("create", spec)
        if self.named(spec.name) is not None:
            raise Conflict(f"the container name /{spec.name} is already in use")
        if spec.image_ref not in self.images:
            raise ImagePullFailed(f"no such image: {spec.image_ref}")
        behaviour = self.behaviours.get(spec.image_ref, RUNS)
        container = FakeContainer(
            id=self._new_id(spec.name),
            name=spec.name,
            image_ref=spec.image_ref,
            labels=dict(spec.labels),
            spec=spec,
            behaviour=behaviour,
            logs=behaviour.logs,
        )
        self.containers[container.id] = container
        return container.id

    def start(self, workload_id: str) -> str:
        """Start it and return its id; `ContainerStartFailed` when it is missing or refused.

        Placed on `node` (when set), as a cluster backend reports it.
        """
        self._enter("start", workload_id)
        container_id = workload_id
        container = self.containers.get(container_id)
        if container is None:
            raise ContainerStartFailed(f"no such container: {container_id}")
        if container.behaviour.refuses_start:
            raise ContainerStartFailed(
                f"docker could not start container {container_id}: "
                "OCI runtime create failed: exec: /engine: not found"
            )
        container.state = "running"
        container.exit_code = None
        container.inspects_since_start = 0
        container.started_at = utc_now()
        container.node = self.node
        return container_id

    def stop(self, container_id: str, timeout: timedelta) -> None:
        """Stop it (exit code 0); a missing container is fine."""
        self._enter("stop", container_id, timeout)
        container = self.containers.get(container_id)
        if container is not None and container.running:
            container.state = "exited"
            container.exit_code = 0
            container.finished_at = utc_now()

    def remove(self, container_id: str, *, force: bool = False) -> None:
        """Remove it; `Conflict` when it runs without `force`; a missing one is fine."""
        self._enter("remove", container_id, force)
        container = self.containers.get(container_id)
        if container is None:
            return
        if container.running and not force:
            raise Conflict(f"cannot remove container {container_id}: it is running")
        del self.containers[container_id]

    def inspect(self, id_or_name: str) -> ContainerInfo | None:
        """What Docker says about it (advancing its engine behaviour), or None."""
        self._enter("inspect", id_or_name)
        container = self._find(id_or_name)
        if container is None:
            return None
        if container.running:
            container.inspects_since_start += 1
            exits_on = container.behaviour.exits_on_inspect
            if exits_on is not None and container.inspects_since_start >= exits_on:
                container.state = "exited"
                container.exit_code = container.behaviour.exit_code
                container.finished_at = utc_now()
        return self._info(container)

    def _info(self, container: FakeContainer) -> ContainerInfo:
        behaviour = container.behaviour
        health = behaviour.health
        if behaviour.healthy_after_inspects is not None:
            ready = container.inspects_since_start >= behaviour.healthy_after_inspects
            health = "healthy" if ready else "starting"
        return ContainerInfo(
            id=container.id,
            name=container.name,
            state=container.state,
            running=container.running,
            owned=galaxy_labels.is_owned(container.labels, self.cluster),
            labels=dict(container.labels),
            image_ref=container.labels.get(galaxy_labels.IMAGE_REF, container.image_ref),
            game_id=container.labels.get(galaxy_labels.GAME_ID, ""),
            exit_code=container.exit_code,
            health=health,
            started_at=container.started_at,
            finished_at=container.finished_at,
            oom_killed=container.oom_killed,
            restart_count=container.restart_count,
            image_id=container.image_id,
            node_id=container.node.id if container.node else "",
            node_hostname=container.node.hostname if container.node else "",
        )

    def owns(self, container_id: str) -> bool | None:
        """Whether it is owned, asked afresh every time (None when it is gone)."""
        self._enter("owns", container_id)
        container = self.containers.get(container_id)
        return None if container is None else galaxy_labels.is_owned(container.labels, self.cluster)

    def list_owned(self) -> list[ContainerInfo]:
        """Every owned container, running or not, as a listing shows it.

        Like Docker's listing, without what only an inspect reports: exit
        code, health and times are None, no OOM kill and no restarts.
        """
        self._enter("list_owned")
        infos = [
            replace(
                self._info(c),
                exit_code=None,
                health=None,
                started_at=None,
                finished_at=None,
                oom_killed=False,
                restart_count=0,
            )
            for c in list(self.containers.values())
        ]
        return [info for info in infos if info.owned]

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """The last `lines` lines of its output (empty when it is gone)."""
        self._enter("logs_tail", container_id, lines)
        container = self.containers.get(container_id)
        if container is None:
            return ""
        return "\n".join(container.logs.splitlines()[-lines:])

    def follow_events(self, since: datetime | None = None) -> EventStream:
        """Not modelled: lifecycle tests do not follow events."""
        raise NotImplementedError("FakeBackend does not stream events")


# --- redis: Lobby's job streams ------------------------------------------------------

START_JOBS = "runtime:start_jobs"
STOP_JOBS = "runtime:stop_jobs"
JOB_RESULTS = "runtime:job_results"
DEAD_LETTER = "runtime:dead_letter"
DELETED_REASON = "the entry was deleted from its stream before it was answered"

_FIRST_MS = 1_700_000_000_000
_tokens = itertools.count(1)


@dataclass
class FakePending:
    """One entry of the group's pending-entries list.

    `consumer` holds it, Redis has handed it out `deliveries` times, the
    last time at `delivered_at` (the fake's clock); its idle time runs from
    then.
    """

    consumer: str
    deliveries: int
    delivered_at: float


@dataclass(frozen=True)
class AnswerAttempt:
    """One call of `JobStreams.answer`: by which consumer, for which job, with what end."""

    consumer: str
    job: LobbyJob
    outcome: AnswerOutcome
    dead_letter: bool


class FakeRedisStreams:
    """The shared state of a fake Redis holding Lobby's job streams.

    One consumer group reads both job streams; its pending-entries list
    says which consumer holds each entry, how often it was delivered and
    since when it is idle. The results and dead-letter streams, the
    answered markers and each consumer's presence (a token with a TTL) live
    here too. `consumer(name)` gives the `FakeJobStreams` view of one named
    consumer; views of different names are replicas, two views of one name
    are a process and its successor (each has its own presence token).

    Idle times and presence TTLs follow `clock` (seconds, like
    `time.monotonic`); `read_new` blocks in real time. Entry ids are
    assigned from one counter across both streams, so the order of the
    `add_job` calls is Lobby's order; an explicit id must exceed the
    stream's last one, as with `XADD`. Results and dead letters are kept
    (trimmed exactly to their lengths) for tests to read. `down = True`
    makes every view raise `ServiceUnavailable`. Thread-safe.
    """

    def __init__(
        self,
        *,
        start_stream: str = START_JOBS,
        stop_stream: str = STOP_JOBS,
        results_stream: str = JOB_RESULTS,
        dead_letter_stream: str = DEAD_LETTER,
        clock: Callable[[], float] = time.monotonic,
        results_maxlen: int = 100_000,
        dead_letter_maxlen: int = 100_000,
    ) -> None:
        self.streams = {JobKind.START: start_stream, JobKind.STOP: stop_stream}
        self.kinds = {start_stream: JobKind.START, stop_stream: JobKind.STOP}
        self.results_stream = results_stream
        self.dead_letter_stream = dead_letter_stream
        self.clock = clock
        self.results_maxlen = results_maxlen
        self.dead_letter_maxlen = dead_letter_maxlen
        self.down = False
        # stream -> entry id -> fields, in id order (XDEL removes the entry).
        self.entries: dict[str, dict[str, dict[bytes, bytes]]] = {
            start_stream: {},
            stop_stream: {},
        }
        self.pending: dict[tuple[str, str], FakePending] = {}
        # How often each entry was delivered, kept after it is acknowledged.
        self.delivery_counts: dict[tuple[str, str], int] = {}
        self.last_delivered: dict[str, tuple[int, int]] = {
            start_stream: (0, 0),
            stop_stream: (0, 0),
        }
        self.group_consumers: dict[str, float] = {}  # name -> last interaction
        self.presence: dict[str, tuple[str, float]] = {}  # name -> (token, expires at)
        self.answered: set[tuple[str, str]] = set()
        self.attempts: list[AnswerAttempt] = []
        self.groups_ensured = 0
        self._results: list[dict[str, str]] = []
        self._dead_letters: list[dict[str, str]] = []
        self._last_added: dict[str, tuple[int, int]] = {
            start_stream: (0, 0),
            stop_stream: (0, 0),
        }
        self._next_ms = _FIRST_MS
        self.lock = threading.Condition(threading.RLock())

    def consumer(self, name: str, *, presence_ttl: timedelta | None = None) -> FakeJobStreams:
        """A new view of consumer `name` (a new process under that name)."""
        return FakeJobStreams(name, self, presence_ttl=presence_ttl or timedelta(seconds=10))

    # -- what Lobby does -------------------------------------------------------------

    def add_job(
        self,
        kind: JobKind,
        fields: Mapping[str, str | bytes] | Mapping[bytes, bytes],
        *,
        entry_id: str | None = None,
    ) -> LobbyJob:
        """Append a job to the `kind` stream (`XADD`); return it with its entry id."""
        stream = self.streams[kind]
        raw = {_raw(key): _raw(value) for key, value in fields.items()}
        with self.lock:
            if entry_id is None:
                entry_id = f"{self._next_ms}-0"
            position = parse_entry_id(entry_id)
            if position <= self._last_added[stream]:
                raise ValueError(f"entry id {entry_id} is not above the last one of {stream}")
            self._last_added[stream] = position
            self._next_ms = max(self._next_ms, position[0]) + 1
            self.entries[stream][entry_id] = raw
            self.lock.notify_all()
        return LobbyJob(kind=kind, stream=stream, entry_id=entry_id)

    def add_start(
        self, game_id: str, image_ref: str, *, entry_id: str | None = None, **extra: str
    ) -> LobbyJob:
        """Append a start job of `game_id` for `image_ref`."""
        return self.add_job(
            JobKind.START, {"game_id": game_id, "image_ref": image_ref, **extra}, entry_id=entry_id
        )

    def add_stop(
        self, game_id: str, reason: str | None = None, *, entry_id: str | None = None
    ) -> LobbyJob:
        """Append a stop job of `game_id` (with `reason`, when given)."""
        fields = {"game_id": game_id} if reason is None else {"game_id": game_id, "reason": reason}
        return self.add_job(JobKind.STOP, fields, entry_id=entry_id)

    def delete_entry(self, job: LobbyJob) -> None:
        """Delete a job's entry from its stream (`XDEL`); its pending entry remains."""
        with self.lock:
            self.entries[job.stream].pop(job.entry_id, None)

    # -- what happens to Redis -------------------------------------------------------

    def redeliver(self, job: LobbyJob, to: str, *, deliveries: int | None = None) -> None:
        """Make `job` pending on consumer `to` again, idle from now.

        As if its acknowledgement were lost, or `to` had taken it before
        dying. `deliveries` sets the delivery count (default: unchanged).
        """
        key = (job.stream, job.entry_id)
        with self.lock:
            count = deliveries if deliveries is not None else self.delivery_counts.get(key, 1)
            self.pending[key] = FakePending(to, count, self.clock())
            self.delivery_counts[key] = count
            self.group_consumers.setdefault(to, self.clock())

    def expire_presence(self, name: str) -> None:
        """Let consumer `name`'s presence expire, as its TTL would."""
        with self.lock:
            self.presence.pop(name, None)

    # -- reading back ----------------------------------------------------------------

    def results(self) -> list[dict[str, str]]:
        """The results stream's entries, oldest first."""
        with self.lock:
            return [dict(fields) for fields in self._results]

    def dead_letters(self) -> list[dict[str, str]]:
        """The dead-letter stream's entries, oldest first."""
        with self.lock:
            return [dict(fields) for fields in self._dead_letters]

    def answers_of(self, job: LobbyJob) -> list[dict[str, str]]:
        """Every answer (result or dead letter) published for `job`."""
        return [
            fields
            for fields in [*self.results(), *self.dead_letters()]
            if (fields.get("stream"), fields.get("job_id")) == (job.stream, job.entry_id)
        ]

    def answer_of(self, job: LobbyJob) -> dict[str, str]:
        """The one answer of `job` (AssertionError unless there is exactly one)."""
        answers = self.answers_of(job)
        assert len(answers) == 1, f"{job}: {answers}"
        return answers[0]

    def answer_count(self) -> int:
        """How many answers were published, results and dead letters together."""
        with self.lock:
            return len(self._results) + len(self._dead_letters)

    def owner_of(self, job: LobbyJob) -> str | None:
        """The consumer `job` is pending on, or None when it is not pending."""
        with self.lock:
            held = self.pending.get((job.stream, job.entry_id))
            return held.consumer if held is not None else None

    def pending_on(self, name: str) -> list[LobbyJob]:
        """The jobs pending on consumer `name`, in Lobby's order."""
        with self.lock:
            jobs = [
                LobbyJob(self.kinds[stream], stream, entry_id)
                for (stream, entry_id), held in self.pending.items()
                if held.consumer == name
            ]
        return sorted(jobs, key=lambda job: job.position)

    def deliveries_of(self, job: LobbyJob) -> int:
        """How often `job` has been delivered (0 before its first delivery)."""
        with self.lock:
            return self.delivery_counts.get((job.stream, job.entry_id), 0)

    def attempts_of(self, job: LobbyJob) -> list[AnswerAttempt]:
        """Every `answer` call made for `job`, in order."""
        with self.lock:
            return [attempt for attempt in self.attempts if attempt.job == job]

    def present(self, name: str) -> bool:
        """Whether consumer `name` has a live presence."""
        with self.lock:
            return self._present(name, self.clock())

    # -- the port's steps, under the lock (called by the views) -------------------------

    def _present(self, name: str, now: float) -> bool:
        held = self.presence.get(name)
        if held is not None and held[1] <= now:
            del self.presence[name]
            held = None
        return held is not None

    def _take_new(self, consumer: str, count: int) -> list[JobEntry]:
        now = self.clock()
        fresh = sorted(
            (
                (LobbyJob(self.kinds[stream], stream, entry_id), fields)
                for stream, items in self.entries.items()
                for entry_id, fields in items.items()
                if parse_entry_id(entry_id) > self.last_delivered[stream]
            ),
            key=lambda item: item[0].position,
        )[:count]
        entries: list[JobEntry] = []
        for job, fields in fresh:
            key = (job.stream, job.entry_id)
            self.pending[key] = FakePending(consumer, 1, now)
            self.delivery_counts[key] = 1
            self.last_delivered[job.stream] = max(
                self.last_delivered[job.stream], parse_entry_id(job.entry_id)
            )
            entries.append(JobEntry(job=job, fields=dict(fields), deliveries=1))
        return entries

    def _claim(self, consumer: str, stream: str, entry_ids: list[str]) -> list[JobEntry]:
        """Hand pending entries to `consumer`, each one more delivery.

        An entry deleted from its stream cannot be applied: it is
        dead-lettered and acknowledged in the same step (like the adapter's
        claim script), so it still gets exactly one answer.
        """
        now = self.clock()
        kind = self.kinds[stream]
        entries: list[JobEntry] = []
        for entry_id in entry_ids:
            key = (stream, entry_id)
            held = self.pending[key]
            fields = self.entries[stream].get(entry_id)
            if fields is None:
                if key not in self.answered:
                    self._publish(
                        dead_letter=True,
                        fields={
                            "stream": stream,
                            "job_id": entry_id,
                            "reason": DELETED_REASON,
                            "deliveries": str(held.deliveries),
                            "fields": "{}",
                        },
                    )
                    self.answered.add(key)
                del self.pending[key]
                continue
            held.consumer = consumer
            held.deliveries += 1
            held.delivered_at = now
            self.delivery_counts[key] = held.deliveries
            entries.append(
                JobEntry(LobbyJob(kind, stream, entry_id), dict(fields), held.deliveries)
            )
        return sorted(entries, key=lambda entry: entry.job.position)

    def _pending_ids(self, stream: str, consumer: str) -> list[str]:
        ids = [
            entry_id
            for (held_stream, entry_id), held in self.pending.items()
            if held_stream == stream and held.consumer == consumer
        ]
        return sorted(ids, key=parse_entry_id)

    def _publish(self, *, dead_letter: bool, fields: Mapping[str, str]) -> None:
        target, maxlen = (
            (self._dead_letters, self.dead_letter_maxlen)
            if dead_letter
            else (self._results, self.results_maxlen)
        )
        target.append(dict(fields))
        del target[: max(len(target) - maxlen, 0)]


class FakeJobStreams:
    """`JobStreams` for consumer `consumer` over a `FakeRedisStreams` (its own by default).

    Keeps the port's contract as the Redis adapter does: `read_new` hands
    out first deliveries in Lobby's order across both streams;
    `redeliver_own` and `claim_abandoned` count a delivery and dead-letter
    (and acknowledge) entries deleted from their stream; only entries of
    consumers without presence, idle for `min_idle`, are claimed; `answer`
    publishes and acknowledges while the entry is pending on this consumer,
    acknowledges without publishing a job answered before, and does nothing
    otherwise. `down = True` makes this view (this process's connection)
    raise `ServiceUnavailable`; `calls` names every call made.
    """

    def __init__(
        self,
        consumer: str = "rtmanager-1",
        redis: FakeRedisStreams | None = None,
        *,
        presence_ttl: timedelta = timedelta(seconds=10),
    ) -> None:
        self.consumer = consumer
        self.redis = redis if redis is not None else FakeRedisStreams()
        self.presence_ttl = presence_ttl
        self.token = f"{consumer}#{next(_tokens)}"
        self.down = False
        self.calls: list[str] = []

    # -- test helpers (the shared state's) --------------------------------------------

    def add_job(
        self,
        kind: JobKind,
        fields: Mapping[str, str | bytes] | Mapping[bytes, bytes],
        *,
        entry_id: str | None = None,
    ) -> LobbyJob:
        """Append a job to the `kind` stream; see `FakeRedisStreams.add_job`."""
        return self.redis.add_job(kind, fields, entry_id=entry_id)

    def results(self) -> list[dict[str, str]]:
        """The results stream's entries, oldest first."""
        return self.redis.results()

    def dead_letters(self) -> list[dict[str, str]]:
        """The dead-letter stream's entries, oldest first."""
        return self.redis.dead_letters()

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        self._require_up(method)

    def _require_up(self, method: str) -> None:
        if self.down or self.redis.down:
            raise ServiceUnavailable(
                f"fake redis: {method}: connection refused", metadata={"dependency": "redis"}
            )

    # -- the port ---------------------------------------------------------------------

    def ensure_groups(self) -> None:
        """The group always exists in the fake; count the call."""
        self._enter("ensure_groups")
        with self.redis.lock:
            self.redis.groups_ensured += 1

    def claim_name(self) -> bool:
        """Take the presence unless another live token holds it (ours counts as taken)."""
        self._enter("claim_name")
        redis = self.redis
        with redis.lock:
            now = redis.clock()
            if redis._present(self.consumer, now):
                return redis.presence[self.consumer][0] == self.token
            redis.presence[self.consumer] = (self.token, now + self.presence_ttl.total_seconds())
            return True

    def keep_name(self) -> bool:
        """Renew the presence while it is live and ours."""
        self._enter("keep_name")
        redis = self.redis
        with redis.lock:
            now = redis.clock()
            if not redis._present(self.consumer, now):
                return False
            if redis.presence[self.consumer][0] != self.token:
                return False
            redis.presence[self.consumer] = (self.token, now + self.presence_ttl.total_seconds())
            return True

    def release_name(self) -> None:
        """Drop the presence if it is still ours."""
        self._enter("release_name")
        redis = self.redis
        with redis.lock:
            held = redis.presence.get(self.consumer)
            if held is not None and held[0] == self.token:
                del redis.presence[self.consumer]

    def redeliver_own(self, kind: JobKind, after: str, count: int) -> builtins.list[JobEntry]:
        """Up to `count` entries of the `kind` stream pending on us with ids > `after`."""
        self._enter("redeliver_own")
        redis = self.redis
        stream = redis.streams[kind]
        floor = parse_entry_id(after) if after else (-1, -1)
        with redis.lock:
            redis.group_consumers[self.consumer] = redis.clock()
            ids = [
                i for i in redis._pending_ids(stream, self.consumer) if parse_entry_id(i) > floor
            ]
            return redis._claim(self.consumer, stream, ids[:count])

    def read_new(self, count: int, block: timedelta) -> builtins.list[JobEntry]:
        """Up to `count` first deliveries in Lobby's order, blocking up to `block` for one."""
        self._enter("read_new")
        redis = self.redis
        deadline = time.monotonic() + block.total_seconds()
        with redis.lock:
            while True:
                redis.group_consumers[self.consumer] = redis.clock()
                entries = redis._take_new(self.consumer, count)
                left = deadline - time.monotonic()
                if entries or left <= 0:
                    return entries
                redis.lock.wait(left)
                self._require_up("read_new")  # the connection broke while blocked

    def claim_abandoned(self, min_idle: timedelta, count: int) -> builtins.list[JobEntry]:
        """Take up to `count` entries idle for `min_idle` on consumers without presence."""
        self._enter("claim_abandoned")
        redis = self.redis
        taken: list[JobEntry] = []
        with redis.lock:
            now = redis.clock()
            redis.group_consumers[self.consumer] = now
            for stream in redis.streams.values():
                owners = sorted({h.consumer for (s, _), h in redis.pending.items() if s == stream})
                for owner in owners:
                    if owner == self.consumer or len(taken) >= count:
                        continue
                    if redis._present(owner, now):
                        continue
                    idle = [
                        entry_id
                        for entry_id in redis._pending_ids(stream, owner)
                        if now - redis.pending[(stream, entry_id)].delivered_at
                        >= min_idle.total_seconds()
                    ]
                    taken += redis._claim(self.consumer, stream, idle[: count - len(taken)])
        return taken

    def answer(
        self, entry: JobEntry, fields: Mapping[str, str], *, dead_letter: bool = False
    ) -> AnswerOutcome:
        """Publish and acknowledge atomically while the entry is ours (see `AnswerOutcome`)."""
        self._enter("answer")
        redis = self.redis
        key = (entry.stream, entry.entry_id)
        with redis.lock:
            held = redis.pending.get(key)
            if key in redis.answered:
                redis.pending.pop(key, None)
                outcome = AnswerOutcome.ALREADY_ANSWERED
            elif held is not None and held.consumer == self.consumer:
                redis._publish(dead_letter=dead_letter, fields=fields)
                redis.answered.add(key)
                del redis.pending[key]
                outcome = AnswerOutcome.ANSWERED
            else:
                outcome = AnswerOutcome.NOT_OURS
            redis.attempts.append(AnswerAttempt(self.consumer, entry.job, outcome, dead_letter))
        return outcome

    def remove_idle_consumers(self, min_idle: timedelta) -> builtins.list[str]:
        """Delete consumers idle for `min_idle`, without presence or pending entries."""
        self._enter("remove_idle_consumers")
        redis = self.redis
        with redis.lock:
            now = redis.clock()
            busy = {held.consumer for held in redis.pending.values()}
            removed = sorted(
                name
                for name, seen in redis.group_consumers.items()
                if name != self.consumer
                and name not in busy
                and not redis._present(name, now)
                and now - seen >= min_idle.total_seconds()
            )
            for name in removed:
                del redis.group_consumers[name]
        return removed

    def lag(self) -> dict[str, int]:
        """Entries of each job stream not yet delivered to the group."""
        self._enter("lag")
        redis = self.redis
        with redis.lock:
            return {
                stream: sum(1 for i in items if parse_entry_id(i) > redis.last_delivered[stream])
                for stream, items in redis.entries.items()
            }

    def pending_jobs(self, game_id: str, scan: int) -> PendingJobs:
        """The game's unacknowledged jobs, pending or undelivered, from a scan bounded by `scan`."""
        self._enter("pending_jobs")
        if scan < 1:
            raise ValueError(f"the scan bound must be at least 1, got {scan}")
        redis = self.redis
        jobs: list[PendingJob] = []
        truncated = False
        with redis.lock:
            now = redis.clock()
            for stream, items in redis.entries.items():
                kind = redis.kinds[stream]
                held = sorted(
                    (entry_id for (s, entry_id) in redis.pending if s == stream),
                    key=parse_entry_id,
                )
                fresh = [i for i in items if parse_entry_id(i) > redis.last_delivered[stream]]
                truncated = truncated or len(held) >= scan or len(fresh) >= scan
                for entry_id in held[:scan]:
                    fields = items.get(entry_id)
                    if fields is None:
                        continue  # deleted while pending: whose it was is unknown
                    pending = redis.pending[(stream, entry_id)]
                    jobs.append(
                        PendingJob(
                            LobbyJob(kind, stream, entry_id),
                            _text_fields(fields),
                            consumer=pending.consumer,
                            deliveries=pending.deliveries,
                            idle=timedelta(seconds=max(now - pending.delivered_at, 0.0)),
                        )
                    )
                for entry_id in fresh[:scan]:
                    jobs.append(
                        PendingJob(LobbyJob(kind, stream, entry_id), _text_fields(items[entry_id]))
                    )
        wanted = [job for job in jobs if job.game_id == game_id]
        return PendingJobs(sorted(wanted, key=lambda job: job.job.position), truncated)


def _text_fields(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _conforms_to_ports() -> None:
    """Checked by mypy only: the fakes implement the ports."""
    if TYPE_CHECKING:
        factory: UnitOfWorkFactory = FakeUnitOfWorkFactory()
        unit: UnitOfWork = FakeUnitOfWork(FakeStore())
        leases: GameLeases = FakeLeases()
        docker: EngineBackend = FakeBackend()
        streams: JobStreams = FakeJobStreams()
        del factory, unit, leases, docker, streams


__all__ = [
    "CRASHES",
    "DEAD_LETTER",
    "DELETED_REASON",
    "HEALTHY",
    "JOB_RESULTS",
    "NEVER_HEALTHY",
    "RUNS",
    "START_JOBS",
    "STOP_JOBS",
    "UNHEALTHY",
    "AnswerAttempt",
    "Call",
    "Commit",
    "EngineBehaviour",
    "FakeBackend",
    "FakeContainer",
    "FakeJobStreams",
    "FakeLeases",
    "FakeOperationLog",
    "FakePending",
    "FakeRedisStreams",
    "FakeRuntimeRecordStore",
    "FakeStore",
    "FakeUnitOfWork",
    "FakeUnitOfWorkFactory",
]
