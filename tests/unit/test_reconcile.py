"""The reconcile use case on fakes: CAS-guarded adoption and observed engine exits."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rtmanager.domain import labels
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.common import LifecycleDeps
from rtmanager.lifecycle.reconcile import ActionKind, Reconciler
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.telemetry import Telemetry
from tests.unit.fakes import Call
from tests.unit.harness import IMAGE, Harness, make_harness

GAME = "g1"


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


def reconciler_of(h: Harness) -> Reconciler:
    deps = LifecycleDeps(recorder=h.recorder, lock=h.lock, engine=h.docker, settings=h.settings)
    return Reconciler(deps, telemetry=Telemetry())


def exited(h: Harness, container_id: str) -> None:
    h.docker.containers[container_id].state = "exited"
    h.docker.containers[container_id].exit_code = 137


# --- adoption is CAS-guarded ---------------------------------------------------------


def test_a_stopped_record_is_bound_to_its_games_running_container(h: Harness) -> None:
    h.seed_stopped(GAME)
    revived = h.docker.add_engine(GAME, IMAGE)

    report = reconciler_of(h).run_pass()

    assert [(a.kind, a.applied) for a in report.actions] == [(ActionKind.MARK_RUNNING, True)]
    record = h.record(GAME)
    assert (record.status, record.current_container_id) == (RuntimeStatus.RUNNING, revived)


def test_an_adoption_does_not_overwrite_a_change_committed_after_its_plan(h: Harness) -> None:
    h.seed_stopped(GAME)
    revived = h.docker.add_engine(GAME, IMAGE)
    # Another writer (say, a replica whose lease this one took over after it
    # expired) binds the game to a container of its own after the pass
    # planned from the stopped record, before the adoption commits.
    theirs = "f" * 64
    inspects = 0

    def meanwhile(key: object) -> None:
        nonlocal inspects
        inspects += 1
        if inspects == 1:  # the re-check under the lease, after reading the record
            h.store.put(
                replace(h.running_record(GAME, theirs), last_op_at=h.record(GAME).last_op_at)
            )

    h.docker.before("inspect", meanwhile)

    report = reconciler_of(h).run_pass()

    (action,) = report.actions
    assert (action.kind, action.container_id, action.applied) == (
        ActionKind.MARK_RUNNING,
        revived,
        False,
    )
    assert "changed since the reconciler planned" in action.skipped_reason
    assert h.record(GAME).current_container_id == theirs
    (row,) = h.rows(GAME)
    assert (row.op_kind, str(row.outcome), str(row.error_code)) == (
        OpKind.RECONCILE_ADOPT,
        "failure",
        "conflict",
    )


# --- what a pass asks Docker ------------------------------------------------------------

NAME = f"galaxy-game-{GAME}"


def test_a_pass_over_games_that_need_nothing_is_one_listing_and_no_inspect(h: Harness) -> None:
    for index in range(20):
        h.seed_running(f"run-{index}")
        h.seed_stopped(f"stop-{index}")

    report = reconciler_of(h).run_pass()

    assert report.actions == ()
    assert h.docker.calls == [Call("list_owned", ())]


def test_a_steps_recheck_inspects_only_its_games_container_once(h: Harness) -> None:
    for index in range(5):
        h.seed_running(f"other-{index}")
    adoptee = h.docker.add_engine(GAME, IMAGE)

    report = reconciler_of(h).run_pass()

    assert [(a.kind, a.container_id, a.applied) for a in report.actions] == [
        (ActionKind.ADOPT, adoptee, True)
    ]
    assert h.docker.calls == [Call("list_owned", ()), Call("inspect", (NAME,))]


def test_an_exited_container_is_marked_stopped_with_the_exit_code_of_its_inspect(
    h: Harness,
) -> None:
    record = h.seed_running(GAME)
    h.seed_running("other")
    exited(h, record.current_container_id)

    report = reconciler_of(h).run_pass()

    assert [(a.kind, a.applied, a.exit_code) for a in report.actions] == [
        (ActionKind.MARK_STOPPED, True, 137)
    ]
    row = h.only_row(GAME)
    assert (row.op_kind, row.op_source, row.source_ref) == (
        OpKind.STOP,
        OpSource.AUTO_RECONCILE,
        "reconcile:exit=137",
    )
    assert h.docker.calls == [Call("list_owned", ()), Call("inspect", (NAME,))]


def test_an_engine_lost_without_an_exit_code_is_marked_stopped_with_the_backends_state(
    h: Harness,
) -> None:
    # E.g. a swarm task whose node went down: no exit code, state `node-down`.
    record = h.seed_running(GAME)
    h.docker.containers[record.current_container_id].state = "node-down"

    report = reconciler_of(h).run_pass()

    assert [(a.kind, a.applied, a.container_state) for a in report.actions] == [
        (ActionKind.MARK_STOPPED, True, "node-down")
    ]
    row = h.only_row(GAME)
    assert (row.op_kind, row.source_ref) == (OpKind.STOP, "reconcile:exit=unknown:state=node-down")


def test_a_dispose_is_rechecked_by_the_games_name_and_the_records_container(h: Harness) -> None:
    record = h.seed_running(GAME, container=False)

    (action,) = reconciler_of(h).run_pass().actions

    assert (action.kind, action.applied) == (ActionKind.DISPOSE, True)
    assert h.record(GAME).status is RuntimeStatus.REMOVED
    assert h.docker.calls == [
        Call("list_owned", ()),
        Call("inspect", (NAME,)),
        Call("inspect", (record.current_container_id,)),
    ]


def test_a_container_created_for_the_game_after_the_listing_is_bound_not_disposed(
    h: Harness,
) -> None:
    h.seed_running(GAME, container=False)
    created: list[str] = []

    def an_engine_appears(key: object) -> None:
        if not created:
            created.append(h.docker.add_engine(GAME, IMAGE))

    h.docker.before("inspect", an_engine_appears)

    (action,) = reconciler_of(h).run_pass().actions

    assert (action.kind, action.container_id, action.applied) == (
        ActionKind.ADOPT,
        created[0],
        True,
    )
    record = h.record(GAME)
    assert (record.status, record.current_container_id) == (RuntimeStatus.RUNNING, created[0])


def test_a_foreign_container_of_the_games_name_is_not_counted_by_the_recheck(h: Harness) -> None:
    h.seed_running(GAME, container=False)
    foreign = h.docker.add_container(
        name=NAME, image_ref=IMAGE, labels={labels.GAME_ID: GAME}, running=True
    )

    (action,) = reconciler_of(h).run_pass().actions

    assert (action.kind, action.applied) == (ActionKind.DISPOSE, True)
    assert h.docker.containers[foreign].running
    assert [c.method for c in h.docker.mutating_calls()] == []


def test_a_container_gone_before_the_recheck_gets_its_record_disposed(h: Harness) -> None:
    record = h.seed_running(GAME)
    exited(h, record.current_container_id)
    h.docker.before("inspect", lambda key: h.docker.containers.clear())

    (action,) = reconciler_of(h).run_pass().actions

    assert (action.kind, action.applied) == (ActionKind.DISPOSE, True)
    assert h.record(GAME).status is RuntimeStatus.REMOVED


def test_a_container_running_again_before_the_recheck_is_left_running(h: Harness) -> None:
    record = h.seed_running(GAME)
    exited(h, record.current_container_id)

    def revive(key: object) -> None:
        h.docker.containers[record.current_container_id].state = "running"

    h.docker.before("inspect", revive)

    (action,) = reconciler_of(h).run_pass().actions

    assert (action.kind, action.applied, action.skipped_reason) == (
        ActionKind.MARK_STOPPED,
        False,
        "already consistent",
    )
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.rows(GAME) == []


# --- observed exits --------------------------------------------------------------------


def test_an_exit_without_a_code_is_recorded_with_the_backends_state(h: Harness) -> None:
    record = h.seed_running(GAME)
    h.docker.containers[record.current_container_id].state = "node-down"

    result = reconciler_of(h).observe_exit(
        GAME, record.current_container_id, event="die", exit_code=None
    )

    assert result is not None and result.ok
    assert h.only_row(GAME).source_ref == "docker-event:die:exit=unknown:state=node-down"


def test_an_unexpected_exit_is_recorded_stopped(h: Harness) -> None:
    record = h.seed_running(GAME)
    exited(h, record.current_container_id)

    result = reconciler_of(h).observe_exit(
        GAME, record.current_container_id, event="die", exit_code=137
    )

    assert result is not None and result.ok
    assert h.record(GAME).status is RuntimeStatus.STOPPED
    row = h.only_row(GAME)
    assert (row.op_kind, row.op_source, row.source_ref) == (
        OpKind.STOP,
        OpSource.AUTO_RECONCILE,
        "docker-event:die:exit=137",
    )
    assert h.leases.all_released


def test_an_exit_the_record_no_longer_claims_takes_no_lease(h: Harness) -> None:
    record = h.seed_stopped(GAME)

    assert (
        reconciler_of(h).observe_exit(GAME, record.current_container_id, event="die", exit_code=0)
        is None
    )
    assert h.leases.acquired == [] and h.leases.refused == []


def test_an_exit_caused_by_a_stop_of_this_process_is_left_to_it_without_contending(
    h: Harness,
) -> None:
    record = h.seed_running(GAME)
    reconciler = reconciler_of(h)
    observed: list[object] = []

    def exit_seen_while_stopping(*_: object) -> None:
        # Docker reports the die while the stop still holds the lease and
        # has not committed; the stop then takes its time to commit.
        observer = threading.Thread(
            target=lambda: observed.append(
                reconciler.observe_exit(GAME, record.current_container_id, event="die", exit_code=0)
            )
        )
        observer.start()
        observed.append(observer)
        time.sleep(0.4)

    h.docker.before("stop", exit_seen_while_stopping)

    assert h.stop.handle(StopRequest(GAME, OpSource.GM_REST)).ok
    observer = observed.pop(0)
    assert isinstance(observer, threading.Thread)
    observer.join(5)

    assert observed == [None]
    assert h.leases.acquires_of(GAME) == 1  # the stop's own lease, nothing else
    assert [row.op_source for row in h.rows(GAME)] == [OpSource.GM_REST]


def test_a_lease_busy_elsewhere_is_tried_once_and_left_to_the_reconciler(h: Harness) -> None:
    record = h.seed_running(GAME)
    exited(h, record.current_container_id)
    h.leases.busy.add(GAME)  # another replica's operation holds the game

    result = reconciler_of(h).observe_exit(
        GAME, record.current_container_id, event="die", exit_code=137
    )

    assert result is None
    assert h.leases.refused == [GAME]
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.rows(GAME) == []


def test_an_exit_of_a_container_that_runs_again_is_left_to_the_reconciler(h: Harness) -> None:
    record = h.seed_running(GAME)

    assert (
        reconciler_of(h).observe_exit(GAME, record.current_container_id, event="die", exit_code=0)
        is None
    )
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.leases.all_released


def test_waiting_for_an_operation_of_this_process_ends_when_stopped(h: Harness) -> None:
    record = h.seed_running(GAME)
    stop = threading.Event()
    with h.lock.hold(GAME):
        threading.Timer(0.2, stop.set).start()
        began = time.monotonic()
        result = reconciler_of(h).observe_exit(
            GAME, record.current_container_id, event="die", exit_code=0, stop=stop
        )
    assert result is None
    assert time.monotonic() - began < 5  # the lease is held for ever: only `stop` ends the wait
    assert h.leases.acquires_of(GAME) == 1
