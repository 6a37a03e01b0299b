"""The wire format of Lobby's jobs and of their answers (results and dead letters)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from rtmanager.domain.errors import ErrorCode, Failure
from rtmanager.domain.jobs import JobKind, JobOutcome, LobbyJob
from rtmanager.domain.operation import StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.workers.job_messages import (
    MalformedJob,
    StartJob,
    StopJob,
    dead_letter_answer,
    game_of,
    parse_job,
    record_json,
    result_answer,
)

START, STOP = "runtime:start_jobs", "runtime:stop_jobs"
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
START_JOB = LobbyJob(JobKind.START, START, "1-0")
STOP_JOB = LobbyJob(JobKind.STOP, STOP, "2-0")


# --- job fields -----------------------------------------------------------------------


def test_start_job_fields_parse_and_unknown_fields_are_ignored() -> None:
    fields = {b"game_id": b"g1", b"image_ref": b"galaxy/engine:1.0.0", b"extra": b"\xff"}

    assert parse_job(JobKind.START, fields) == StartJob("g1", "galaxy/engine:1.0.0")


def test_stop_job_reason_defaults_to_lobby_request() -> None:
    assert parse_job(JobKind.STOP, {b"game_id": b"g1"}) == StopJob("g1", StopReason.LOBBY_REQUEST)
    assert parse_job(JobKind.STOP, {b"game_id": b"g1", b"reason": b""}) == StopJob(
        "g1", StopReason.LOBBY_REQUEST
    )


@pytest.mark.parametrize("reason", list(StopReason))
def test_every_stop_reason_is_accepted(reason: StopReason) -> None:
    fields = {b"game_id": b"g1", b"reason": reason.value.encode()}

    assert parse_job(JobKind.STOP, fields) == StopJob("g1", reason)


def test_a_stop_job_ignores_an_image_ref() -> None:
    fields = {b"game_id": b"g1", b"image_ref": b"\xff"}

    assert parse_job(JobKind.STOP, fields) == StopJob("g1", StopReason.LOBBY_REQUEST)


def test_game_id_and_image_are_passed_on_unvalidated_for_the_lifecycle_to_judge() -> None:
    # A bad game id or image is an invalid_request / image_not_allowed result, not a dead letter.
    assert parse_job(JobKind.STOP, {b"game_id": b"../Bad Id"}) == StopJob(
        "../Bad Id", StopReason.LOBBY_REQUEST
    )
    assert parse_job(JobKind.START, {b"game_id": b"g1", b"image_ref": b"not an image"}) == (
        StartJob("g1", "not an image")
    )


@pytest.mark.parametrize(
    ("kind", "fields", "problem"),
    [
        (JobKind.START, {b"image_ref": b"galaxy/e:1"}, "missing game_id"),
        (JobKind.START, {b"game_id": b"", b"image_ref": b"galaxy/e:1"}, "empty game_id"),
        (JobKind.START, {b"game_id": b"g1"}, "missing image_ref"),
        (JobKind.START, {b"game_id": b"g1", b"image_ref": b""}, "empty image_ref"),
        (JobKind.START, {b"game_id": b"g\xff", b"image_ref": b"x"}, "game_id .* not valid UTF-8"),
        (JobKind.START, {b"game_id": b"g1", b"image_ref": b"\xc3("}, "image_ref .* UTF-8"),
        (JobKind.STOP, {b"reason": b"lobby_request"}, "missing game_id"),
        (JobKind.STOP, {b"game_id": b"g1", b"reason": b"because"}, "unknown reason 'because'"),
        (JobKind.STOP, {b"game_id": b"g1", b"reason": b"LOBBY_REQUEST"}, "unknown reason"),
        (JobKind.STOP, {b"game_id": b"g1", b"reason": b"\xfe"}, "reason .* not valid UTF-8"),
        (JobKind.STOP, {}, "no longer exists in the stream"),
        (JobKind.START, {}, "no longer exists in the stream"),
    ],
)
def test_malformed_jobs_say_what_is_wrong(
    kind: JobKind, fields: dict[bytes, bytes], problem: str
) -> None:
    with pytest.raises(MalformedJob, match=problem):
        parse_job(kind, fields)


def test_an_unknown_reason_names_the_known_ones() -> None:
    with pytest.raises(MalformedJob) as caught:
        parse_job(JobKind.STOP, {b"game_id": b"g1", b"reason": b"because"})

    assert all(reason.value in str(caught.value) for reason in StopReason)


def test_a_huge_bad_value_is_quoted_shortened() -> None:
    with pytest.raises(MalformedJob) as caught:
        parse_job(JobKind.STOP, {b"game_id": b"g1", b"reason": b"x" * 10_000})

    assert len(str(caught.value)) < 300
    assert "..." in str(caught.value)


def test_game_of_reads_the_game_id_as_written() -> None:
    assert game_of({b"game_id": b"g1"}) == "g1"
    assert game_of({b"game_id": b"g\xff"}) == "g\\xff"
    assert game_of({}) == ""


# --- answers --------------------------------------------------------------------------


def running_record() -> RuntimeRecord:
    return RuntimeRecord(
        game_id="g1",
        status=RuntimeStatus.RUNNING,
        engine_endpoint="http://galaxy-game-g1:8080",
        state_path="/var/lib/galaxy/games/g1",
        docker_network="galaxy-engines",
        last_op_at=NOW,
        created_at=NOW - timedelta(hours=1),
        current_container_id="c0ffee",
        current_image_ref="galaxy/engine:1.0.0",
        started_at=NOW,
    )


def test_record_json_carries_every_field_with_iso_timestamps() -> None:
    assert json.loads(record_json(running_record())) == {
        "game_id": "g1",
        "status": "running",
        "current_container_id": "c0ffee",
        "current_image_ref": "galaxy/engine:1.0.0",
        "engine_endpoint": "http://galaxy-game-g1:8080",
        "state_path": "/var/lib/galaxy/games/g1",
        "docker_network": "galaxy-engines",
        "started_at": "2024-05-01T12:00:00+00:00",
        "stopped_at": None,
        "removed_at": None,
        "last_op_at": "2024-05-01T12:00:00+00:00",
        "created_at": "2024-05-01T11:00:00+00:00",
    }
    assert record_json(None) == ""


def test_a_success_result_has_every_field_empty_but_its_own() -> None:
    answer = result_answer(
        START_JOB,
        game_id="g1",
        outcome=JobOutcome.SUCCESS,
        record=running_record(),
        operation_id=17,
    )

    assert answer.fields == {
        "job_id": "1-0",
        "stream": START,
        "kind": "start",
        "game_id": "g1",
        "outcome": "success",
        "error_code": "",
        "error_message": "",
        "superseded_by": "",
        "superseded_by_stream": "",
        "operation_id": "17",
        "record": record_json(running_record()),
    }
    assert (answer.outcome, answer.dead_letter, answer.error_code) == ("success", False, "")


def test_a_failure_result_carries_its_code_and_message() -> None:
    answer = result_answer(
        STOP_JOB,
        game_id="g1",
        outcome=JobOutcome.FAILURE,
        failure=Failure(ErrorCode.NOT_FOUND, "no record"),
    )

    assert answer.fields["kind"] == "stop"
    assert (answer.fields["error_code"], answer.fields["error_message"]) == (
        "not_found",
        "no record",
    )
    assert (answer.fields["operation_id"], answer.fields["record"]) == ("", "")
    assert (answer.outcome, answer.error_code) == ("failure", "not_found")


def test_a_superseded_result_names_the_newer_job() -> None:
    answer = result_answer(
        START_JOB,
        game_id="g1",
        outcome=JobOutcome.SUPERSEDED,
        superseded_by=STOP_JOB,
    )

    assert answer.outcome == "superseded"
    assert (answer.fields["superseded_by"], answer.fields["superseded_by_stream"]) == (
        "2-0",
        STOP,
    )


def test_every_result_has_the_same_fields() -> None:
    shapes = {
        frozenset(result_answer(START_JOB, game_id="g", outcome=outcome).fields)
        for outcome in JobOutcome
    }

    assert len(shapes) == 1


def test_a_dead_letter_keeps_the_original_fields_readable() -> None:
    answer = dead_letter_answer(
        START_JOB,
        reason="malformed job: game_id is not valid UTF-8",
        deliveries=1,
        fields={b"game_id": b"g\xff", b"image_ref": b"galaxy/e:1", "é".encode(): "ü".encode()},
    )

    assert answer.dead_letter and answer.outcome == "dead_letter"
    assert answer.fields["stream"] == START and answer.fields["job_id"] == "1-0"
    assert answer.fields["reason"] == "malformed job: game_id is not valid UTF-8"
    assert answer.fields["deliveries"] == "1"
    assert json.loads(answer.fields["fields"]) == {
        "game_id": "g\\xff",
        "image_ref": "galaxy/e:1",
        "é": "ü",
    }
    assert answer.error_code == ""


def test_a_dead_letter_of_a_deleted_entry_has_empty_fields() -> None:
    answer = dead_letter_answer(STOP_JOB, reason="gone", deliveries=3, fields={})

    assert (answer.fields["fields"], answer.fields["deliveries"]) == ("{}", "3")
