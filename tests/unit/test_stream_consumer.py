"""The stream consumer's pure parts: job fields, results, backoff and entry-id ordering.

The consumer itself (threads, Redis) is exercised against a real Redis in
`tests/integration/test_stream_consumer.py`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtmanager.config import load_settings
from rtmanager.domain.errors import ErrorCode, Failure
from rtmanager.domain.operation import OpKind, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.workers.stream_consumer import (
    GameQueues,
    Job,
    JobKind,
    MalformedJob,
    OrderedMerge,
    StartJob,
    StopJob,
    StreamRead,
    StreamSettings,
    dead_letter_fields,
    is_transient,
    parse_entry_id,
    parse_job,
    record_json,
    result_fields,
    retry_delay,
)

START, STOP = "start_jobs", "stop_jobs"
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def job(stream: str, entry_id: str, game_id: str = "g1") -> Job:
    kind = JobKind.START if stream == START else JobKind.STOP
    return Job.of(kind, stream, entry_id, {b"game_id": game_id.encode()})


def ids(jobs: list[Job]) -> list[str]:
    return [f"{j.stream}:{j.entry_id}" for j in jobs]


def read(jobs: list[Job], *, caught_up: bool) -> StreamRead:
    return StreamRead(jobs, jobs[-1].entry if jobs else None, caught_up=caught_up)


# --- entry ids ---------------------------------------------------------------------------


def test_entry_ids_compare_as_integer_pairs() -> None:
    assert parse_entry_id(b"1700000000000-3") == (1700000000000, 3)
    assert parse_entry_id("9-10") > parse_entry_id("9-9")
    assert parse_entry_id("10-0") > parse_entry_id("9-99")


@pytest.mark.parametrize("bad", ["", "12", "a-1", "1-", "-1", "1-2-3"])
def test_malformed_entry_ids_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="not a stream entry id"):
        parse_entry_id(bad)


def test_equal_ids_on_both_streams_order_the_start_first() -> None:
    assert job(START, "5-0").order < job(STOP, "5-0").order < job(START, "5-1").order


# --- job fields --------------------------------------------------------------------------


def test_start_job_fields_parse() -> None:
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


def test_game_id_is_passed_on_unvalidated_for_the_lifecycle_to_judge() -> None:
    # A bad game id is an invalid_request result of the lifecycle, not a dead letter.
    assert parse_job(JobKind.STOP, {b"game_id": b"../Bad Id"}) == StopJob(
        "../Bad Id", StopReason.LOBBY_REQUEST
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
        (JobKind.STOP, {b"game_id": b"g1", b"reason": b"\xfe"}, "reason .* not valid UTF-8"),
        (JobKind.STOP, {}, "no longer exists in the stream"),
    ],
)
def test_malformed_jobs_say_what_is_wrong(
    kind: JobKind, fields: dict[bytes, bytes], problem: str
) -> None:
    with pytest.raises(MalformedJob, match=problem):
        parse_job(kind, fields)


def test_a_huge_bad_value_is_quoted_shortened() -> None:
    with pytest.raises(MalformedJob) as caught:
        parse_job(JobKind.STOP, {b"game_id": b"g1", b"reason": b"x" * 10_000})

    assert len(str(caught.value)) < 200


# --- outcomes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "transient"),
    [
        (None, False),
        (Failure(ErrorCode.SERVICE_UNAVAILABLE, "docker down"), True),
        (Failure(ErrorCode.CONFLICT, "lease busy", race=True), True),
        (Failure(ErrorCode.CONFLICT, "runtime removed"), False),
        (Failure(ErrorCode.INVALID_REQUEST, "bad game id"), False),
        (Failure(ErrorCode.NOT_FOUND, "no record"), False),
        (Failure(ErrorCode.IMAGE_NOT_ALLOWED, "no"), False),
        (Failure(ErrorCode.CONTAINER_START_FAILED, "exited"), False),
        (Failure(ErrorCode.INTERNAL, "bug"), False),
    ],
)
def test_only_outages_and_lost_races_are_transient(
    failure: Failure | None, transient: bool
) -> None:
    assert is_transient(failure) is transient


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


def test_result_fields_of_success_and_failure() -> None:
    success = OperationResult("g1", OpKind.START, Outcome.SUCCESS, record=running_record())
    failure = OperationResult(
        "g1", OpKind.STOP, Outcome.FAILURE, failure=Failure(ErrorCode.NOT_FOUND, "no record")
    )

    ok = result_fields(job_id="1-0", stream=START, game_id="g1", result=success)
    bad = result_fields(job_id="2-0", stream=STOP, game_id="g1", result=failure)

    assert ok == {
        "job_id": "1-0",
        "stream": START,
        "game_id": "g1",
        "outcome": "success",
        "error_code": "",
        "error_message": "",
        "record": record_json(running_record()),
    }
    assert bad == {
        "job_id": "2-0",
        "stream": STOP,
        "game_id": "g1",
        "outcome": "failure",
        "error_code": "not_found",
        "error_message": "no record",
        "record": "",
    }


def test_dead_letter_fields_keep_undecodable_values_readable() -> None:
    fields = dead_letter_fields(
        stream=START,
        job_id="1-0",
        reason="malformed job: game_id is not valid UTF-8",
        deliveries=1,
        fields={b"game_id": b"g\xff", b"image_ref": b"galaxy/e:1"},
    )

    assert fields["deliveries"] == "1"
    assert json.loads(fields["fields"]) == {"game_id": "g\\xff", "image_ref": "galaxy/e:1"}


def test_retry_delay_doubles_up_to_the_cap_with_equal_jitter() -> None:
    base, cap = timedelta(milliseconds=200), timedelta(seconds=5)

    def fixed(value: float) -> list[float]:
        return [retry_delay(n, base, cap, jitter=lambda: value) for n in range(1, 8)]

    assert fixed(1.0) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert fixed(0.0) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5])
    assert retry_delay(10_000, base, cap) <= 5.0


# --- settings ----------------------------------------------------------------------------


def test_stream_settings_come_from_the_service_settings() -> None:
    service = load_settings(
        {
            "RTMANAGER_START_JOBS_STREAM": "a:start",
            "RTMANAGER_STOP_JOBS_STREAM": "a:stop",
            "RTMANAGER_JOB_RESULTS_STREAM": "a:results",
            "RTMANAGER_DEAD_LETTER_STREAM": "a:dead",
            "RTMANAGER_STREAM_GROUP": "grp",
            "RTMANAGER_STREAM_MAX_DELIVERIES": "7",
            "RTMANAGER_STREAM_WORKERS": "3",
            "RTMANAGER_INSTANCE_ID": "replica-1",
            "RTMANAGER_REDIS_PREFIX": "ignored:",
        }
    )

    stream = StreamSettings.from_settings(service)

    assert (stream.start_stream, stream.stop_stream) == ("a:start", "a:stop")
    assert (stream.results_stream, stream.dead_letter_stream) == ("a:results", "a:dead")
    assert (stream.group, stream.consumer) == ("grp", "replica-1")
    assert (stream.max_deliveries, stream.workers) == (7, 3)
    assert stream.block == timedelta(seconds=1)
    assert stream.claim_idle == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"stop_stream": "s"}, "must differ"),
        ({"group": " "}, "group must not be empty"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"max_deliveries": 0}, "max_deliveries must be at least 1"),
        ({"block": timedelta(0)}, "block must be at least 1ms"),
        ({"claim_idle": timedelta(0)}, "claim_idle must be positive"),
        ({"retry_max": timedelta(milliseconds=1)}, "retry_max must not be below"),
    ],
)
def test_stream_settings_reject_nonsense(change: dict[str, object], problem: str) -> None:
    values: dict[str, object] = {
        "start_stream": "s",
        "stop_stream": "t",
        "results_stream": "r",
        "dead_letter_stream": "d",
        "group": "g",
        "consumer": "c",
    }
    values.update(change)
    with pytest.raises(ValueError, match=problem):
        StreamSettings(**values)  # type: ignore[arg-type]


# --- ordering across the two streams ----------------------------------------------------


def test_nothing_is_released_until_both_streams_were_read() -> None:
    merge = OrderedMerge([START, STOP])

    released = merge.add_read({START: read([job(START, "1-0")], caught_up=True)})

    assert released == []
    assert merge.held() == 1


def test_caught_up_streams_release_everything_in_entry_id_order() -> None:
    merge = OrderedMerge([START, STOP])
    starts = [job(START, "1-0"), job(START, "3-0"), job(START, "5-0")]
    stops = [job(STOP, "2-0"), job(STOP, "5-0")]

    released = merge.add_read(
        {START: read(starts, caught_up=True), STOP: read(stops, caught_up=True)}
    )

    assert ids(released) == [
        "start_jobs:1-0",
        "stop_jobs:2-0",
        "start_jobs:3-0",
        "start_jobs:5-0",
        "stop_jobs:5-0",
    ]


def test_a_full_batch_holds_back_later_entries_of_the_other_stream() -> None:
    # Lobby wrote start 1, 3, 5 and stop 2, 4, 6 (one game); the read sees
    # two starts (a full batch) and every stop.
    merge = OrderedMerge([START, STOP])

    first = merge.add_read(
        {
            START: read([job(START, "1-0"), job(START, "3-0")], caught_up=False),
            STOP: read([job(STOP, "2-0"), job(STOP, "4-0"), job(STOP, "6-0")], caught_up=True),
        }
    )
    assert ids(first) == ["start_jobs:1-0", "stop_jobs:2-0", "start_jobs:3-0"]
    assert merge.held(STOP) == 2

    second = merge.add_read(
        {START: read([job(START, "5-0")], caught_up=True), STOP: read([], caught_up=True)}
    )
    assert ids(second) == ["stop_jobs:4-0", "start_jobs:5-0", "stop_jobs:6-0"]
    assert merge.held() == 0


def test_a_stream_left_out_of_a_read_is_not_taken_as_caught_up() -> None:
    merge = OrderedMerge([START, STOP])
    merge.add_read(
        {
            START: read([job(START, "1-0")], caught_up=True),
            STOP: read([job(STOP, "2-0"), job(STOP, "3-0")], caught_up=False),
        }
    )

    # Only the start stream is read now; the stop stream may have grown
    # since it was last read, so the new start must wait for it.
    released = merge.add_read({START: read([job(START, "9-0")], caught_up=True)})
    assert released == []

    released = merge.add_read({STOP: read([], caught_up=True)})
    assert ids(released) == ["start_jobs:9-0"]


def test_the_stream_furthest_behind_is_always_read() -> None:
    merge = OrderedMerge([START, STOP])
    merge.add_read(
        {
            START: read([job(START, "1-0"), job(START, "2-0")], caught_up=False),
            STOP: read([job(STOP, "7-0"), job(STOP, "8-0")], caught_up=False),
        }
    )
    assert merge.held(STOP) == 2

    # With a batch of 2, the stop stream has a full batch held back and is
    # ahead: only the start stream is read until it passes the stops.
    assert merge.streams_to_read(2) == [START]
    assert merge.streams_to_read(3) == [START, STOP]


def test_a_stream_behind_is_read_even_with_a_batch_of_reclaimed_entries_held() -> None:
    merge = OrderedMerge([START, STOP])
    merge.add_read(
        {
            START: read([job(START, "1-0"), job(START, "2-0")], caught_up=False),
            STOP: read([job(STOP, "3-0")], caught_up=True),
        }
    )
    merge.add_claimed([job(START, "10-0"), job(START, "11-0")])
    assert merge.held(START) == 2

    # Skipping the start stream now would hold its reclaimed entries forever.
    assert START in merge.streams_to_read(2)


def test_reclaimed_entries_run_at_once_unless_unread_entries_may_precede_them() -> None:
    merge = OrderedMerge([START, STOP])
    merge.add_read(
        {
            START: read([job(START, "5-0")], caught_up=True),
            STOP: read([job(STOP, "4-0")], caught_up=True),
        }
    )

    released = merge.add_claimed([job(STOP, "3-0"), job(START, "2-0"), job(START, "7-0")])

    assert ids(released) == ["start_jobs:2-0", "stop_jobs:3-0"]
    assert ids(
        merge.add_read({START: read([], caught_up=True), STOP: read([], caught_up=True)})
    ) == ["start_jobs:7-0"]


appends = st.lists(st.sampled_from([START, STOP]), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    script=st.lists(st.one_of(appends, st.just("read")), max_size=40),
    batch=st.integers(min_value=1, max_value=4),
)
def test_releases_follow_entry_id_order_whatever_the_batches(
    script: list[list[str] | str], batch: int
) -> None:
    """Simulate Lobby appending while the consumer reads with COUNT `batch`."""
    merge = OrderedMerge([START, STOP])
    unread: dict[str, list[Job]] = {START: [], STOP: []}
    clock = 0
    released: list[Job] = []
    written = 0

    def read_call() -> None:
        reads = {}
        for stream in merge.streams_to_read(batch):
            got, unread[stream] = unread[stream][:batch], unread[stream][batch:]
            reads[stream] = read(got, caught_up=len(got) < batch)
        released.extend(merge.add_read(reads))

    for step in script:
        if step == "read":
            read_call()
            continue
        for stream in step:
            clock += 1
            written += 1
            unread[stream].append(job(stream, f"{clock}-0", game_id="g"))
        assert merge.held() <= 4 * batch
    while unread[START] or unread[STOP] or merge.held():
        read_call()

    assert len(released) == written
    assert [j.order for j in released] == sorted(j.order for j in released)


# --- one game at a time ------------------------------------------------------------------


def test_a_game_runs_one_job_at_a_time_in_entry_id_order() -> None:
    games = GameQueues()
    first, second, third = job(START, "1-0"), job(STOP, "2-0"), job(START, "3-0")

    assert games.add(first) is first
    assert games.add(third) is None
    assert games.add(second) is None
    assert games.finish(first) is second
    assert games.finish(second) is third
    assert games.finish(third) is None
    assert len(games) == 0


def test_different_games_run_side_by_side() -> None:
    games = GameQueues()
    a, b = job(START, "1-0", game_id="a"), job(START, "2-0", game_id="b")

    assert games.add(a) is a
    assert games.add(b) is b
    assert len(games) == 2


def test_a_reclaimed_older_job_does_not_preempt_the_running_one() -> None:
    games = GameQueues()
    running, waiting, reclaimed = job(START, "5-0"), job(STOP, "6-0"), job(STOP, "1-0")
    games.add(running)
    games.add(waiting)

    assert games.add(reclaimed) is None
    assert games.finish(running) is reclaimed
    assert games.finish(reclaimed) is waiting


def test_jobs_without_a_game_id_do_not_block_each_other() -> None:
    games = GameQueues()
    one = Job.of(JobKind.START, START, "1-0", {b"image_ref": b"x"})
    two = Job.of(JobKind.START, START, "2-0", {b"game_id": b""})

    assert games.add(one) is one
    assert games.add(two) is two


def test_finishing_a_job_that_is_not_running_is_a_bug() -> None:
    games = GameQueues()
    games.add(job(START, "1-0"))

    with pytest.raises(ValueError, match="not running"):
        games.finish(job(STOP, "2-0"))
