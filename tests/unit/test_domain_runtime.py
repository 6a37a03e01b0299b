"""The runtime record: its status machine (SPEC §2) and every rule of seed 001."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from itertools import product
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmanager.domain.errors import Conflict, ErrorCode
from rtmanager.domain.runtime import (
    ALLOWED_TRANSITIONS,
    InvalidRuntimeRecord,
    InvalidTransition,
    RuntimeRecord,
    RuntimeStatus,
    transition,
)

RUNNING, STOPPED, REMOVED = RuntimeStatus.RUNNING, RuntimeStatus.STOPPED, RuntimeStatus.REMOVED
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """A UTC time `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def running_record(**changes: object) -> RuntimeRecord:
    record = RuntimeRecord(
        game_id="game-1",
        status=RUNNING,
        engine_endpoint="http://galaxy-game-game-1:8080",
        state_path="/var/lib/galaxy/games/game-1",
        docker_network="galaxy-engines",
        created_at=T0,
        last_op_at=at(10),
        current_container_id="c0ffee",
        current_image_ref="galaxy/engine-stub:1.0.0",
        started_at=at(10),
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def stopped_record(**changes: object) -> RuntimeRecord:
    defaults: dict[str, object] = {"status": STOPPED, "stopped_at": at(20), "last_op_at": at(20)}
    return running_record(**{**defaults, **changes})


def removed_record(**changes: object) -> RuntimeRecord:
    defaults: dict[str, object] = {"status": REMOVED, "removed_at": at(30), "last_op_at": at(30)}
    return stopped_record(**{**defaults, **changes})


def assert_invalid(record: RuntimeRecord, message: str) -> None:
    with pytest.raises(InvalidRuntimeRecord, match=message):
        record.validate()


# --- the status machine --------------------------------------------------------

# SPEC §2, row by row: (from, to) -> allowed.
SPEC_TABLE = {
    (RUNNING, STOPPED): True,
    (RUNNING, REMOVED): True,
    (STOPPED, RUNNING): True,
    (STOPPED, REMOVED): True,
    (RUNNING, RUNNING): False,
    (STOPPED, STOPPED): False,
    (REMOVED, RUNNING): False,
    (REMOVED, STOPPED): False,
    (REMOVED, REMOVED): False,
}


def test_spec_table_covers_all_nine_pairs() -> None:
    assert set(SPEC_TABLE) == set(product(RuntimeStatus, RuntimeStatus))


def test_allowed_transitions_are_exactly_the_spec_table() -> None:
    assert {pair for pair, allowed in SPEC_TABLE.items() if allowed} == ALLOWED_TRANSITIONS


@pytest.mark.parametrize(
    ("from_status", "to_status"), [pair for pair, allowed in SPEC_TABLE.items() if allowed]
)
def test_allowed_transitions_pass(from_status: RuntimeStatus, to_status: RuntimeStatus) -> None:
    transition(from_status, to_status)


@pytest.mark.parametrize(
    ("from_status", "to_status"), [pair for pair, allowed in SPEC_TABLE.items() if not allowed]
)
def test_forbidden_transitions_are_invalid_transition(
    from_status: RuntimeStatus, to_status: RuntimeStatus
) -> None:
    with pytest.raises(InvalidTransition) as caught:
        transition(from_status, to_status)
    assert isinstance(caught.value, Conflict)
    assert caught.value.code is ErrorCode.CONFLICT
    assert str(from_status) in caught.value.message
    assert str(to_status) in caught.value.message


@pytest.mark.parametrize("to_status", list(RuntimeStatus))
def test_removed_is_terminal(to_status: RuntimeStatus) -> None:
    assert REMOVED.is_terminal
    with pytest.raises(InvalidTransition):
        transition(REMOVED, to_status)
    with pytest.raises(InvalidTransition):
        removed_record().with_status(to_status, at(100))


def test_only_removed_is_terminal() -> None:
    assert [status for status in RuntimeStatus if status.is_terminal] == [REMOVED]


def test_status_vocabulary_is_frozen() -> None:
    assert [str(status) for status in RuntimeStatus] == ["running", "stopped", "removed"]


# --- RuntimeRecord.validate: seed 001, one rule at a time ------------------------


@pytest.mark.parametrize("record", [running_record(), stopped_record(), removed_record()])
def test_well_formed_records_validate(record: RuntimeRecord) -> None:
    record.validate()


@pytest.mark.parametrize("game_id", ["", "   ", "Game-1", "../etc", "a" * 52])
def test_game_id_must_be_valid(game_id: str) -> None:
    assert_invalid(running_record(game_id=game_id), "game id")


def test_status_must_be_known() -> None:
    assert_invalid(running_record(status="paused"), "status")


@pytest.mark.parametrize("value", ["", "   "])
def test_engine_endpoint_must_not_be_empty(value: str) -> None:
    assert_invalid(running_record(engine_endpoint=value), "engine endpoint")


@pytest.mark.parametrize("value", ["", "   "])
def test_state_path_must_not_be_empty(value: str) -> None:
    assert_invalid(running_record(state_path=value), "state path")


@pytest.mark.parametrize("value", ["", "   "])
def test_docker_network_must_not_be_empty(value: str) -> None:
    assert_invalid(running_record(docker_network=value), "docker network")


def test_a_record_may_name_its_node_or_none() -> None:
    running_record().validate()
    running_record(node_id="n7x2k9q4w1e5", node_hostname="worker-2").validate()
    running_record(node_id="n7x2k9q4w1e5").validate()


def test_a_node_hostname_needs_a_node_id() -> None:
    assert_invalid(running_record(node_hostname="worker-2"), "node hostname")


def test_a_status_change_keeps_the_node() -> None:
    placed = running_record(node_id="n7x2k9q4w1e5", node_hostname="worker-2")
    stopped = placed.with_status(STOPPED, at(30))
    assert (stopped.node_id, stopped.node_hostname) == ("n7x2k9q4w1e5", "worker-2")


def test_last_op_at_must_be_set() -> None:
    assert_invalid(running_record(last_op_at=None), "last op at")


def test_created_at_must_be_set() -> None:
    assert_invalid(running_record(created_at=None), "created at")


def test_last_op_at_must_not_be_before_created_at() -> None:
    assert_invalid(running_record(last_op_at=at(-1), started_at=T0), "last op at")
    running_record(last_op_at=T0, started_at=T0).validate()


@pytest.mark.parametrize("value", ["", "   "])
def test_running_record_needs_a_container_id(value: str) -> None:
    assert_invalid(running_record(current_container_id=value), "container id")


@pytest.mark.parametrize("value", ["", "   "])
def test_running_record_needs_an_image_ref(value: str) -> None:
    assert_invalid(running_record(current_image_ref=value), "image ref")


def test_running_record_needs_started_at() -> None:
    assert_invalid(running_record(started_at=None), "started at")


@pytest.mark.parametrize("value", ["", "   "])
def test_stopped_record_needs_an_image_ref(value: str) -> None:
    assert_invalid(stopped_record(current_image_ref=value), "image ref")


def test_stopped_record_needs_stopped_at() -> None:
    assert_invalid(stopped_record(stopped_at=None), "stopped at")


def test_stopped_record_may_have_no_container() -> None:
    # SPEC §2: its container was removed by a failed restart/patch, or vanished.
    stopped_record(current_container_id="").validate()


def test_stopped_record_may_lack_started_at() -> None:
    stopped_record(started_at=None).validate()


def test_removed_record_needs_removed_at() -> None:
    assert_invalid(removed_record(removed_at=None), "removed at")


def test_removed_record_may_have_no_container_or_image() -> None:
    removed_record(current_container_id="", current_image_ref="").validate()


def test_started_at_must_not_be_before_created_at() -> None:
    assert_invalid(running_record(started_at=at(-1)), "started at must not be before created")
    running_record(started_at=T0).validate()


def test_stopped_at_must_not_be_before_started_at() -> None:
    assert_invalid(stopped_record(stopped_at=at(5)), "stopped at must not be before started")
    stopped_record(stopped_at=at(10)).validate()


def test_removed_at_must_not_be_before_created_at() -> None:
    assert_invalid(
        removed_record(removed_at=at(-1), started_at=None, stopped_at=None),
        "removed at must not be before created",
    )
    removed_record(removed_at=T0, started_at=None, stopped_at=None).validate()


@pytest.mark.parametrize(
    "field", ["created_at", "last_op_at", "started_at", "stopped_at", "removed_at"]
)
def test_naive_timestamps_are_rejected(field: str) -> None:
    record = removed_record()
    naive = getattr(record, field).replace(tzinfo=None)
    assert_invalid(replace(record, **{field: naive}), "UTC")


@pytest.mark.parametrize("field", ["created_at", "last_op_at", "started_at"])
def test_non_utc_offsets_are_rejected(field: str) -> None:
    record = running_record()
    shifted = getattr(record, field).astimezone(timezone(timedelta(hours=2)))
    assert_invalid(replace(record, **{field: shifted}), "UTC")


def test_any_utc_tzinfo_is_accepted() -> None:
    utc = ZoneInfo("UTC")
    running_record(
        created_at=T0.astimezone(utc),
        last_op_at=at(10).astimezone(utc),
        started_at=at(10).astimezone(utc),
    ).validate()


def test_timestamps_must_be_datetimes() -> None:
    assert_invalid(running_record(created_at="2025-01-01T12:00:00Z"), "created at")


# --- with_status ------------------------------------------------------------------


def test_stopping_stamps_stopped_at_and_last_op_at() -> None:
    record = running_record().with_status(STOPPED, at(50))

    assert record.status is STOPPED
    assert record.stopped_at == at(50)
    assert record.last_op_at == at(50)
    assert record.started_at == at(10)
    assert record.current_container_id == "c0ffee"
    record.validate()


def test_removing_stamps_removed_at_and_keeps_the_history() -> None:
    record = stopped_record().with_status(REMOVED, at(50), container_id="")

    assert record.status is REMOVED
    assert record.removed_at == at(50)
    assert record.stopped_at == at(20)
    assert record.last_op_at == at(50)
    assert record.current_container_id == ""
    record.validate()


def test_disposing_a_running_record_stamps_removed_at() -> None:
    record = running_record().with_status(REMOVED, at(50))

    assert record.removed_at == at(50)
    record.validate()


def test_starting_stamps_started_at_and_clears_stopped_at() -> None:
    record = stopped_record(current_container_id="").with_status(
        RUNNING, at(50), container_id="new-container"
    )

    assert record.status is RUNNING
    assert record.started_at == at(50)
    assert record.stopped_at is None
    assert record.last_op_at == at(50)
    assert record.current_container_id == "new-container"
    record.validate()


def test_with_status_keeps_the_container_unless_given() -> None:
    assert stopped_record().with_status(RUNNING, at(50)).current_container_id == "c0ffee"


def test_with_status_does_not_change_the_original() -> None:
    record = running_record()
    record.with_status(STOPPED, at(50))
    assert record == running_record()


@pytest.mark.parametrize(
    ("record", "to_status"),
    [(running_record(), RUNNING), (stopped_record(), STOPPED), (removed_record(), RUNNING)],
)
def test_with_status_rejects_forbidden_transitions(
    record: RuntimeRecord, to_status: RuntimeStatus
) -> None:
    with pytest.raises(InvalidTransition):
        record.with_status(to_status, at(100))


# --- properties --------------------------------------------------------------------

_game_ids = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_container_ids = st.from_regex(r"[0-9a-f]{12,64}", fullmatch=True)
_offsets = st.integers(min_value=0, max_value=10**8).map(lambda s: timedelta(seconds=s))
_small_offsets = st.integers(min_value=0, max_value=10**6).map(
    lambda us: timedelta(microseconds=us)
)


@st.composite
def valid_records(draw: st.DrawFn) -> RuntimeRecord:
    """Records that satisfy every rule: ordered timestamps, required fields per status."""
    status = draw(st.sampled_from(list(RuntimeStatus)))
    game_id = draw(_game_ids)
    created_at = T0 + draw(_offsets)
    started_at: datetime | None = created_at + draw(_small_offsets)
    stopped_at: datetime | None = None
    removed_at: datetime | None = None
    container_id = draw(_container_ids)
    image_ref = "galaxy/engine-stub:1.0.0"
    if status is RUNNING:
        pass
    elif status is STOPPED:
        started_at = draw(st.one_of(st.none(), st.just(started_at)))
        stopped_at = (started_at or created_at) + draw(_small_offsets)
        container_id = draw(st.one_of(st.just(""), st.just(container_id)))
    else:
        started_at = draw(st.one_of(st.none(), st.just(started_at)))
        if draw(st.booleans()):
            stopped_at = (started_at or created_at) + draw(_small_offsets)
        removed_at = (stopped_at or started_at or created_at) + draw(_small_offsets)
        container_id = draw(st.one_of(st.just(""), st.just(container_id)))
        image_ref = draw(st.sampled_from(["", image_ref]))
    stamps = [t for t in (created_at, started_at, stopped_at, removed_at) if t is not None]
    return RuntimeRecord(
        game_id=game_id,
        status=status,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/games/{game_id}",
        docker_network="galaxy-engines",
        created_at=created_at,
        last_op_at=max(stamps) + draw(_small_offsets),
        current_container_id=container_id,
        current_image_ref=image_ref,
        started_at=started_at,
        stopped_at=stopped_at,
        removed_at=removed_at,
    )


@settings(max_examples=100)
@given(valid_records())
def test_generated_records_validate(record: RuntimeRecord) -> None:
    record.validate()


@settings(max_examples=200)
@given(
    valid_records(),
    st.sampled_from(list(RuntimeStatus)),
    _small_offsets,
    st.one_of(st.none(), st.just(""), _container_ids),
)
def test_allowed_transition_at_a_later_time_yields_a_valid_record(
    record: RuntimeRecord,
    to_status: RuntimeStatus,
    delay: timedelta,
    container_id: str | None,
) -> None:
    now = record.last_op_at + delay
    if (record.status, to_status) not in ALLOWED_TRANSITIONS:
        with pytest.raises(InvalidTransition):
            record.with_status(to_status, now, container_id=container_id)
        return
    bound = record.current_container_id if container_id is None else container_id
    if to_status is RUNNING and not bound:
        # Starting always binds a container: the lifecycles pass the new one.
        container_id = "new-container"

    changed = record.with_status(to_status, now, container_id=container_id)

    changed.validate()
    assert changed.status is to_status
    assert changed.last_op_at == now
    assert changed.created_at == record.created_at
    assert changed.game_id == record.game_id


# --- found while writing these tests (see the report) ------------------------------


def test_plain_string_status_gets_the_rules_of_its_status() -> None:
    # A running record without a container must not validate, whatever
    # type the status value has (an adapter may hand in the raw column).
    record = running_record(status="running", current_container_id="", removed_at=at(30))

    with pytest.raises(InvalidRuntimeRecord):
        record.validate()


def test_plain_string_target_status_stamps_the_right_timestamp() -> None:
    try:
        record = running_record().with_status("stopped", at(50))  # type: ignore[arg-type]
    except (InvalidTransition, TypeError, ValueError):
        return  # rejecting a non-enum target is fine too
    assert record.stopped_at == at(50)
    assert record.started_at == at(10)
