"""The persistence ports: runtime records, the operation log, the outbox of
record changes and the Lobby job marks, written together by one unit of work."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from rtmanager.domain.jobs import JobMark
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

    def append(self, operation: OperationEntry, record: RuntimeRecord) -> None:
        """Add the change `operation` made (the record after it) to the commit.

        The event is written by the unit of work's `commit()`, after every
        other statement of the transaction; leaving the block without
        committing discards it. The feed reads the operation's kind, source,
        outcome, source_ref and parent from its operation-log row, appended
        first in the same unit of work.

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
        """Commit everything written in this unit of work, its events last."""
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
