"""`OperationRecorder`: the one place operations are stamped, audited, measured and logged."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

import pytest

from rtmanager.domain.errors import (
    ConcurrentModification,
    ErrorCode,
    Failure,
    ImagePullFailed,
    NotFound,
)
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.recorder import (
    DEFAULT_DB_TIMEOUT,
    Operation,
    OperationRecorder,
    OperationResult,
    RecordChange,
)
from rtmanager.ports import UnitOfWork
from rtmanager.telemetry import Telemetry
from tests.unit.fakes import FakeStore, FakeUnitOfWorkFactory

GAME = "game-1"


class SpyTelemetry(Telemetry):
    """Telemetry that remembers every finished operation."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[dict[str, object]] = []

    def operation_finished(
        self, *, kind: str, source: str, outcome: str, error_code: str, seconds: float
    ) -> None:
        self.finished.append(
            {"kind": kind, "source": source, "outcome": outcome, "error_code": error_code}
        )
        assert seconds >= 0


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def units(store: FakeStore) -> FakeUnitOfWorkFactory:
    return FakeUnitOfWorkFactory(store)


@pytest.fixture
def telemetry() -> SpyTelemetry:
    return SpyTelemetry()


@pytest.fixture
def recorder(units: FakeUnitOfWorkFactory, telemetry: SpyTelemetry) -> OperationRecorder:
    return OperationRecorder(units, telemetry)


def begin(recorder: OperationRecorder, source_ref: str = "ref-1") -> Operation:
    return recorder.begin(
        game_id=GAME,
        op_kind=OpKind.STOP,
        op_source=OpSource.ADMIN_REST,
        source_ref=source_ref,
        image_ref="galaxy/engine:1.0.0",
    )


def a_record(game_id: str = GAME) -> RuntimeRecord:
    now = utc_now()
    return RuntimeRecord(
        game_id=game_id,
        status=RuntimeStatus.STOPPED,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/games/{game_id}",
        docker_network="galaxy-engines",
        last_op_at=now,
        created_at=now - timedelta(hours=1),
        current_container_id="c" * 64,
        current_image_ref="galaxy/engine:1.0.0",
        started_at=now - timedelta(minutes=30),
        stopped_at=now,
    )


def upsert(record: RuntimeRecord) -> RecordChange:
    """A record change that writes `record`."""

    def change(uow: UnitOfWork) -> RuntimeRecord:
        uow.records.upsert(record)
        return record

    return change


# --- success ------------------------------------------------------------------------


def test_success_row_and_record_change_commit_together(
    recorder: OperationRecorder, store: FakeStore, units: FakeUnitOfWorkFactory
) -> None:
    record = a_record()

    result = recorder.run(begin(recorder), lambda op: op.commit(upsert(record)))

    assert result.ok
    assert result.record == record
    assert store.record(GAME) == record
    (commit,) = units.commits()
    assert commit.records == (record,)
    (row,) = commit.operations
    assert result.operation_id == row.id
    assert (row.op_kind, row.op_source, row.outcome) == (
        OpKind.STOP,
        OpSource.ADMIN_REST,
        Outcome.SUCCESS,
    )
    assert (row.source_ref, row.image_ref) == ("ref-1", "galaxy/engine:1.0.0")
    assert row.finished_at is not None and row.finished_at >= row.started_at


