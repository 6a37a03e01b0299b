"""The one place every lifecycle operation is stamped, audited, measured and logged.

A lifecycle body runs inside `OperationRecorder.run`. It raises
`RuntimeManagerError` for business failures and calls `Operation.commit`
for success. The recorder turns either into an `OperationResult`:

- success: the record change and its operation-log row are written in one
  unit of work, so they commit together or not at all;
- failure: the failure row (with an optional record change) is written in
  its own unit of work; a bug becomes `internal`, never an exception that
  escapes to the caller.

Either way it observes the duration, counts the outcome and writes one
structured log line.

Composite operations (restart, patch, forced cleanup) run inner stops and
starts, begun with `begin_inner(outer, kind)`. The inner rows commit before
the outer row, so the outer row's id is drawn from the log
(`OperationLog.reserve_id`) when its first inner step begins, and each inner
row names it (`parent_op_kind`, `parent_operation_id`); the outer row is then
appended with that id. Once an inner step has put an event on the feed, the
outer row puts one there too, whether or not it changes the record (the
record as it stands then): a watcher that saw a restart's inner stop sees
the restart end, successfully or not.

An operation that applies a Lobby job (`Operation.job`) also keeps the
game's job watermark (SPEC §4): the body calls `check_job` under the game's
lease, which ends the operation with no audit row when the job is already
settled (`JobSettled`: the job itself was applied before, or a newer one
was); every final outcome advances the watermark in the same transaction as
its audit row. A transient failure (a busy lease, an outage) leaves the
watermark alone, so the job can be retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from rtmanager.deadlines import bounded
from rtmanager.domain.errors import (
    ConcurrentModification,
    ErrorCode,
    Failure,
    InternalError,
    InvalidRequest,
    NotFound,
    RuntimeManagerError,
)
from rtmanager.domain.ids import parse_game_id, parse_source_ref
from rtmanager.domain.jobs import JobMark, LobbyJob
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.domain.timeutil import utc_now
from rtmanager.ports import UnitOfWork, UnitOfWorkFactory
from rtmanager.telemetry import Telemetry

T = TypeVar("T")

log = logging.getLogger("rtmanager.operations")

# Returns the record after the change, or None when nothing changed.
RecordChange = Callable[[UnitOfWork], RuntimeRecord | None]
CommitListener = Callable[[OperationEntry, RuntimeRecord | None], None]

_MAX_MESSAGE = 4000
DEFAULT_DB_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class OperationResult:
    """The outcome of one lifecycle operation."""

    game_id: str
    op_kind: OpKind
    outcome: Outcome
    record: RuntimeRecord | None = None
    failure: Failure | None = None
    operation_id: int = 0
    # The newer Lobby job that settled this operation's job; nothing was done.
    superseded_by: LobbyJob | None = None
    # The job was applied before (its stored outcome is repeated here).
    replayed: bool = False
    # The failure could not be written to the database (it is lost).
    unrecorded: bool = False

    @property
    def ok(self) -> bool:
        """True when the operation succeeded."""
        return self.outcome is Outcome.SUCCESS


class JobSettled(Exception):
    """The operation's Lobby job must not be applied: `mark` settled it already.

    Raised by `OperationRecorder.check_job` under the game's lease; `record`
    is the game's record at that moment (None when it has none).
    """

    def __init__(self, mark: JobMark, record: RuntimeRecord | None) -> None:
        super().__init__(f"Lobby job settled by {mark.job}")
        self.mark = mark
        self.record = record


@dataclass
class Operation:
    """One operation in flight; what its audit row will say."""

    recorder: OperationRecorder
    game_id: str
    op_kind: OpKind
    op_source: OpSource
    source_ref: str
    image_ref: str
    started_at: datetime
    started_monotonic: float
    container_id: str = ""
    # The Lobby job this operation applies, if it came from the job streams.
    job: LobbyJob | None = None
    # Extra context for the operation's log line (the stop reason, ...).
    log_fields: dict[str, str] = field(default_factory=dict)
    # The composite operation this one is an inner step of.
    parent: Operation | None = None
    # This operation's row id, drawn when its first inner step began (0: none).
    reserved_id: int = 0
    # An inner step of this operation put an event on the feed: so does its row.
    inner_events: bool = False

    def commit(
        self,
        change: RecordChange | None = None,
        *,
        record: RuntimeRecord | None = None,
    ) -> OperationResult:
        """Write the record change and the success row in one transaction.

        `change` runs inside the unit of work and returns the record after
        the change, which also goes to the event feed; without it nothing but
        the audit row is written and `record` is what the result reports.
        Raises `RuntimeManagerError` when the transaction fails (nothing is
        committed then), so the body can undo its Docker side effects before
        failing; raises `JobSettled` (nothing committed either) when the
        game's watermark passed this operation's job meanwhile.
        """
        overtaken = False
        with self.recorder.units_of_work(timeout=self.recorder.db_timeout) as uow:
            changed = change(uow) if change is not None else None
            record = changed or record
            entry = self._append(uow, Outcome.SUCCESS)
            published = self._publish(uow, entry, changed)
            # A newer job of the game applied meanwhile: ours must not land.
            overtaken = self.job is not None and not uow.job_marks.advance(self._mark(entry))
            if not overtaken:
                if self.recorder.lease_check is not None:
                    self.recorder.lease_check(self.game_id)
                uow.commit()
        if overtaken:
            raise self.recorder._settled_by_mark(self) or ConcurrentModification(
                f"the Lobby job watermark of game {self.game_id} moved during the operation"
            )
        self._published(published)
        self.recorder.committed(entry, record)
        return OperationResult(
            self.game_id, self.op_kind, Outcome.SUCCESS, record=record, operation_id=entry.id
        )

    def _append(
        self, uow: UnitOfWork, outcome: Outcome, failure: Failure | None = None
    ) -> OperationEntry:
        """Append this operation's row (with its reserved id, if it has one)."""
        return uow.operations.append(self._entry(outcome, failure), reserved_id=self.reserved_id)

    def _publish(
        self, uow: UnitOfWork, entry: OperationEntry, changed: RuntimeRecord | None
    ) -> RuntimeRecord | None:
        """Put the row's event on the feed: the changed record, or, for an outer
        operation whose inner steps put events there, the record as it stands.

        Read locked, so no other change of the record can commit between this
        read and this event (the event would then carry an older record than
        the event before it).
        """
        published = changed
        if published is None and self.inner_events:
            published = uow.records.get_for_update(self.game_id)
        if published is not None:
            uow.events.append(entry, published)
        return published

    def _published(self, published: RuntimeRecord | None) -> None:
        """After the commit: an inner step's event obliges its parent to publish one."""
        if published is not None and self.parent is not None:
            self.parent.inner_events = True

    def _mark(self, entry: OperationEntry) -> JobMark:
        """The watermark of this operation's job, ending as `entry` says."""
        assert self.job is not None
        return JobMark(
            game_id=self.game_id,
            job=self.job,
            outcome=entry.outcome,
            applied_at=entry.finished_at or entry.started_at,
            error_code=ErrorCode(entry.error_code) if entry.error_code else None,
            error_message=entry.error_message,
            operation_id=entry.id,
        )

    def _entry(self, outcome: Outcome, failure: Failure | None = None) -> OperationEntry:
        finished = max(self.recorder.clock(), self.started_at)
        return OperationEntry(
            game_id=self.game_id,
            op_kind=self.op_kind,
            op_source=self.op_source,
            outcome=outcome,
            started_at=self.started_at,
            finished_at=finished,
            source_ref=self.source_ref,
            image_ref=self.image_ref,
            container_id=self.container_id,
            error_code=str(failure.code) if failure else "",
            error_message=failure.message[:_MAX_MESSAGE] if failure else "",
            parent_op_kind=self.parent.op_kind if self.parent else None,
            parent_operation_id=self.parent.reserved_id if self.parent else 0,
        )


