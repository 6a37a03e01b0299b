"""Lobby's order of jobs: entry ids, positions across both streams, and game watermarks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtmanager.domain.errors import ErrorCode, Failure
from rtmanager.domain.jobs import (
    JobKind,
    JobMark,
    JobOutcome,
    JobPosition,
    LobbyJob,
    parse_entry_id,
)
from rtmanager.domain.operation import Outcome

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MAX = 2**64 - 1


def start(entry_id: str) -> LobbyJob:
    return LobbyJob(JobKind.START, "runtime:start_jobs", entry_id)


def stop(entry_id: str) -> LobbyJob:
    return LobbyJob(JobKind.STOP, "runtime:stop_jobs", entry_id)


def mark(job: LobbyJob, **changes: object) -> JobMark:
    values: dict[str, object] = {
        "game_id": "game-1",
        "job": job,
        "outcome": Outcome.SUCCESS,
        "applied_at": NOW,
    }
    values.update(changes)
    return JobMark(**values)  # type: ignore[arg-type]


# --- entry ids ------------------------------------------------------------------------


def test_entry_ids_parse_from_text_and_bytes_as_integer_pairs() -> None:
    assert parse_entry_id("1700000000000-3") == (1700000000000, 3)
    assert parse_entry_id(b"1700000000000-3") == (1700000000000, 3)
    assert parse_entry_id("0-0") == (0, 0)
    assert parse_entry_id(f"{MAX}-{MAX}") == (MAX, MAX)


def test_entry_ids_compare_as_numbers_not_as_text() -> None:
    assert parse_entry_id("10-0") > parse_entry_id("9-99")
    assert parse_entry_id("9-10") > parse_entry_id("9-9")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "12",
        "-",
        "a-1",
        "1-",
        "-1",
        "1-2-3",
        " 1-2",
        "1-2 ",
        "+1-2",
        "1--2",
        "1.5-2",
        "0x1-2",
        "²-1",
        f"{MAX + 1}-0",
        f"0-{MAX + 1}",
        "1" * 400 + "-0",
    ],
)
def test_malformed_entry_ids_are_value_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_entry_id(bad)


@pytest.mark.parametrize("bad", [b"1-\xff", b"\xc3\xa9-1", b""])
def test_undecodable_entry_ids_are_value_errors(bad: bytes) -> None:
    with pytest.raises(ValueError, match="not a stream entry id"):
        parse_entry_id(bad)


def test_entry_ids_with_non_ascii_digits_are_value_errors() -> None:
    # Redis ids are ASCII decimal; str.isdigit() also accepts e.g. Arabic-Indic
    # digits, which int() then reads as numbers.
    with pytest.raises(ValueError, match="not a stream entry id"):
        parse_entry_id("\u0663-1")


@given(st.integers(0, MAX), st.integers(0, MAX))
def test_every_valid_entry_id_round_trips(ms: int, seq: int) -> None:
    assert parse_entry_id(f"{ms}-{seq}") == (ms, seq)


# --- positions ------------------------------------------------------------------------


def test_positions_follow_entry_ids_across_both_streams() -> None:
    assert start("5-0").position < stop("5-1").position < start("6-0").position
    assert stop("9-99").position < start("10-0").position


def test_a_start_and_a_stop_with_one_entry_id_order_the_start_first() -> None:
    assert start("5-0").position < stop("5-0").position
    assert JobPosition.of(JobKind.START, "5-0") == JobPosition(5, 0, 0)
    assert JobPosition.of(JobKind.STOP, "5-0") == JobPosition(5, 0, 1)


def test_a_position_of_a_malformed_entry_id_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        JobPosition.of(JobKind.STOP, "five")


def test_a_job_names_itself_by_stream_and_entry_id() -> None:
    assert str(stop("5-0")) == "runtime:stop_jobs/5-0"
    assert stop("5-0") == stop("5-0") != start("5-0")


def test_the_job_outcome_vocabulary_is_frozen() -> None:
    assert [str(o) for o in JobOutcome] == ["success", "failure", "superseded"]
    assert [str(k) for k in JobKind] == ["start", "stop"]


# --- watermarks -----------------------------------------------------------------------


def test_a_mark_settles_its_own_job_and_older_ones_only() -> None:
    applied = mark(stop("200-0"))

    assert applied.settles(stop("200-0"))
    assert applied.settles(start("199-9"))
    assert applied.settles(start("200-0"))  # the tie: the start came first
    assert not applied.settles(stop("200-1"))
    assert not applied.settles(start("201-0"))


def test_a_start_mark_does_not_settle_the_stop_with_its_entry_id() -> None:
    assert not mark(start("200-0")).settles(stop("200-0"))


def test_a_failed_mark_carries_its_failure() -> None:
    failed = mark(
        stop("1-0"),
        outcome=Outcome.FAILURE,
        error_code=ErrorCode.NOT_FOUND,
        error_message="no runtime record for game game-1",
    )

    assert failed.failure == Failure(ErrorCode.NOT_FOUND, "no runtime record for game game-1")
    assert mark(stop("1-0")).failure is None


@pytest.mark.parametrize(
    "changes",
    [
        {"outcome": Outcome.FAILURE},
        {"outcome": Outcome.SUCCESS, "error_code": ErrorCode.CONFLICT},
    ],
)
def test_a_mark_has_an_error_code_exactly_when_it_failed(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="error code exactly when"):
        mark(stop("1-0"), **changes)


@pytest.mark.parametrize(
    "applied_at",
    [
        datetime(2026, 12, 1, 12, 0),
        datetime(2026, 12, 1, 12, 0, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_a_mark_is_stamped_in_utc(applied_at: datetime) -> None:
    with pytest.raises(ValueError):
        mark(stop("1-0"), applied_at=applied_at)