def test_success_row_carries_the_container_id_the_body_set(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    def body(op: Operation) -> OperationResult:
        op.container_id = "abc123"
        return op.commit()

    recorder.run(begin(recorder), body)

    assert store.entries()[0].container_id == "abc123"


def test_commit_without_change_writes_only_the_row_and_reports_the_given_record(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    record = a_record()

    result = recorder.run(begin(recorder), lambda op: op.commit(record=record))

    assert result.record == record
    assert store.records == {}
    assert len(store.entries()) == 1


def test_record_change_is_not_committed_when_the_success_row_cannot_be_appended(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    store.fail_next_appends(1)

    result = recorder.run(begin(recorder), lambda op: op.commit(upsert(a_record())))

    assert not result.ok
    assert result.failure is not None and result.failure.code is ErrorCode.SERVICE_UNAVAILABLE
    assert store.records == {}
    # The failure row is written in a unit of work of its own.
    assert [(e.outcome, e.error_code) for e in store.entries()] == [
        (Outcome.FAILURE, "service_unavailable")
    ]


def test_failed_commit_raises_so_the_body_can_undo_its_side_effects(
    recorder: OperationRecorder, units: FakeUnitOfWorkFactory, store: FakeStore
) -> None:
    undone: list[str] = []
    units.fail_next(at="commit")

    def body(op: Operation) -> OperationResult:
        try:
            return op.commit(upsert(a_record()))
        except Exception:
            undone.append("container removed")
            raise

    result = recorder.run(begin(recorder), body)

    assert undone == ["container removed"]
    assert result.failure is not None and result.failure.code is ErrorCode.SERVICE_UNAVAILABLE
    assert store.records == {}


def test_record_change_breaking_a_cas_guard_commits_nothing_but_the_failure_row(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    def change(uow: UnitOfWork) -> RuntimeRecord:
        uow.records.upsert(a_record())
        raise ConcurrentModification("record changed meanwhile")

    result = recorder.run(begin(recorder), lambda op: op.commit(change))

    assert result.failure is not None
    assert (result.failure.code, result.failure.race) == (ErrorCode.CONFLICT, True)
    assert store.records == {}
    assert [e.outcome for e in store.entries()] == [Outcome.FAILURE]


# --- failure ------------------------------------------------------------------------


def test_failure_row_carries_the_error_code_and_message(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    def body(op: Operation) -> OperationResult:
        op.container_id = "abc123"
        raise ImagePullFailed("pull of galaxy/engine:1.0.0 failed: manifest unknown")

    result = recorder.run(begin(recorder), body)

    assert result.outcome is Outcome.FAILURE
    assert result.failure == Failure(
        ErrorCode.IMAGE_PULL_FAILED, "pull of galaxy/engine:1.0.0 failed: manifest unknown"
    )
    (row,) = store.entries()
    assert result.operation_id == row.id
    assert row.outcome is Outcome.FAILURE
    assert row.error_code == "image_pull_failed"
    assert row.error_message == "pull of galaxy/engine:1.0.0 failed: manifest unknown"
    assert row.container_id == "abc123"
    assert row.source_ref == "ref-1"


def test_failure_message_in_the_row_is_truncated(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    def body(op: Operation) -> OperationResult:
        raise NotFound("x" * 10_000)

    result = recorder.run(begin(recorder), body)

    assert len(store.entries()[0].error_message) == 4000
    assert result.failure is not None and len(result.failure.message) == 10_000


def test_failure_change_commits_together_with_the_failure_row(
    recorder: OperationRecorder, store: FakeStore, units: FakeUnitOfWorkFactory
) -> None:
    record = a_record()

    def body(op: Operation) -> OperationResult:
        raise NotFound("gone")

    result = recorder.run(begin(recorder), body, on_failure=upsert(record))

    assert result.record == record
    assert store.record(GAME) == record
    (commit,) = units.commits()
    assert commit.records == (record,)
    assert [e.outcome for e in commit.operations] == [Outcome.FAILURE]


def test_unexpected_exception_in_a_body_becomes_an_internal_result(
    recorder: OperationRecorder, store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    def body(op: Operation) -> OperationResult:
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR, logger="rtmanager.operations"):
        result = recorder.run(begin(recorder), body)

    assert result.failure is not None
    assert result.failure.code is ErrorCode.INTERNAL
    assert "KeyError" in result.failure.message
    assert [e.error_code for e in store.entries()] == ["internal"]
    assert any("bug in stop of game game-1" in r.getMessage() for r in caplog.records)


def test_failure_when_the_database_is_down_still_returns_the_result_and_logs_the_lost_row(
    recorder: OperationRecorder,
    store: FakeStore,
    units: FakeUnitOfWorkFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    units.down = True

    def body(op: Operation) -> OperationResult:
        raise ImagePullFailed("registry down")

    with caplog.at_level(logging.ERROR, logger="rtmanager.operations"):
        result = recorder.run(begin(recorder), body, on_failure=upsert(a_record()))

    assert result.failure == Failure(ErrorCode.IMAGE_PULL_FAILED, "registry down")
    assert result.record is None
    assert result.operation_id == 0
    assert store.entries() == [] and store.records == {}
    lost = [r for r in caplog.records if r.getMessage() == "could not record failed operation"]
    assert len(lost) == 1
    assert lost[0].error_code == "image_pull_failed"  # type: ignore[attr-defined]


def test_failure_change_breaking_a_rule_loses_the_row_but_keeps_the_original_failure(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    def bad_change(uow: UnitOfWork) -> RuntimeRecord:
        broken = replace(a_record(), stopped_at=None)
        uow.records.upsert(broken)
        return broken

    def body(op: Operation) -> OperationResult:
        raise NotFound("gone")

    result = recorder.run(begin(recorder), body, on_failure=bad_change)

    assert result.failure is not None and result.failure.code is ErrorCode.NOT_FOUND
    assert store.entries() == [] and store.records == {}


def test_fail_never_raises(recorder: OperationRecorder, units: FakeUnitOfWorkFactory) -> None:
    units.fail_next(at="commit")

    result = recorder.fail(begin(recorder), Failure(ErrorCode.CONFLICT, "busy", race=True))

    assert result.failure == Failure(ErrorCode.CONFLICT, "busy", race=True)


# --- listeners ----------------------------------------------------------------------


def test_listeners_are_called_after_commit_with_the_entry_and_the_record(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    seen: list[tuple[OperationEntry, RuntimeRecord | None, bool]] = []

    def listener(entry: OperationEntry, record: RuntimeRecord | None) -> None:
        seen.append((entry, record, entry in store.entries()))

    recorder.add_listener(listener)
    record = a_record()

    recorder.run(begin(recorder), lambda op: op.commit(upsert(record)))

    ((entry, got, committed),) = seen
    assert committed, "the listener ran before the commit"
    assert got == record
    assert entry == store.entries()[0]


def test_listeners_hear_about_committed_failures_too(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    seen: list[OperationEntry] = []
    recorder.add_listener(lambda entry, record: seen.append(entry))

    def body(op: Operation) -> OperationResult:
        raise NotFound("gone")

    recorder.run(begin(recorder), body)

    assert seen == store.entries()
    assert seen[0].outcome is Outcome.FAILURE


def test_listeners_are_not_called_when_nothing_was_committed(
    recorder: OperationRecorder, units: FakeUnitOfWorkFactory
) -> None:
    seen: list[OperationEntry] = []
    recorder.add_listener(lambda entry, record: seen.append(entry))
    units.down = True

    recorder.run(begin(recorder), lambda op: op.commit())

    assert seen == []


def test_a_failing_listener_does_not_fail_the_operation_or_other_listeners(
    recorder: OperationRecorder, store: FakeStore
) -> None:
    seen: list[OperationEntry] = []

    def broken(entry: OperationEntry, record: RuntimeRecord | None) -> None:
        raise RuntimeError("subscriber gone")

    recorder.add_listener(broken)
    recorder.add_listener(lambda entry, record: seen.append(entry))

    result = recorder.run(begin(recorder), lambda op: op.commit())

    assert result.ok
    assert seen == store.entries()
    assert [e.outcome for e in store.entries()] == [Outcome.SUCCESS]


# --- reject, telemetry, timeouts ----------------------------------------------------


def test_reject_writes_no_row_and_opens_no_unit_of_work(
    recorder: OperationRecorder, units: FakeUnitOfWorkFactory, telemetry: SpyTelemetry
) -> None:
    failure = Failure(ErrorCode.INVALID_REQUEST, "game_id '../etc' is invalid")

    result = recorder.reject(
        game_id="../etc", op_kind=OpKind.START, op_source=OpSource.LOBBY_STREAM, failure=failure
    )

    assert result == OperationResult("../etc", OpKind.START, Outcome.FAILURE, failure=failure)
    assert units.units == []
    assert telemetry.finished == [
        {
            "kind": "start",
            "source": "lobby_stream",
            "outcome": "failure",
            "error_code": "invalid_request",
        }
    ]


def test_reject_of_a_huge_game_id_reports_a_shortened_one(recorder: OperationRecorder) -> None:
    result = recorder.reject(
        game_id="x" * 5000,
        op_kind=OpKind.STOP,
        op_source=OpSource.ADMIN_REST,
        failure=Failure(ErrorCode.INVALID_REQUEST, "bad"),
    )

    assert len(result.game_id) == 64


def test_every_finished_operation_is_counted_with_its_outcome_and_code(
    recorder: OperationRecorder, telemetry: SpyTelemetry
) -> None:
    def failing(op: Operation) -> OperationResult:
        raise NotFound("gone")

    recorder.run(begin(recorder), lambda op: op.commit())
    recorder.run(begin(recorder), failing)

    assert [(f["outcome"], f["error_code"]) for f in telemetry.finished] == [
        ("success", ""),
        ("failure", "not_found"),
    ]
    assert {f["kind"] for f in telemetry.finished} == {"stop"}


def test_units_of_work_are_bounded_by_the_database_timeout(
    recorder: OperationRecorder, units: FakeUnitOfWorkFactory
) -> None:
    with recorder.unit_of_work():
        pass
    recorder.run(begin(recorder), lambda op: op.commit())

    assert [u.timeout for u in units.units] == [DEFAULT_DB_TIMEOUT, DEFAULT_DB_TIMEOUT]


def test_operation_is_stamped_with_the_recorder_clock(units: FakeUnitOfWorkFactory) -> None:
    start = utc_now() - timedelta(minutes=5)
    ticks = iter([start, start + timedelta(seconds=3)])
    recorder = OperationRecorder(units, Telemetry(), clock=lambda: next(ticks))

    recorder.run(begin(recorder), lambda op: op.commit())

    (row,) = units.store.entries()
    assert (row.started_at, row.finished_at) == (start, start + timedelta(seconds=3))


def test_finished_at_is_never_before_started_at_when_the_clock_steps_back(
    units: FakeUnitOfWorkFactory,
) -> None:
    start = utc_now()
    ticks = iter([start, start - timedelta(seconds=3)])
    recorder = OperationRecorder(units, Telemetry(), clock=lambda: next(ticks))

    result = recorder.run(begin(recorder), lambda op: op.commit())

    assert result.ok
    assert units.store.entries()[0].finished_at == start
