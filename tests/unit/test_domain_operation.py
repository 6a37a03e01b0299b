"""The operation log: frozen vocabularies (SPEC §2) and every rule of seed 000."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import (
    InvalidOperationEntry,
    OperationEntry,
    OpKind,
    OpSource,
    Outcome,
)

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def success(**changes: object) -> OperationEntry:
    entry = OperationEntry(
        game_id="game-1",
        op_kind=OpKind.START,
        op_source=OpSource.LOBBY_STREAM,
        outcome=Outcome.SUCCESS,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=2),
        source_ref="1700000000000-0",
        image_ref="galaxy/engine-stub:1.0.0",
        container_id="c0ffee",
    )
    return replace(entry, **changes)  # type: ignore[arg-type]


def failure(**changes: object) -> OperationEntry:
    defaults: dict[str, object] = {
        "outcome": Outcome.FAILURE,
        "error_code": ErrorCode.IMAGE_PULL_FAILED,
        "error_message": "pull access denied",
    }
    return success(**{**defaults, **changes})


def assert_invalid(entry: OperationEntry, message: str) -> None:
    with pytest.raises(InvalidOperationEntry, match=message):
        entry.validate()


# --- frozen vocabularies (SPEC §2, order included) ------------------------------


def test_op_kinds_are_the_frozen_list() -> None:
    assert [str(kind) for kind in OpKind] == [
        "start",
        "stop",
        "restart",
        "patch",
        "cleanup_container",
        "reconcile_adopt",
        "reconcile_dispose",
    ]


def test_op_sources_are_the_frozen_list() -> None:
    assert [str(source) for source in OpSource] == [
        "lobby_stream",
        "gm_rest",
        "admin_rest",
        "auto_ttl",
        "auto_reconcile",
    ]


def test_outcomes_are_the_frozen_list() -> None:
    assert [str(outcome) for outcome in Outcome] == ["success", "failure"]


def test_error_codes_are_the_nine_stable_codes() -> None:
    assert [str(code) for code in ErrorCode] == [
        "invalid_request",
        "not_found",
        "conflict",
        "semver_patch_only",
        "image_not_allowed",
        "image_pull_failed",
        "container_start_failed",
        "service_unavailable",
        "internal",
    ]


def test_vocabulary_values_are_stored_verbatim() -> None:
    # StrEnum members are the strings the SQL CHECK constraints list.
    assert str(OpKind.CLEANUP_CONTAINER) == "cleanup_container"
    assert f"{OpSource.GM_REST}" == "gm_rest"
    assert OpKind("reconcile_dispose") is OpKind.RECONCILE_DISPOSE


# --- OperationEntry.validate: seed 000, one rule at a time -------------------------


def test_successful_entry_validates() -> None:
    success().validate()


def test_failed_entry_with_a_code_validates() -> None:
    failure().validate()


def test_in_flight_entry_without_finished_at_validates() -> None:
    success(finished_at=None).validate()


def test_optional_references_may_be_empty() -> None:
    success(source_ref="", image_ref="", container_id="").validate()


@pytest.mark.parametrize("game_id", ["", "   ", "\t\n"])
def test_game_id_must_not_be_empty(game_id: str) -> None:
    assert_invalid(success(game_id=game_id), "game id")


@pytest.mark.parametrize("op_kind", ["", "deploy", "START", "cleanup", 1, None])
def test_op_kind_must_be_known(op_kind: object) -> None:
    assert_invalid(success(op_kind=op_kind), "op kind")


@pytest.mark.parametrize("op_source", ["", "grpc", "GM_REST", "admin", None])
def test_op_source_must_be_known(op_source: object) -> None:
    assert_invalid(success(op_source=op_source), "op source")


@pytest.mark.parametrize("outcome", ["", "ok", "error", "SUCCESS", None])
def test_outcome_must_be_known(outcome: object) -> None:
    assert_invalid(success(outcome=outcome), "outcome")


@pytest.mark.parametrize("error_code", ["", "   "])
def test_failure_needs_an_error_code(error_code: str) -> None:
    assert_invalid(failure(error_code=error_code), "error code must not be empty")


@pytest.mark.parametrize("error_code", ["timeout", "CONFLICT", "docker_error"])
def test_failure_needs_a_known_error_code(error_code: str) -> None:
    assert_invalid(failure(error_code=error_code), "error code")


@pytest.mark.parametrize("code", list(ErrorCode))
def test_failure_accepts_every_stable_code(code: ErrorCode) -> None:
    failure(error_code=code).validate()
    failure(error_code=str(code)).validate()


@pytest.mark.parametrize("error_code", ["conflict", " "])
def test_success_must_not_carry_an_error_code(error_code: str) -> None:
    assert_invalid(success(error_code=error_code), "error code must be empty")


def test_finished_at_must_not_be_before_started_at() -> None:
    assert_invalid(
        success(finished_at=T0 - timedelta(microseconds=1)),
        "finished at must not be before started at",
    )
    success(finished_at=T0).validate()


def test_started_at_must_be_set() -> None:
    assert_invalid(success(started_at=None), "started at")


@pytest.mark.parametrize("field", ["started_at", "finished_at"])
def test_naive_timestamps_are_rejected(field: str) -> None:
    entry = success()
    naive = getattr(entry, field).replace(tzinfo=None)
    assert_invalid(replace(entry, **{field: naive}), "UTC")


@pytest.mark.parametrize("field", ["started_at", "finished_at"])
def test_non_utc_offsets_are_rejected(field: str) -> None:
    entry = success()
    shifted = getattr(entry, field).astimezone(timezone(timedelta(hours=-5)))
    assert_invalid(replace(entry, **{field: shifted}), "UTC")


# --- properties ---------------------------------------------------------------------

_durations = st.integers(min_value=0, max_value=10**9).map(lambda us: timedelta(microseconds=us))


@st.composite
def valid_entries(draw: st.DrawFn) -> OperationEntry:
    """Entries satisfying every rule, over the whole vocabulary."""
    started_at = T0 + draw(_durations)
    outcome = draw(st.sampled_from(list(Outcome)))
    return OperationEntry(
        game_id=draw(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True)),
        op_kind=draw(st.sampled_from(list(OpKind))),
        op_source=draw(st.sampled_from(list(OpSource))),
        outcome=outcome,
        started_at=started_at,
        finished_at=draw(st.one_of(st.none(), _durations.map(lambda d: started_at + d))),
        error_code=(
            draw(st.sampled_from([str(code) for code in ErrorCode]))
            if outcome is Outcome.FAILURE
            else ""
        ),
        error_message=draw(st.text(max_size=20)),
    )


@settings(max_examples=100)
@given(valid_entries())
def test_generated_entries_validate(entry: OperationEntry) -> None:
    entry.validate()


@settings(max_examples=50)
@given(valid_entries(), st.integers(min_value=1, max_value=10**9))
def test_finishing_before_starting_is_always_rejected(entry: OperationEntry, early: int) -> None:
    entry = replace(entry, finished_at=entry.started_at - timedelta(microseconds=early))
    with pytest.raises(InvalidOperationEntry):
        entry.validate()


# --- found while writing these tests (see the report) ------------------------------


def test_plain_string_failure_still_needs_an_error_code() -> None:
    entry = success(outcome="failure", error_code="")

    with pytest.raises(InvalidOperationEntry):
        entry.validate()


# --- inner steps of composite operations -------------------------------------------


@pytest.mark.parametrize("parent", [OpKind.RESTART, OpKind.PATCH, OpKind.CLEANUP_CONTAINER])
@pytest.mark.parametrize("kind", [OpKind.STOP, OpKind.START])
def test_an_inner_stop_or_start_may_name_a_composite_parent(kind: OpKind, parent: OpKind) -> None:
    success(op_kind=kind, parent_op_kind=parent, parent_operation_id=7).validate()
    failure(op_kind=kind, parent_op_kind=parent, parent_operation_id=7).validate()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parent_op_kind": OpKind.RESTART}, "needs its parent operation's id"),
        ({"parent_operation_id": 7}, "needs a parent op kind"),
        ({"parent_op_kind": OpKind.STOP, "parent_operation_id": 7}, "not a composite"),
        ({"parent_op_kind": OpKind.RECONCILE_ADOPT, "parent_operation_id": 7}, "not a composite"),
        (
            {"op_kind": OpKind.RESTART, "parent_op_kind": OpKind.PATCH, "parent_operation_id": 7},
            "never an inner step",
        ),
        (
            {"op_kind": OpKind.CLEANUP_CONTAINER, "parent_op_kind": OpKind.RESTART},
            "never an inner step",
        ),
        ({"parent_op_kind": OpKind.RESTART, "parent_operation_id": -1}, "parent operation's id"),
        ({"parent_op_kind": OpKind.RESTART, "parent_operation_id": 7, "id": 7}, "own parent"),
    ],
)
def test_a_parent_is_named_whole_and_only_by_inner_steps(
    changes: dict[str, object], message: str
) -> None:
    assert_invalid(success(**changes), message)
