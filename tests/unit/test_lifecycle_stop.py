"""Stop (SPEC §3 Stop) against in-memory fakes: every branch of `StopService`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rtmanager.domain import labels
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.stop import StopRequest
from tests.unit.fakes import Call
from tests.unit.harness import IMAGE, STOP_TIMEOUT, Harness, failure_code

GAME = "game-1"


def stop(h: Harness, game_id: str = GAME, source_ref: str = "") -> OperationResult:
    return h.stop.handle(
        StopRequest(
            game_id=game_id,
            op_source=OpSource.GM_REST,
            reason=StopReason.GAME_FINISHED,
            source_ref=source_ref,
        )
    )


def test_stop_of_unknown_game_is_not_found(h: Harness) -> None:
    result = stop(h)

    assert failure_code(result) == ErrorCode.NOT_FOUND
    assert h.docker.calls == []
    row = h.only_row(GAME)
    assert (row.op_kind, row.outcome, row.error_code) == (OpKind.STOP, Outcome.FAILURE, "not_found")
    assert h.leases.all_released


def test_stop_of_removed_runtime_is_conflict(h: Harness) -> None:
    before = h.seed_removed(GAME)

    result = stop(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and not result.failure.race
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []
    assert h.only_row(GAME).error_code == "conflict"


def test_stop_of_stopped_runtime_is_idempotent_success_without_docker_stop(h: Harness) -> None:
    before = h.seed_stopped(GAME)

    result = stop(h, source_ref="again")

    assert result.ok
    assert result.record == before
    assert h.record(GAME) == before
    assert h.docker.calls == []
    row = h.only_row(GAME)
    assert (row.outcome, row.source_ref, row.container_id) == (
        Outcome.SUCCESS,
        "again",
        before.current_container_id,
    )


def test_stop_of_running_runtime_stops_container_with_configured_timeout_and_records_stopped(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    container_id = before.current_container_id

    result = stop(h)

    assert result.ok, result.failure
    assert h.docker.method_calls("stop")[0].args == (container_id, STOP_TIMEOUT)
    assert not h.docker.containers[container_id].running
    record = h.record(GAME)
    assert record == result.record
    assert record.status is RuntimeStatus.STOPPED
    assert record.current_container_id == container_id
    assert record.stopped_at is not None and record.stopped_at == record.last_op_at
    assert record.started_at == before.started_at
    assert record.created_at == before.created_at


def test_stop_keeps_the_container_for_a_later_start(h: Harness) -> None:
    before = h.seed_running(GAME)

    stop(h)

    assert h.docker.call_names("remove") == []
    assert before.current_container_id in h.docker.containers


def test_stop_commits_the_record_and_its_success_row_together(h: Harness) -> None:
    before = h.seed_running(GAME)

    result = stop(h, source_ref="req-7")

    (commit,) = h.units_of_work.commits()
    assert [r.status for r in commit.records] == [RuntimeStatus.STOPPED]
    (row,) = commit.operations
    assert row.id == result.operation_id
    assert row.op_kind is OpKind.STOP
    assert row.op_source is OpSource.GM_REST
    assert row.source_ref == "req-7"
    assert row.image_ref == IMAGE
    assert row.container_id == before.current_container_id


def test_stop_of_running_runtime_whose_container_is_gone_still_records_stopped(
    h: Harness,
) -> None:
    h.seed_running(GAME, container=False)

    result = stop(h)

    assert result.ok, result.failure
    assert h.record(GAME).status is RuntimeStatus.STOPPED
    assert h.docker.call_names("stop") == []


def test_a_stop_asks_docker_only_whether_the_container_is_ours_then_stops_it(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    cid = before.current_container_id

    assert stop(h).ok

    assert h.docker.calls == [
        Call("owns", (cid,)),
        Call("stop", (cid, STOP_TIMEOUT)),
    ]


def test_stop_of_runtime_whose_container_is_foreign_is_conflict_and_leaves_it_running(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.containers[before.current_container_id].labels[labels.CLUSTER] = "staging"

    result = stop(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.docker.containers[before.current_container_id].running
    assert h.docker.mutating_calls() == []
    assert h.record(GAME) == before


def test_stop_losing_the_cas_race_is_conflict_race_and_changes_nothing(h: Harness) -> None:
    before = h.seed_running(GAME)
    replaced = replace(before, current_container_id="f" * 64)

    def another_replica_recreates_the_engine(*_: object) -> None:
        h.store.records[GAME] = replaced

    h.docker.before("stop", another_replica_recreates_the_engine)

    result = stop(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.record(GAME) == replaced
    assert h.kinds(GAME) == [(OpKind.STOP, "failure")]
    assert h.leases.all_released


def test_stop_when_the_lease_is_busy_is_conflict_race_and_touches_nothing(h: Harness) -> None:
    before = h.seed_running(GAME)
    h.leases.busy.add(GAME)

    result = stop(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.docker.calls == []
    assert h.record(GAME) == before


def test_stop_when_redis_is_down_is_service_unavailable(h: Harness) -> None:
    h.seed_running(GAME)
    h.leases.go_down("acquire")

    result = stop(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.calls == []


def test_stop_when_docker_fails_is_service_unavailable_and_the_record_stays_running(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.fail("stop")

    result = stop(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.record(GAME) == before
    assert h.only_row(GAME).error_code == "service_unavailable"
    assert h.leases.all_released


def test_stop_when_the_database_is_down_is_service_unavailable_and_docker_untouched(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.units_of_work.down = True

    result = stop(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.calls == []
    assert h.record(GAME) == before
    assert h.leases.all_released


def test_stop_whose_commit_fails_reports_failure_and_keeps_the_record(h: Harness) -> None:
    before = h.seed_running(GAME)
    h.units_of_work.fail_next(at="commit", after=1)

    result = stop(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.record(GAME) == before
    assert h.kinds(GAME) == [(OpKind.STOP, "failure")]


@pytest.mark.parametrize("game_id", ["../etc", "", "GAME"])
def test_stop_of_malformed_game_id_is_invalid_request_without_audit_row_or_lease(
    h: Harness, game_id: str
) -> None:
    result = stop(h, game_id=game_id)

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.rows() == []
    assert h.leases.acquired == []
    assert h.docker.calls == []


def test_stop_takes_and_releases_the_game_lease(h: Harness) -> None:
    h.seed_running(GAME)

    stop(h)

    assert h.leases.acquires_of(GAME) == 1
    assert h.leases.all_released


def test_inner_stop_runs_without_taking_the_lease_and_names_its_parent(h: Harness) -> None:
    h.seed_running(GAME)
    restart = h.recorder.begin(
        game_id=GAME, op_kind=OpKind.RESTART, op_source=OpSource.ADMIN_REST, source_ref="corr-1"
    )

    result = h.stop.run(restart)

    assert result.ok, result.failure
    assert h.leases.acquired == []
    row = h.only_row(GAME)
    assert (row.op_kind, row.op_source, row.source_ref) == (
        OpKind.STOP,
        OpSource.ADMIN_REST,
        "corr-1",
    )
    assert restart.reserved_id > 0
    assert (row.parent_op_kind, row.parent_operation_id) == (OpKind.RESTART, restart.reserved_id)
