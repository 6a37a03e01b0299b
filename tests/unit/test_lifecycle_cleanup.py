"""Cleanup (SPEC §3 Cleanup) against in-memory fakes: every branch of `CleanupService`."""

from __future__ import annotations

import errno
import os
from datetime import timedelta
from pathlib import Path

import pytest

from rtmanager.domain import labels
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.cleanup import CleanupRequest
from rtmanager.lifecycle.recorder import OperationResult
from tests.unit.fakes import Call
from tests.unit.harness import STOP_TIMEOUT, Harness, failure_code, make_harness

GAME = "game-1"


def cleanup(
    h: Harness,
    *,
    force: bool = False,
    source_ref: str = "",
    game_id: str = GAME,
    op_source: OpSource = OpSource.ADMIN_REST,
) -> OperationResult:
    return h.cleanup.handle(
        CleanupRequest(game_id=game_id, op_source=op_source, force=force, source_ref=source_ref)
    )


def with_state(h: Harness) -> Path:
    state_dir = h.settings.state_dir(GAME)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "world.dat").write_text("turn 42")
    return state_dir


def test_cleanup_of_stopped_runtime_removes_container_and_records_removed_without_container(
    h: Harness,
) -> None:
    before = h.seed_stopped(GAME)

    result = cleanup(h)

    assert result.ok, result.failure
    assert h.docker.method_calls("remove")[0].args == (
        before.current_container_id,
        True,
    )
    assert h.docker.containers == {}
    record = h.record(GAME)
    assert record == result.record
    assert record.status is RuntimeStatus.REMOVED
    assert record.current_container_id == ""
    assert record.removed_at is not None and record.removed_at == record.last_op_at
    assert record.current_image_ref == before.current_image_ref
    row = h.only_row(GAME)
    assert (row.op_kind, row.outcome) == (OpKind.CLEANUP_CONTAINER, Outcome.SUCCESS)
    assert row.container_id == before.current_container_id
    assert h.leases.all_released


def test_cleanup_commits_the_record_and_its_row_together(h: Harness) -> None:
    h.seed_stopped(GAME)

    cleanup(h)

    (commit,) = h.units_of_work.commits()
    assert [r.status for r in commit.records] == [RuntimeStatus.REMOVED]
    assert [row.op_kind for row in commit.operations] == [OpKind.CLEANUP_CONTAINER]


def test_cleanup_keeps_the_state_directory_by_default(h: Harness) -> None:
    h.seed_stopped(GAME)
    state_dir = with_state(h)

    cleanup(h)

    assert (state_dir / "world.dat").read_text() == "turn 42"


