"""The reconciler's rules as a pure function of one game's record and containers."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.reconcile import ActionKind, ReconcileAction, ReconcileReport, plan_game
from rtmanager.ports import ContainerInfo

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GAME = "g1"


def container(cid: str, *, running: bool, name: str = "galaxy-game-g1") -> ContainerInfo:
    return ContainerInfo(
        id=cid,
        name=name,
        state="running" if running else "exited",
        running=running,
        owned=True,
        game_id=GAME,
        image_ref="galaxy/engine:1.0.0",
        exit_code=None if running else 137,
    )


def record(status: RuntimeStatus, cid: str = "c1") -> RuntimeRecord:
    base = RuntimeRecord(
        game_id=GAME,
        status=RuntimeStatus.RUNNING,
        engine_endpoint="http://galaxy-game-g1:8080",
        state_path="/s/g1",
        docker_network="n",
        last_op_at=NOW,
        created_at=NOW,
        current_container_id=cid,
        current_image_ref="galaxy/engine:1.0.0",
        started_at=NOW,
    )
    if status is RuntimeStatus.RUNNING:
        return base
    if status is RuntimeStatus.STOPPED:
        return base.with_status(RuntimeStatus.STOPPED, NOW)
    return replace(base.with_status(RuntimeStatus.REMOVED, NOW), current_container_id="")


@pytest.mark.parametrize("running", [True, False])
def test_an_owned_container_without_a_record_is_adopted_in_dockers_state(running: bool) -> None:
    action = plan_game(GAME, None, [container("c9", running=running)])
    assert action is not None
    assert (action.kind, action.container_id, action.container_running) == (
        ActionKind.ADOPT,
        "c9",
        running,
    )


def test_no_record_and_no_container_needs_nothing() -> None:
    assert plan_game(GAME, None, []) is None


def test_a_running_record_whose_container_is_missing_is_disposed() -> None:
    action = plan_game(GAME, record(RuntimeStatus.RUNNING), [])
    assert action == ReconcileAction(ActionKind.DISPOSE, GAME, container_id="c1")


def test_a_running_record_whose_container_exited_is_marked_stopped() -> None:
    action = plan_game(GAME, record(RuntimeStatus.RUNNING), [container("c1", running=False)])
    assert action is not None
    assert (action.kind, action.exit_code) == (ActionKind.MARK_STOPPED, 137)


def test_a_running_record_with_its_container_running_needs_nothing() -> None:
    assert plan_game(GAME, record(RuntimeStatus.RUNNING), [container("c1", running=True)]) is None


def test_a_stopped_record_whose_container_runs_again_is_marked_running() -> None:
    action = plan_game(GAME, record(RuntimeStatus.STOPPED), [container("c1", running=True)])
    assert action is not None
    assert (action.kind, action.container_id) == (ActionKind.MARK_RUNNING, "c1")


def test_a_stopped_record_binds_to_the_running_container_an_interrupted_start_left() -> None:
    action = plan_game(GAME, record(RuntimeStatus.STOPPED, cid=""), [container("c2", running=True)])
    assert action is not None
    assert (action.kind, action.container_id) == (ActionKind.MARK_RUNNING, "c2")


@pytest.mark.parametrize("containers", [[], [container("c1", running=False)]])
def test_a_stopped_record_is_left_alone_without_a_running_container(
    containers: list[ContainerInfo],
) -> None:
    assert plan_game(GAME, record(RuntimeStatus.STOPPED), containers) is None


@pytest.mark.parametrize("cid", ["", "c1"])
def test_a_stopped_record_binds_to_the_exited_container_an_interrupted_start_left(cid: str) -> None:
    # The start's own removal of its failed container met a Docker outage.
    action = plan_game(
        GAME, record(RuntimeStatus.STOPPED, cid=cid), [container("c2", running=False)]
    )
    assert action is not None
    assert (action.kind, action.container_id) == (ActionKind.ADOPT, "c2")
    assert not action.container_running


def test_a_running_record_that_lost_its_container_binds_to_the_games_other_container() -> None:
    action = plan_game(GAME, record(RuntimeStatus.RUNNING), [container("c2", running=True)])
    assert action is not None
    assert (action.kind, action.container_id) == (ActionKind.ADOPT, "c2")


def test_a_removed_record_is_terminal_even_with_a_container_left_behind() -> None:
    assert plan_game(GAME, record(RuntimeStatus.REMOVED), [container("c1", running=True)]) is None


def test_report_counts_applied_steps_and_planned_ones_in_a_dry_run() -> None:
    adopt = ReconcileAction(ActionKind.ADOPT, "a")
    dispose = ReconcileAction(ActionKind.DISPOSE, "b")
    assert ReconcileReport(True, (adopt, dispose)).count(ActionKind.ADOPT) == 1
    done = ReconcileReport(
        False, (replace(adopt, applied=True), replace(dispose, skipped_reason="game busy"))
    )
    assert done.count(ActionKind.ADOPT) == 1
    assert done.count(ActionKind.DISPOSE) == 0
    assert done.skipped == 1