class OperationRecorder:
    """Runs lifecycle bodies and records their outcome (see module docstring)."""

    def __init__(
        self,
        units_of_work: UnitOfWorkFactory,
        telemetry: Telemetry,
        *,
        clock: Callable[[], datetime] = utc_now,
        db_timeout: timedelta = DEFAULT_DB_TIMEOUT,
        lease_check: Callable[[str], None] | None = None,
    ) -> None:
        self.units_of_work = units_of_work
        # Raises unless this process still holds the game's lease (when it
        # holds one): no change is committed by an operation that lost it.
        self.lease_check = lease_check
        self.telemetry = telemetry
        self.clock = clock
        self.db_timeout = db_timeout
        self._listeners: list[CommitListener] = []

    def unit_of_work(self) -> UnitOfWork:
        """A unit of work for reads, bounded by the caller's deadline."""
        return self.units_of_work(timeout=bounded(self.db_timeout))

    def read(self, work: Callable[[UnitOfWork], T]) -> T:
        """Run `work`, a read of a single statement, bounded by the caller's
        deadline: one round trip, no transaction (`UnitOfWorkFactory.read`)."""
        return self.units_of_work.read(work, timeout=bounded(self.db_timeout))

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener(entry, record)` after every committed operation."""
        self._listeners.append(listener)

    def begin(
        self,
        *,
        game_id: str,
        op_kind: OpKind,
        op_source: OpSource,
        source_ref: str = "",
        image_ref: str = "",
        job: LobbyJob | None = None,
    ) -> Operation:
        """Start timing an operation."""
        return Operation(
            recorder=self,
            game_id=game_id,
            op_kind=op_kind,
            op_source=op_source,
            source_ref=source_ref,
            image_ref=image_ref,
            started_at=self.clock(),
            started_monotonic=time.monotonic(),
            job=job,
        )

    def begin_inner(self, parent: Operation, op_kind: OpKind, *, image_ref: str = "") -> Operation:
        """Start timing an inner step of `parent` (its game, source and source_ref).

        Draws the parent's row id first, unless an earlier inner step did, so
        the step's row can name it; raises `ServiceUnavailable` when the
        database cannot be reached for that.
        """
        if parent.reserved_id == 0:
            # Not `units_of_work.read`: drawing from a sequence is a write, and a
            # read-only transaction refuses it. Nothing to commit either way.
            with self.unit_of_work() as uow:
                parent.reserved_id = uow.operations.reserve_id()
        operation = self.begin(
            game_id=parent.game_id,
            op_kind=op_kind,
            op_source=parent.op_source,
            source_ref=parent.source_ref,
            image_ref=image_ref,
        )
        operation.parent = parent
        return operation

    def admit(
        self,
        *,
        game_id: str,
        op_kind: OpKind,
        op_source: OpSource,
        source_ref: str = "",
        image_ref: str = "",
        job: LobbyJob | None = None,
    ) -> Operation | OperationResult:
        """Begin an operation, or reject a request whose game id or source_ref cannot be stored.

        A rejection is returned as a failed result with no audit row.
        """
        try:
            parse_game_id(game_id)
            parse_source_ref(source_ref)
        except InvalidRequest as error:
            return self.reject(
                game_id=str(game_id),
                op_kind=op_kind,
                op_source=op_source,
                failure=error.to_failure(),
            )
        return self.begin(
            game_id=game_id,
            op_kind=op_kind,
            op_source=op_source,
            source_ref=source_ref,
            image_ref=image_ref,
            job=job,
        )

    def reject(
        self, *, game_id: str, op_kind: OpKind, op_source: OpSource, failure: Failure
    ) -> OperationResult:
        """Report a request refused before any I/O (a game id that cannot be stored).

        No audit row is written: the game id itself is what is invalid.
        """
        operation = self.begin(game_id=game_id[:64], op_kind=op_kind, op_source=op_source)
        result = OperationResult(operation.game_id, op_kind, Outcome.FAILURE, failure=failure)
        self._finished(operation, result)
        return result

    def run(
        self,
        operation: Operation,
        body: Callable[[Operation], OperationResult],
        *,
        on_failure: RecordChange | None = None,
    ) -> OperationResult:
        """Run `body`; record its failure, if any, with `on_failure` applied in the same commit.

        A body that takes the game's lease runs its work through `attempt`
        inside the lease, so a failure is recorded (and a job's watermark
        advanced) before the lease is released; what reaches `run` itself
        is then only a failure to take the lease, or one before it.
        """
        result = self.attempt(operation, body, on_failure=on_failure)
        if result.superseded_by is None and not result.replayed:
            self._finished(operation, result)
        return result

    def attempt(
        self,
        operation: Operation,
        body: Callable[[Operation], OperationResult],
        *,
        on_failure: RecordChange | None = None,
    ) -> OperationResult:
        """Run `body` and record its failure, if any; never raises.

        Called under the game's lease, it settles the operation before the
        lease is released: another replica that takes the lease next sees
        the failure row, the record change and the job watermark it wrote.
        """
        try:
            return body(operation)
        except JobSettled as settled:
            return self._settled(operation, settled)
        except RuntimeManagerError as error:
            return self.fail(operation, error.to_failure(), change=on_failure)
        except Exception as error:
            log.exception("bug in %s of game %s", operation.op_kind, operation.game_id)
            failure = InternalError(f"internal error: {type(error).__name__}").to_failure()
            return self.fail(operation, failure, change=on_failure)

    def check_job(self, operation: Operation) -> None:
        """Raise `JobSettled` when the operation's Lobby job must not be applied.

        Call it while holding the game's lease, before acting: the job is
        settled when the game's watermark is that job (applied before, its
        answer lost in a crash) or a newer one (Lobby's later word wins).
        """
        settled = self._settled_by_mark(operation)
        if settled is not None:
            raise settled

    def _settled_by_mark(self, operation: Operation) -> JobSettled | None:
        """`JobSettled` when the game's watermark settles the operation's job, else None."""
        if operation.job is None:
            return None
        # One round trip for every job; a settled one (rare) reads its record too.
        mark = self.read(lambda uow: uow.job_marks.get(operation.game_id))
        if mark is None or not mark.settles(operation.job):
            return None
        return JobSettled(mark, self.read(lambda uow: load_record(uow, operation.game_id)))

    def _settled(self, operation: Operation, settled: JobSettled) -> OperationResult:
        """The result of a job found settled: nothing was done, nothing is audited."""
        mark = settled.mark
        fields = {
            "game_id": operation.game_id,
            "op_kind": str(operation.op_kind),
            "source_ref": operation.source_ref,
            "settled_by": str(mark.job),
        }
        if mark.job == operation.job:
            log.info("Lobby job was applied before; repeating its outcome", extra=fields)
            return OperationResult(
                operation.game_id,
                operation.op_kind,
                mark.outcome,
                record=settled.record,
                failure=mark.failure,
                operation_id=mark.operation_id,
                replayed=True,
            )
        log.info("Lobby job superseded by a newer job of its game", extra=fields)
        return OperationResult(
            operation.game_id,
            operation.op_kind,
            Outcome.SUCCESS,
            record=settled.record,
            superseded_by=mark.job,
        )

    def fail(
        self, operation: Operation, failure: Failure, *, change: RecordChange | None = None
    ) -> OperationResult:
        """Write the failure row (and `change`, if any) in one transaction; never raises.

        A Lobby job's transient failure that changed nothing writes no row:
        the job is retried (for minutes, if its game stays busy) and may end
        superseded, which leaves no trace in the operation log.
        """
        record: RuntimeRecord | None = None
        entry: OperationEntry | None = None
        published: RuntimeRecord | None = None
        # A lost lease is audited even for a job: it may have acted on Docker.
        quiet = (
            operation.job is not None
            and failure.transient
            and failure.metadata.get("lease") != "lost"
        )
        try:
            with self.units_of_work(timeout=self.db_timeout) as uow:
                if change is not None and self._lease_still_held(operation):
                    record = change(uow)
                if quiet and record is None:
                    return OperationResult(
                        operation.game_id, operation.op_kind, Outcome.FAILURE, failure=failure
                    )
                entry = operation._append(uow, Outcome.FAILURE, failure)
                published = operation._publish(uow, entry, record)
                if operation.job is not None and not failure.transient:
                    uow.job_marks.advance(operation._mark(entry))
                uow.commit()
            operation._published(published)
        except Exception as error:
            # The database is what failed (or the change broke a rule): the
            # caller still gets the original failure; the row is lost.
            log.error(
                "could not record failed operation",
                extra={
                    "game_id": operation.game_id,
                    "op_kind": str(operation.op_kind),
                    "error_code": str(failure.code),
                    "problem": str(error),
                },
            )
            record, entry = None, None
        if entry is not None:
            self.committed(entry, record)
        return OperationResult(
            operation.game_id,
            operation.op_kind,
            Outcome.FAILURE,
            record=record,
            failure=failure,
            operation_id=entry.id if entry else 0,
            unrecorded=entry is None,
        )

    def _lease_still_held(self, operation: Operation) -> bool:
        """Whether a failure's record change may still be written (the lease is ours)."""
        if self.lease_check is None:
            return True
        try:
            self.lease_check(operation.game_id)
        except RuntimeManagerError:
            return False
        return True

    def committed(self, entry: OperationEntry, record: RuntimeRecord | None) -> None:
        """Tell listeners about a committed operation (their errors are logged, not raised)."""
        for listener in self._listeners:
            try:
                listener(entry, record)
            except Exception:
                log.exception("commit listener failed")

    def _finished(self, operation: Operation, result: OperationResult) -> None:
        seconds = time.monotonic() - operation.started_monotonic
        code = str(result.failure.code) if result.failure else ""
        self.telemetry.operation_finished(
            kind=str(operation.op_kind),
            source=str(operation.op_source),
            outcome=str(result.outcome),
            error_code=code,
            seconds=seconds,
        )
        fields = {
            "game_id": operation.game_id,
            "op_kind": str(operation.op_kind),
            "op_source": str(operation.op_source),
            "source_ref": operation.source_ref,
            "outcome": str(result.outcome),
            "container_id": operation.container_id,
            "image_ref": operation.image_ref,
            "duration_ms": round(seconds * 1000, 1),
            "operation_id": result.operation_id,
            **operation.log_fields,
        }
        if operation.parent is not None:
            fields["parent_op_kind"] = str(operation.parent.op_kind)
            fields["parent_operation_id"] = operation.parent.reserved_id
        if result.failure is None:
            log.info("operation succeeded", extra=fields)
        else:
            fields["error_code"] = code
            fields["error_message"] = result.failure.message
            level = logging.ERROR if result.failure.code is ErrorCode.INTERNAL else logging.WARNING
            log.log(level, "operation failed", extra=fields)


def load_record(uow: UnitOfWork, game_id: str) -> RuntimeRecord | None:
    """The game's record, or None when there is none."""
    try:
        return uow.records.get(game_id)
    except NotFound:
        return None