def test_cleanup_with_remove_state_on_cleanup_deletes_the_state_directory(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    h.seed_stopped(GAME)
    state_dir = with_state(h)
    neighbour = h.settings.state_dir("game-2")
    neighbour.mkdir()

    result = cleanup(h)

    assert result.ok, result.failure
    assert not state_dir.exists()
    assert neighbour.is_dir()
    assert h.settings.state_root.is_dir()


def refuse_to_unlink(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the host refuse to remove files of these names, as an immutable file would.

    Tests run as root, whom permissions do not stop; the integration tests
    use a real immutable file (`chattr +i`).
    """
    unlink = os.unlink

    def refusing(path: str, *, dir_fd: int | None = None) -> None:
        if os.path.basename(path) in names:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refusing)


def test_cleanup_whose_state_directory_cannot_be_fully_removed_fails_naming_what_remains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    h.seed_stopped(GAME)
    state_dir = with_state(h)
    (state_dir / "saves").mkdir()
    (state_dir / "saves" / "turn-41.dat").write_text("turn 41")
    (state_dir / "saves" / "turn-40.dat").write_text("turn 40")
    refuse_to_unlink(monkeypatch, "turn-41.dat")

    result = cleanup(h)

    assert failure_code(result) == ErrorCode.INTERNAL
    assert result.failure is not None
    message = result.failure.message
    assert message.startswith(
        f"the runtime was removed, but not all of its state directory {state_dir}"
    )
    assert (
        f"1 path(s) could not be removed: {state_dir}/saves/turn-41.dat: Operation not permitted;"
        in message
    )
    assert message.endswith("remove them by hand")
    assert result.failure.metadata == {"state_path": str(state_dir), "leftovers": "1"}
    # The runtime is removed all the same, and audited so; the failure follows it.
    assert h.record(GAME).status is RuntimeStatus.REMOVED
    assert h.kinds(GAME) == [
        (OpKind.CLEANUP_CONTAINER, "success"),
        (OpKind.CLEANUP_CONTAINER, "failure"),
    ]
    assert h.rows(GAME)[-1].error_message == message
    assert h.rows(GAME)[-1].error_code == ErrorCode.INTERNAL
    # Everything else is gone.
    assert sorted(p.name for p in state_dir.rglob("*")) == ["saves", "turn-41.dat"]
    assert h.leases.all_released


def test_a_long_list_of_leftovers_is_cut_short_in_the_failure_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    h.seed_stopped(GAME)
    state_dir = with_state(h)
    names = [f"chunk-{i:02}.dat" for i in range(12)]
    for name in names:
        (state_dir / name).write_text("x")
    refuse_to_unlink(monkeypatch, *names)

    result = cleanup(h)

    assert result.failure is not None
    message = result.failure.message
    assert "12 path(s) could not be removed" in message
    assert message.count(": Operation not permitted") == 10
    assert "(and 2 more, in the log)" in message
    assert result.failure.metadata["leftovers"] == "12"


def test_cleanup_with_state_removal_of_a_game_without_state_directory_succeeds(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    h.seed_stopped(GAME)

    result = cleanup(h)

    assert result.ok, result.failure
    assert h.kinds(GAME) == [(OpKind.CLEANUP_CONTAINER, "success")]


def test_cleanup_of_running_runtime_without_force_is_conflict_and_touches_nothing(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    state_dir = with_state(h)

    result = cleanup(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and not result.failure.race
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []
    assert state_dir.is_dir()
    assert h.kinds(GAME) == [(OpKind.CLEANUP_CONTAINER, "failure")]


def test_cleanup_of_running_runtime_with_force_stops_it_first_then_removes_it(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)

    result = cleanup(h, force=True, source_ref="admin-7")

    assert result.ok, result.failure
    assert [(c.method, c.args) for c in h.docker.mutating_calls()] == [
        ("stop", (before.current_container_id, STOP_TIMEOUT)),
        ("remove", (before.current_container_id, True)),
    ]
    assert h.record(GAME).status is RuntimeStatus.REMOVED
    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.CLEANUP_CONTAINER, "success"),
    ]
    assert [row.source_ref for row in h.rows(GAME)] == ["admin-7", "admin-7"]
    assert h.leases.acquires_of(GAME) == 1
    assert h.leases.all_released


def test_forced_cleanup_without_source_ref_links_its_rows_with_a_generated_one(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    cleanup(h, force=True)

    refs = {row.source_ref for row in h.rows(GAME)}
    assert len(refs) == 1 and refs != {""}


def test_forced_cleanup_whose_inner_stop_fails_reports_its_code_and_keeps_the_runtime(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.fail("stop")

    result = cleanup(h, force=True)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert result.failure is not None
    assert result.failure.message.startswith("inner stop failed: ")
    assert h.record(GAME) == before
    assert h.docker.call_names("remove") == []
    assert h.kinds(GAME) == [(OpKind.STOP, "failure"), (OpKind.CLEANUP_CONTAINER, "failure")]


def test_cleanup_of_removed_runtime_is_idempotent_success(h: Harness) -> None:
    before = h.seed_removed(GAME)

    result = cleanup(h)

    assert result.ok
    assert result.record == before
    assert h.record(GAME) == before
    assert h.docker.calls == []
    assert h.kinds(GAME) == [(OpKind.CLEANUP_CONTAINER, "success")]


def test_cleanup_of_removed_runtime_keeps_state_even_when_configured_to_remove_it(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    h.seed_removed(GAME)
    state_dir = with_state(h)

    assert cleanup(h).ok

    assert state_dir.is_dir()


def test_cleanup_of_unknown_game_is_not_found(h: Harness) -> None:
    result = cleanup(h)

    assert failure_code(result) == ErrorCode.NOT_FOUND
    assert h.docker.calls == []
    assert h.kinds(GAME) == [(OpKind.CLEANUP_CONTAINER, "failure")]


def test_cleanup_of_stopped_runtime_whose_container_is_gone_records_removed(
    h: Harness,
) -> None:
    h.seed_stopped(GAME, container=False)

    result = cleanup(h)

    assert result.ok, result.failure
    assert h.docker.call_names("remove") == []
    assert h.record(GAME).status is RuntimeStatus.REMOVED


def test_a_cleanup_asks_docker_only_whether_the_container_is_ours_then_removes_it(
    h: Harness,
) -> None:
    cid = h.seed_stopped(GAME).current_container_id

    assert cleanup(h).ok

    assert h.docker.calls == [
        Call("owns", (cid,)),
        Call("remove", (cid, True)),
    ]


def test_cleanup_of_runtime_whose_container_is_foreign_is_conflict_and_leaves_it(
    h: Harness,
) -> None:
    before = h.seed_stopped(GAME)
    h.docker.containers[before.current_container_id].labels[labels.CLUSTER] = "staging"

    result = cleanup(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert before.current_container_id in h.docker.containers
    assert h.record(GAME) == before


def test_cleanup_when_the_lease_is_busy_is_conflict_race(h: Harness) -> None:
    before = h.seed_stopped(GAME)
    h.leases.busy.add(GAME)

    result = cleanup(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.docker.calls == []
    assert h.record(GAME) == before


def test_cleanup_when_docker_fails_is_service_unavailable_and_keeps_the_record(
    h: Harness,
) -> None:
    before = h.seed_stopped(GAME)
    h.docker.fail("remove")

    result = cleanup(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.record(GAME) == before
    assert h.leases.all_released


def test_cleanup_by_the_ttl_worker_is_recorded_as_auto_ttl(h: Harness) -> None:
    h.seed_stopped(GAME)

    cleanup(h, op_source=OpSource.AUTO_TTL)

    assert h.only_row(GAME).op_source is OpSource.AUTO_TTL


@pytest.mark.parametrize("game_id", ["../etc", "..", "Game"])
def test_cleanup_of_malformed_game_id_is_invalid_request_without_audit_row_or_lease(
    tmp_path: Path, game_id: str
) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    marker = tmp_path / "keep.txt"
    marker.write_text("x")

    result = cleanup(h, game_id=game_id)

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.rows() == []
    assert h.leases.acquired == []
    assert marker.exists()


def test_cleanup_whose_commit_fails_keeps_the_state_directory(tmp_path: Path) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    before = h.seed_stopped(GAME)
    state_dir = with_state(h)
    # Unit 1 reads the record, unit 2 commits the removal: fail that commit.
    h.units_of_work.fail_next(at="commit", after=1)

    result = cleanup(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.record(GAME) == before
    assert (state_dir / "world.dat").read_text() == "turn 42"


# --- the TTL worker's guard ---------------------------------------------------------


def test_ttl_cleanup_of_runtime_stopped_before_the_cutoff_removes_it(h: Harness) -> None:
    before = h.seed_stopped(GAME)

    result = h.cleanup.handle(
        CleanupRequest(
            game_id=GAME,
            op_source=OpSource.AUTO_TTL,
            stale_before=before.last_op_at + timedelta(seconds=1),
        )
    )

    assert result.ok, result.failure
    assert h.record(GAME).status is RuntimeStatus.REMOVED


def test_ttl_cleanup_of_runtime_touched_since_the_cutoff_is_conflict(h: Harness) -> None:
    before = h.seed_stopped(GAME)

    result = h.cleanup.handle(
        CleanupRequest(game_id=GAME, op_source=OpSource.AUTO_TTL, stale_before=before.last_op_at)
    )

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []


def test_ttl_cleanup_of_runtime_started_again_is_conflict_even_with_force(h: Harness) -> None:
    before = h.seed_running(GAME)

    result = h.cleanup.handle(
        CleanupRequest(
            game_id=GAME,
            op_source=OpSource.AUTO_TTL,
            force=True,
            stale_before=before.last_op_at + timedelta(days=1),
        )
    )

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []


def test_ttl_cleanup_of_removed_runtime_is_idempotent_success(h: Harness) -> None:
    before = h.seed_removed(GAME)

    result = h.cleanup.handle(
        CleanupRequest(game_id=GAME, op_source=OpSource.AUTO_TTL, stale_before=before.last_op_at)
    )

    assert result.ok


# --- a forced cleanup's inner stop names it ------------------------------------------


def test_a_forced_cleanup_is_seen_as_its_inner_stop_then_its_own_event(h: Harness) -> None:
    h.seed_running(GAME)

    result = cleanup(h, force=True, source_ref="admin-7")

    stop_row, outer_row = h.rows(GAME)
    assert (stop_row.parent_op_kind, stop_row.parent_operation_id) == (
        OpKind.CLEANUP_CONTAINER,
        outer_row.id,
    )
    assert outer_row.id == result.operation_id < stop_row.id
    stop, outer = h.events(GAME)
    assert (stop.op_kind, stop.parent_op_kind, stop.parent_operation_id) == (
        OpKind.STOP,
        OpKind.CLEANUP_CONTAINER,
        result.operation_id,
    )
    assert (outer.op_kind, outer.operation_id, outer.parent_op_kind) == (
        OpKind.CLEANUP_CONTAINER,
        result.operation_id,
        None,
    )
    assert outer.record.status is RuntimeStatus.REMOVED
    assert {stop.source_ref, outer.source_ref} == {"admin-7"}


def test_a_forced_cleanup_whose_removal_fails_ends_with_a_failed_cleanup_event(
    h: Harness,
) -> None:
    h.seed_running(GAME)
    h.docker.fail("remove")

    result = cleanup(h, force=True)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    stop, outer = h.events(GAME)
    assert stop.parent_operation_id == result.operation_id
    assert (outer.op_kind, outer.outcome, outer.operation_id) == (
        OpKind.CLEANUP_CONTAINER,
        Outcome.FAILURE,
        result.operation_id,
    )
    assert outer.record == h.record(GAME)
    assert outer.record.status is RuntimeStatus.STOPPED


def test_a_cleanup_without_inner_stop_draws_no_id_ahead_and_names_no_parent(
    h: Harness,
) -> None:
    h.seed_stopped(GAME)

    result = cleanup(h)

    (row,) = h.rows(GAME)
    (event,) = h.events(GAME)
    assert row.id == result.operation_id == 1
    assert (event.op_kind, event.parent_op_kind, event.parent_operation_id) == (
        OpKind.CLEANUP_CONTAINER,
        None,
        0,
    )
