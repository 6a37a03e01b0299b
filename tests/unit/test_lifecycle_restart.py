"""Restart (SPEC §3 Restart, seed 002) against in-memory fakes.

Under one outer lease: load, inner stop, `docker rm`, inner start with the
current image; the correlation id links the outer row and the inner rows.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from rtmanager.domain import labels
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.restart import RestartRequest
from rtmanager.lifecycle.stop import StopRequest
from tests.unit.fakes import CRASHES
from tests.unit.harness import IMAGE, IMAGE_MISSING, STOP_TIMEOUT, Harness, failure_code

GAME = "game-1"


def restart(h: Harness, source_ref: str = "", game_id: str = GAME) -> OperationResult:
    return h.restart.handle(
        RestartRequest(game_id=game_id, op_source=OpSource.ADMIN_REST, source_ref=source_ref)
    )


def test_restart_of_unknown_game_is_not_found(h: Harness) -> None:
    result = restart(h)

    assert failure_code(result) == ErrorCode.NOT_FOUND
    assert h.docker.calls == []
    assert h.kinds(GAME) == [(OpKind.RESTART, "failure")]
    assert h.leases.all_released


def test_restart_of_removed_runtime_is_conflict(h: Harness) -> None:
    before = h.seed_removed(GAME)

    result = restart(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and not result.failure.race
    assert h.record(GAME) == before
    assert h.docker.calls == []
    assert h.kinds(GAME) == [(OpKind.RESTART, "failure")]


def test_restart_stops_removes_and_starts_in_that_order_under_one_lease(h: Harness) -> None:
    before = h.seed_running(GAME)
    old_id = before.current_container_id

    result = restart(h)

    assert result.ok, result.failure
    steps = h.docker.method_calls("stop", "remove", "create", "start")
    assert [step.method for step in steps] == [
        "stop",
        "remove",
        "create",
        "start",
    ]
    assert steps[0].args == (old_id, STOP_TIMEOUT)
    assert steps[1].args == (old_id, True)
    assert steps[3].args == (h.record(GAME).current_container_id,)
    assert h.leases.acquires_of(GAME) == 1
    assert h.leases.refused == []
    assert h.leases.all_released


def test_restart_keeps_endpoint_and_image_and_changes_the_container_id(h: Harness) -> None:
    before = h.seed_running(GAME)

    result = restart(h)

    record = h.record(GAME)
    assert result.record == record
    assert record.status is RuntimeStatus.RUNNING
    assert record.current_container_id != before.current_container_id
    assert record.current_container_id in h.docker.containers
    assert before.current_container_id not in h.docker.containers
    assert record.engine_endpoint == before.engine_endpoint
    assert record.state_path == before.state_path
    assert record.current_image_ref == IMAGE
    assert record.created_at == before.created_at
    assert h.docker.containers[record.current_container_id].name == "galaxy-game-game-1"


def test_restart_writes_inner_stop_inner_start_and_outer_restart_rows(h: Harness) -> None:
    h.seed_running(GAME)

    result = restart(h)

    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.START, "success"),
        (OpKind.RESTART, "success"),
    ]
    outer = h.rows(GAME)[-1]
    assert outer.id == result.operation_id
    assert outer.container_id == h.record(GAME).current_container_id
    assert outer.image_ref == IMAGE
    assert {row.op_source for row in h.rows(GAME)} == {OpSource.ADMIN_REST}


def test_restart_reuses_the_request_source_ref_as_correlation_id_of_inner_rows(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    restart(h, source_ref="admin-42")

    assert [row.source_ref for row in h.rows(GAME)] == ["admin-42"] * 3


def test_restart_without_source_ref_generates_one_correlation_id_for_all_rows(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    restart(h)

    refs = {row.source_ref for row in h.rows(GAME)}
    assert len(refs) == 1
    assert refs.pop() != ""


def test_restarts_without_source_ref_get_distinct_correlation_ids(h: Harness) -> None:
    h.seed_running(GAME)

    restart(h)
    restart(h)

    outer = [row.source_ref for row in h.rows(GAME) if row.op_kind is OpKind.RESTART]
    assert len(set(outer)) == 2


def test_restart_of_stopped_runtime_skips_docker_stop_and_starts_it_again(h: Harness) -> None:
    before = h.seed_stopped(GAME)

    result = restart(h)

    assert result.ok, result.failure
    assert h.docker.call_names("stop") == []
    assert before.current_container_id not in h.docker.containers
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.START, "success"),
        (OpKind.RESTART, "success"),
    ]


def test_restart_of_stopped_runtime_whose_container_is_foreign_removes_nothing(
    h: Harness,
) -> None:
    before = h.seed_stopped(GAME)
    h.docker.containers[before.current_container_id].labels[labels.CLUSTER] = "staging"

    result = restart(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert before.current_container_id in h.docker.containers
    assert h.docker.call_names("remove") == []
    assert h.docker.call_names("create") == []


def test_restart_of_stopped_runtime_without_container_creates_one(h: Harness) -> None:
    h.seed_stopped(GAME, container=False)

    result = restart(h)

    assert result.ok, result.failure
    assert h.docker.call_names("remove") == []
    assert h.record(GAME).current_container_id in h.docker.containers


def test_restart_of_running_runtime_whose_container_is_gone_starts_a_new_one(
    h: Harness,
) -> None:
    h.seed_running(GAME, container=False)

    result = restart(h)

    assert result.ok, result.failure
    assert h.record(GAME).current_container_id in h.docker.containers


def test_restart_whose_inner_start_fails_reports_the_inner_code_and_clears_the_container_id(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.behaviours[IMAGE] = CRASHES

    result = restart(h, source_ref="admin-42")

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert result.failure is not None
    assert result.failure.message.startswith("inner start failed: ")
    record = h.record(GAME)
    assert record.status is RuntimeStatus.STOPPED
    assert record.current_container_id == ""
    assert record.current_image_ref == IMAGE
    assert h.docker.containers == {}
    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.START, "failure"),
        (OpKind.RESTART, "failure"),
    ]
    outer = h.rows(GAME)[-1]
    assert outer.error_code == "container_start_failed"
    assert outer.source_ref == "admin-42"
    assert outer.container_id == before.current_container_id
    # The inner start's failure row carried the unbinding, so the outer
    # failure changed nothing and reports no record; the feed got that
    # change, then the restart's end with the record as it stands.
    assert result.record is None
    inner_start = h.rows(GAME)[-2]
    assert [(op_id, r) for _id, op_id, r in h.store.events][-2:] == [
        (inner_start.id, record),
        (outer.id, record),
    ]
    assert h.leases.all_released


def test_restart_clears_the_container_id_in_the_same_commit_as_a_failure_row(
    h: Harness,
) -> None:
    h.seed_running(GAME)
    h.docker.behaviours[IMAGE] = CRASHES

    restart(h)

    (clearing,) = [
        c for c in h.units_of_work.commits() if any(not r.current_container_id for r in c.records)
    ]
    assert [row.outcome for row in clearing.operations] == [Outcome.FAILURE]
    assert h.units_of_work.commits()[-1].operations[-1].op_kind is OpKind.RESTART


def test_restart_after_a_failed_restart_creates_a_new_container(h: Harness) -> None:
    h.seed_running(GAME)
    h.docker.behaviours[IMAGE] = CRASHES
    restart(h)
    del h.docker.behaviours[IMAGE]

    result = restart(h)

    assert result.ok, result.failure
    assert h.record(GAME).status is RuntimeStatus.RUNNING


def test_restart_whose_inner_stop_fails_reports_its_code_and_leaves_the_engine(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.fail("stop")

    result = restart(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert result.failure is not None
    assert result.failure.message.startswith("inner stop failed: ")
    assert h.record(GAME) == before
    assert h.docker.call_names("remove", "create") == []
    assert h.kinds(GAME) == [(OpKind.STOP, "failure"), (OpKind.RESTART, "failure")]
    assert h.rows(GAME)[-1].error_code == "service_unavailable"
    assert h.leases.all_released


def test_restart_whose_inner_stop_loses_a_race_keeps_the_race_flag(h: Harness) -> None:
    before = h.seed_running(GAME)

    def another_replica_recreates_the_engine(*_: object) -> None:
        h.store.records[GAME] = replace(before, current_container_id="f" * 64)

    h.docker.before("stop", another_replica_recreates_the_engine)

    result = restart(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True


def test_restart_whose_container_removal_fails_is_service_unavailable_and_keeps_the_id(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.fail("remove")

    result = restart(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    record = h.record(GAME)
    assert record.status is RuntimeStatus.STOPPED
    assert record.current_container_id == before.current_container_id
    assert before.current_container_id in h.docker.containers
    assert h.docker.call_names("create") == []
    assert h.kinds(GAME) == [(OpKind.STOP, "success"), (OpKind.RESTART, "failure")]


def test_restart_when_the_lease_is_busy_is_conflict_race_and_runs_no_inner_step(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.leases.busy.add(GAME)

    result = restart(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.docker.calls == []
    assert h.record(GAME) == before
    assert h.kinds(GAME) == [(OpKind.RESTART, "failure")]


def test_restart_when_redis_is_down_is_service_unavailable(h: Harness) -> None:
    h.seed_running(GAME)
    h.leases.go_down()

    result = restart(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.calls == []


@pytest.mark.parametrize("game_id", ["../etc", "Game", ""])
def test_restart_of_malformed_game_id_is_invalid_request_without_audit_row_or_lease(
    h: Harness, game_id: str
) -> None:
    result = restart(h, game_id=game_id)

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.rows() == []
    assert h.leases.acquired == []
    assert h.docker.calls == []


# --- inner steps name the restart; watchers see it end ------------------------------


def test_restart_inner_rows_name_the_restart_whose_id_was_drawn_before_them(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    result = restart(h, source_ref="admin-42")

    stop, start, outer = h.rows(GAME)
    assert outer.op_kind is OpKind.RESTART and outer.id == result.operation_id
    assert (outer.parent_op_kind, outer.parent_operation_id) == (None, 0)
    for inner in (stop, start):
        assert (inner.parent_op_kind, inner.parent_operation_id) == (OpKind.RESTART, outer.id)
        assert inner.id > outer.id
    assert [row.id for row in h.store.operations] == sorted([outer.id, stop.id, start.id])


def test_a_restart_is_seen_as_its_inner_steps_then_its_own_event(h: Harness) -> None:
    h.seed_running(GAME)

    result = restart(h, source_ref="admin-42")

    stop, start, outer = h.events(GAME)
    assert [(e.op_kind, e.parent_op_kind, e.parent_operation_id) for e in (stop, start)] == [
        (OpKind.STOP, OpKind.RESTART, result.operation_id),
        (OpKind.START, OpKind.RESTART, result.operation_id),
    ]
    assert stop.record.status is RuntimeStatus.STOPPED and stop.inner_step
    assert start.record.status is RuntimeStatus.RUNNING and start.inner_step
    assert (outer.op_kind, outer.operation_id, outer.outcome) == (
        OpKind.RESTART,
        result.operation_id,
        Outcome.SUCCESS,
    )
    assert not outer.inner_step and outer.parent_operation_id == 0
    assert outer.record == h.record(GAME) == result.record
    assert {e.source_ref for e in (stop, start, outer)} == {"admin-42"}


def test_a_restart_failing_half_way_ends_with_a_failed_restart_event(h: Harness) -> None:
    h.seed_running(GAME)
    h.docker.behaviours[IMAGE] = CRASHES

    result = restart(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    events = h.events(GAME)
    assert [(e.op_kind, e.outcome, e.parent_operation_id) for e in events] == [
        (OpKind.STOP, Outcome.SUCCESS, result.operation_id),
        (OpKind.START, Outcome.FAILURE, result.operation_id),
        (OpKind.RESTART, Outcome.FAILURE, 0),
    ]
    assert events[-1].operation_id == result.operation_id
    assert events[-1].record == h.record(GAME)
    assert events[-1].record.status is RuntimeStatus.STOPPED


def test_a_restart_whose_container_removal_fails_ends_with_a_failed_restart_event(
    h: Harness,
) -> None:
    h.seed_running(GAME)
    h.docker.fail("remove")

    result = restart(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    stop, outer = h.events(GAME)
    assert (stop.op_kind, stop.parent_operation_id) == (OpKind.STOP, result.operation_id)
    # The restart changed nothing itself; its event repeats the record as it stands.
    assert (outer.op_kind, outer.outcome, outer.operation_id) == (
        OpKind.RESTART,
        Outcome.FAILURE,
        result.operation_id,
    )
    assert outer.record == stop.record == h.record(GAME)


def test_a_restart_refused_before_its_inner_steps_draws_no_id_and_publishes_nothing(
    h: Harness,
) -> None:
    h.seed_running(GAME)
    h.leases.busy.add(GAME)

    result = restart(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.events(GAME) == []
    (row,) = h.rows(GAME)
    assert row.id == result.operation_id == 1


def test_a_restart_whose_steps_changed_nothing_publishes_nothing(h: Harness) -> None:
    h.seed_stopped(GAME, IMAGE_MISSING, container=False)

    result = restart(h)

    assert failure_code(result) == ErrorCode.IMAGE_PULL_FAILED
    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.START, "failure"),
        (OpKind.RESTART, "failure"),
    ]
    assert h.events(GAME) == []


def test_a_restart_whose_id_cannot_be_drawn_runs_no_inner_step(h: Harness) -> None:
    before = h.seed_running(GAME)
    # The first unit of work reads the record; the second would draw the id.
    h.units_of_work.fail_next(1, at="enter", after=1)

    result = restart(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.call_names("stop", "remove") == []
    assert h.record(GAME) == before
    (row,) = h.rows(GAME)
    assert (row.op_kind, row.outcome) == (OpKind.RESTART, Outcome.FAILURE)
    assert h.events(GAME) == []
    assert h.leases.all_released


def test_a_plain_stop_and_a_restarts_stop_are_told_apart_by_their_events(h: Harness) -> None:
    h.seed_running(GAME)
    restart(h)
    h.stop.handle(StopRequest(game_id=GAME, op_source=OpSource.ADMIN_REST))

    stops = [e for e in h.events(GAME) if e.op_kind is OpKind.STOP]
    assert [(e.inner_step, e.parent_op_kind) for e in stops] == [
        (True, OpKind.RESTART),
        (False, None),
    ]
