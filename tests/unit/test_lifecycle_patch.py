"""Patch (SPEC §3 Patch, seed 003's semver rule) against in-memory fakes."""

from __future__ import annotations

import pytest

from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.patch import PatchRequest
from rtmanager.lifecycle.recorder import OperationResult
from tests.unit.harness import IMAGE, IMAGE_MISSING, IMAGE_PATCH, Harness, failure_code

GAME = "game-1"


def patch(
    h: Harness, image_ref: str = IMAGE_PATCH, source_ref: str = "", game_id: str = GAME
) -> OperationResult:
    return h.patch.handle(
        PatchRequest(
            game_id=game_id,
            image_ref=image_ref,
            op_source=OpSource.GM_REST,
            source_ref=source_ref,
        )
    )


def test_patch_to_the_next_patch_version_recreates_the_engine_with_the_new_image(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)

    result = patch(h)

    assert result.ok, result.failure
    record = h.record(GAME)
    assert result.record == record
    assert record.status is RuntimeStatus.RUNNING
    assert record.current_image_ref == IMAGE_PATCH
    assert record.current_container_id != before.current_container_id
    assert record.engine_endpoint == before.engine_endpoint
    assert h.docker.containers[record.current_container_id].image_ref == IMAGE_PATCH
    assert before.current_container_id not in h.docker.containers
    assert h.leases.acquires_of(GAME) == 1
    assert h.leases.all_released


def test_patch_rows_are_inner_stop_inner_start_and_outer_patch_with_one_correlation_id(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    result = patch(h, source_ref="gm-9")

    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.START, "success"),
        (OpKind.PATCH, "success"),
    ]
    rows = h.rows(GAME)
    assert [row.source_ref for row in rows] == ["gm-9"] * 3
    assert rows[1].image_ref == IMAGE_PATCH
    assert rows[2].image_ref == IMAGE_PATCH
    assert rows[2].id == result.operation_id
    assert result.op_kind is OpKind.PATCH


def test_patch_of_stopped_runtime_starts_it_with_the_new_image(h: Harness) -> None:
    h.seed_stopped(GAME)

    result = patch(h)

    assert result.ok, result.failure
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.record(GAME).current_image_ref == IMAGE_PATCH


def test_patch_back_to_an_earlier_patch_version_is_allowed(h: Harness) -> None:
    h.seed_running(GAME, IMAGE_PATCH)

    result = patch(h, image_ref=IMAGE)

    assert result.ok, result.failure
    assert h.record(GAME).current_image_ref == IMAGE


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("galaxy/engine:1.1.0", id="minor-bump"),
        pytest.param("galaxy/engine:2.0.0", id="major-bump"),
        pytest.param("galaxy/other-engine:1.0.1", id="other-repository"),
        pytest.param(IMAGE, id="same-version"),
        pytest.param("galaxy/engine:latest", id="not-semver"),
    ],
)
def test_patch_outside_the_semver_patch_rule_is_semver_patch_only_without_touching_docker(
    h: Harness, target: str
) -> None:
    before = h.seed_running(GAME)

    result = patch(h, image_ref=target)

    assert failure_code(result) == ErrorCode.SEMVER_PATCH_ONLY
    assert h.docker.calls == []
    assert h.record(GAME) == before
    row = h.only_row(GAME)
    assert (row.op_kind, row.outcome, row.error_code) == (
        OpKind.PATCH,
        Outcome.FAILURE,
        "semver_patch_only",
    )
    assert row.image_ref == target
    assert h.leases.all_released


def test_patch_to_an_image_outside_the_allowlist_is_image_not_allowed_without_lease(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)

    result = patch(h, image_ref="evil/engine:1.0.1")

    assert failure_code(result) == ErrorCode.IMAGE_NOT_ALLOWED
    assert h.docker.calls == []
    assert h.leases.acquired == []
    assert h.record(GAME) == before
    assert h.only_row(GAME).error_code == "image_not_allowed"


def test_patch_to_a_malformed_image_is_invalid_request(h: Harness) -> None:
    h.seed_running(GAME)

    result = patch(h, image_ref="galaxy/Engine:1.0.1")

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.docker.calls == []
    assert h.leases.acquired == []


def test_patch_of_unknown_game_is_not_found(h: Harness) -> None:
    result = patch(h)

    assert failure_code(result) == ErrorCode.NOT_FOUND
    assert h.docker.calls == []


def test_patch_of_removed_runtime_is_conflict(h: Harness) -> None:
    before = h.seed_removed(GAME)

    result = patch(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.record(GAME) == before
    assert h.docker.calls == []


def test_patch_when_the_lease_is_busy_is_conflict_race(h: Harness) -> None:
    h.seed_running(GAME)
    h.leases.busy.add(GAME)

    result = patch(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.docker.calls == []


def test_patch_whose_image_cannot_be_pulled_leaves_the_runtime_stopped_without_container(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    result = patch(h, image_ref=IMAGE_MISSING)

    assert failure_code(result) == ErrorCode.IMAGE_PULL_FAILED
    record = h.record(GAME)
    assert record.status is RuntimeStatus.STOPPED
    assert record.current_container_id == ""
    assert record.current_image_ref == IMAGE
    assert h.docker.containers == {}
    assert h.kinds(GAME) == [
        (OpKind.STOP, "success"),
        (OpKind.START, "failure"),
        (OpKind.PATCH, "failure"),
    ]
    assert h.rows(GAME)[-1].error_code == "image_pull_failed"


@pytest.mark.parametrize("game_id", ["../etc", "Game"])
def test_patch_of_malformed_game_id_is_invalid_request_without_audit_row_or_lease(
    h: Harness, game_id: str
) -> None:
    result = patch(h, game_id=game_id)

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.rows() == []
    assert h.leases.acquired == []


# --- inner steps name the patch; watchers see it end --------------------------------


def test_a_patch_is_seen_as_its_inner_steps_then_its_own_event(h: Harness) -> None:
    h.seed_running(GAME)

    result = patch(h, source_ref="gm-9")

    stop, start, outer = h.events(GAME)
    assert [(e.op_kind, e.parent_op_kind, e.parent_operation_id) for e in (stop, start)] == [
        (OpKind.STOP, OpKind.PATCH, result.operation_id),
        (OpKind.START, OpKind.PATCH, result.operation_id),
    ]
    assert (outer.op_kind, outer.operation_id, outer.outcome, outer.parent_op_kind) == (
        OpKind.PATCH,
        result.operation_id,
        Outcome.SUCCESS,
        None,
    )
    assert outer.record.current_image_ref == IMAGE_PATCH
    assert outer.record == h.record(GAME)
    assert {e.source_ref for e in (stop, start, outer)} == {"gm-9"}
    assert all(row.parent_operation_id == result.operation_id for row in h.rows(GAME)[:2]), h.rows(
        GAME
    )


def test_a_patch_whose_image_cannot_be_pulled_ends_with_a_failed_patch_event(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    result = patch(h, image_ref=IMAGE_MISSING)

    # The inner start changed nothing (the pull failed first); the patch's
    # own failure unbinds the removed container, and says the patch is over.
    stop, outer = h.events(GAME)
    assert (stop.op_kind, stop.parent_op_kind, stop.parent_operation_id) == (
        OpKind.STOP,
        OpKind.PATCH,
        result.operation_id,
    )
    assert (outer.op_kind, outer.outcome, outer.operation_id) == (
        OpKind.PATCH,
        Outcome.FAILURE,
        result.operation_id,
    )
    assert outer.record == h.record(GAME)
    assert outer.record.status is RuntimeStatus.STOPPED
    assert outer.record.current_container_id == ""
