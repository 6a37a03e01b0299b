"""The `JobStreams` contract against a real Redis (`RedisJobStreams`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from rtmanager.adapters.redis.client import create_redis
from rtmanager.adapters.redis.job_streams import JobStreamsConfig, RedisJobStreams
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.domain.jobs import JobKind
from rtmanager.ports import AnswerOutcome
from tests.conftest import REDIS_URL
from tests.support import redis_replies as replies
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.integration

GROUP = "rtmanager"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = create_redis(REDIS_URL, timeout=timedelta(seconds=5))
    yield connection
    connection.close()


@pytest.fixture
def config(redis_prefix: str) -> JobStreamsConfig:
    return JobStreamsConfig(
        start_stream=f"{redis_prefix}start_jobs",
        stop_stream=f"{redis_prefix}stop_jobs",
        results_stream=f"{redis_prefix}job_results",
        dead_letter_stream=f"{redis_prefix}dead_letter",
        group=GROUP,
        consumer="replica-a",
        prefix=redis_prefix,
        results_maxlen=50,
        presence_ttl=timedelta(seconds=10),
    )


def streams_for(client: redis.Redis, config: JobStreamsConfig, consumer: str) -> RedisJobStreams:
    adapter = RedisJobStreams(client, _with_consumer(config, consumer))
    adapter.ensure_groups()
    return adapter


def _with_consumer(config: JobStreamsConfig, consumer: str) -> JobStreamsConfig:
    from dataclasses import replace

    return replace(config, consumer=consumer)


def add_start(client: redis.Redis, config: JobStreamsConfig, game_id: str) -> str:
    entry_id = replies.binary(
        client.xadd(
            config.start_stream, {"game_id": game_id, "image_ref": "galaxy/engine-stub:1.0.0"}
        )
    )
    return entry_id.decode()


def test_groups_are_created_once_and_new_entries_are_first_deliveries(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    a.ensure_groups()  # idempotent
    first = add_start(client, config, "g1")
    stop = replies.binary(client.xadd(config.stop_stream, {"game_id": "g1"})).decode()
    entries = a.read_new(10, timedelta(milliseconds=100))
    assert sorted((e.job.kind, e.entry_id, e.deliveries) for e in entries) == sorted(
        [(JobKind.START, first, 1), (JobKind.STOP, stop, 1)]
    )
    assert a.read_new(10, timedelta(milliseconds=50)) == []


def test_a_consumer_name_is_held_by_one_live_process_only(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    first = streams_for(client, config, "replica-a")
    second = streams_for(client, config, "replica-a")  # another process, same name
    assert first.claim_name()
    assert first.claim_name()  # ours already
    assert not second.claim_name()
    assert first.keep_name()
    assert not second.keep_name()
    first.release_name()
    assert second.claim_name()
    assert not first.keep_name()


def test_own_pending_entries_are_taken_back_after_a_restart_and_count_a_delivery(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    before = streams_for(client, config, "replica-a")
    ids = [add_start(client, config, f"g{n}") for n in range(5)]
    assert len(before.read_new(10, timedelta(milliseconds=100))) == 5
    after = streams_for(client, config, "replica-a")  # the restarted process
    page = after.redeliver_own(JobKind.START, "", 3)
    assert [e.entry_id for e in page] == ids[:3]
    assert {e.deliveries for e in page} == {2}
    rest = after.redeliver_own(JobKind.START, page[-1].entry_id, 3)
    assert [e.entry_id for e in rest] == ids[3:]
    assert rest[0].fields[b"game_id"] == b"g3"
    assert after.redeliver_own(JobKind.STOP, "", 3) == []


def test_entries_of_a_live_consumer_are_never_taken_over(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    b = streams_for(client, config, "replica-b")
    assert a.claim_name()
    add_start(client, config, "g1")
    assert len(a.read_new(10, timedelta(milliseconds=100))) == 1
    time.sleep(0.2)
    assert b.claim_abandoned(timedelta(milliseconds=100), 10) == []
    a.release_name()  # a is gone
    assert b.claim_abandoned(timedelta(seconds=30), 10) == []  # not idle long enough
    (taken,) = b.claim_abandoned(timedelta(milliseconds=100), 10)
    assert taken.deliveries == 2
    assert taken.fields[b"game_id"] == b"g1"
    # The entry is b's now: a's answer is refused, b's goes through.
    answer = {"job_id": taken.entry_id, "outcome": "success"}
    assert a.answer(taken, answer) is AnswerOutcome.NOT_OURS
    assert b.answer(taken, answer) is AnswerOutcome.ANSWERED
    assert client.xlen(config.results_stream) == 1


def test_an_answer_is_published_and_acknowledged_once(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    add_start(client, config, "g1")
    (entry,) = a.read_new(10, timedelta(milliseconds=100))
    fields = {"job_id": entry.entry_id, "outcome": "success"}
    assert a.answer(entry, fields) is AnswerOutcome.ANSWERED
    assert replies.mapping(client.xpending(config.start_stream, GROUP))["pending"] == 0
    # A redelivery of the answered job (forced back into the pending list).
    client.xclaim(config.start_stream, GROUP, "replica-a", 0, [entry.entry_id], force=True)
    assert replies.mapping(client.xpending(config.start_stream, GROUP))["pending"] == 1
    assert a.answer(entry, fields) is AnswerOutcome.ALREADY_ANSWERED
    assert replies.mapping(client.xpending(config.start_stream, GROUP))["pending"] == 0
    assert client.xlen(config.results_stream) == 1


def test_dead_letters_go_to_their_own_stream(client: redis.Redis, config: JobStreamsConfig) -> None:
    a = streams_for(client, config, "replica-a")
    add_start(client, config, "g1")
    (entry,) = a.read_new(10, timedelta(milliseconds=100))
    assert a.answer(entry, {"reason": "malformed"}, dead_letter=True) is AnswerOutcome.ANSWERED
    assert client.xlen(config.dead_letter_stream) == 1
    assert client.xlen(config.results_stream) == 0


def test_an_entry_deleted_while_pending_is_dead_lettered_when_taken_over(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    b = streams_for(client, config, "replica-b")
    gone = add_start(client, config, "gone")
    kept = add_start(client, config, "kept")
    assert len(a.read_new(10, timedelta(milliseconds=100))) == 2
    client.xdel(config.start_stream, gone)
    time.sleep(0.15)
    (taken,) = b.claim_abandoned(timedelta(milliseconds=100), 10)
    assert taken.entry_id == kept
    ((_, letter),) = replies.binary_entries(client.xrange(config.dead_letter_stream))
    assert letter[b"job_id"].decode() == gone
    assert b"deleted" in letter[b"reason"]
    pending = replies.mappings(client.xpending_range(config.start_stream, GROUP, "-", "+", 10))
    assert [p["message_id"].decode() for p in pending] == [kept]


def test_results_are_trimmed_to_about_the_configured_length(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    for n in range(400):
        add_start(client, config, f"g{n}")
    answered = 0
    while entries := a.read_new(100, timedelta(milliseconds=50)):
        for entry in entries:
            a.answer(entry, {"job_id": entry.entry_id})
            answered += 1
    assert answered == 400
    # MAXLEN ~ trims whole macro nodes: about the limit, never everything.
    assert 50 <= replies.integer(client.xlen(config.results_stream)) < 400


def test_idle_consumers_without_presence_or_pending_entries_are_removed(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    live = streams_for(client, config, "replica-live")
    holding = streams_for(client, config, "replica-holding")
    gone = streams_for(client, config, "replica-gone")
    assert live.claim_name()
    # Each consumer exists once it was delivered something; only `holding`
    # still has its entry pending.
    for consumer in (live, gone, holding):
        add_start(client, config, "g1")
        (entry,) = consumer.read_new(1, timedelta(milliseconds=100))
        if consumer is not holding:
            consumer.answer(entry, {"job_id": entry.entry_id})
    time.sleep(0.3)
    assert a.remove_idle_consumers(timedelta(milliseconds=200)) == ["replica-gone"]
    names = {
        c["name"].decode()
        for c in replies.mappings(client.xinfo_consumers(config.start_stream, GROUP))
    }
    assert "replica-gone" not in names
    assert {"replica-live", "replica-holding"} <= names


def test_lag_counts_entries_not_yet_read(client: redis.Redis, config: JobStreamsConfig) -> None:
    a = streams_for(client, config, "replica-a")
    for n in range(3):
        add_start(client, config, f"g{n}")
    assert a.lag()[config.start_stream] == 3
    a.read_new(2, timedelta(milliseconds=50))
    assert a.lag()[config.start_stream] == 1


def add_stop(client: redis.Redis, config: JobStreamsConfig, game_id: str) -> str:
    entry_id = replies.binary(
        client.xadd(config.stop_stream, {"game_id": game_id, "reason": "game_finished"})
    )
    return entry_id.decode()


def test_unanswered_jobs_of_a_game_are_the_pending_and_the_undelivered_in_lobbys_order(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    delivered = add_start(client, config, "g1")
    other_game = add_start(client, config, "g2")
    answered = add_start(client, config, "g1")
    entries = {e.entry_id: e for e in a.read_new(10, timedelta(milliseconds=100))}
    assert set(entries) == {delivered, other_game, answered}
    assert a.answer(entries[answered], {"job_id": answered}) is AnswerOutcome.ANSWERED
    waiting_start = add_start(client, config, "g1")
    waiting_stop = add_stop(client, config, "g1")
    time.sleep(0.05)

    found = a.pending_jobs("g1", 100)

    assert found.truncated is False
    # In Lobby's order: by entry id across both streams, whose ids are
    # assigned independently (within one millisecond the stop's sequence
    # number may be the lower one).
    assert [j.job.position for j in found.jobs] == sorted(j.job.position for j in found.jobs)
    assert {(j.job.kind, j.job.entry_id) for j in found.jobs} == {
        (JobKind.START, delivered),
        (JobKind.START, waiting_start),
        (JobKind.STOP, waiting_stop),
    }
    by_id = {j.job.entry_id: j for j in found.jobs if j.job.kind is JobKind.START}
    first, second = by_id[delivered], by_id[waiting_start]
    (third,) = [j for j in found.jobs if j.job.kind is JobKind.STOP]
    assert found.jobs[0] == first
    assert first.fields == {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0.0"}
    assert (first.delivered, first.consumer, first.deliveries) == (True, "replica-a", 1)
    assert first.idle is not None and first.idle >= timedelta(milliseconds=50)
    assert (second.delivered, second.consumer, second.deliveries, second.idle) == (
        False,
        "",
        0,
        None,
    )
    assert third.fields == {"game_id": "g1", "reason": "game_finished"}
    assert third.job.stream == config.stop_stream
    # The group's view, whichever consumer asks; another game's jobs are its own.
    b = RedisJobStreams(client, _with_consumer(config, "replica-b"))
    assert [j.job for j in b.pending_jobs("g1", 100).jobs] == [j.job for j in found.jobs]
    assert [j.job.entry_id for j in b.pending_jobs("g2", 100).jobs] == [other_game]
    assert b.pending_jobs("g3", 100).jobs == []


def test_a_pending_entry_deleted_from_its_stream_is_not_reported(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    gone = add_start(client, config, "g1")
    kept = add_start(client, config, "g1")
    assert len(a.read_new(10, timedelta(milliseconds=100))) == 2
    client.xdel(config.start_stream, gone)
    assert [j.job.entry_id for j in a.pending_jobs("g1", 10).jobs] == [kept]


def test_the_scan_for_unanswered_jobs_is_bounded_and_says_when_it_stopped(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    a = streams_for(client, config, "replica-a")
    ids = [add_start(client, config, "g1") for _ in range(4)]
    assert len(a.read_new(2, timedelta(milliseconds=100))) == 2  # two pending, two not
    bounded = a.pending_jobs("g1", 1)
    assert bounded.truncated is True
    assert [j.job.entry_id for j in bounded.jobs] == [ids[0], ids[2]]  # oldest of each kind
    assert a.pending_jobs("g1", 2).truncated is True  # the bound reached: there may be more
    whole = a.pending_jobs("g1", 3)
    assert whole.truncated is False
    assert [j.job.entry_id for j in whole.jobs] == ids
    with pytest.raises(ValueError):
        a.pending_jobs("g1", 0)


def test_before_the_group_exists_every_entry_is_undelivered(
    client: redis.Redis, config: JobStreamsConfig
) -> None:
    fresh = RedisJobStreams(client, config)  # no ensure_groups: no stream, no group
    assert fresh.pending_jobs("g1", 10).jobs == []
    entry_id = add_start(client, config, "g1")
    (job,) = fresh.pending_jobs("g1", 10).jobs
    assert (job.job.entry_id, job.delivered) == (entry_id, False)


def test_redis_down_is_service_unavailable(config: JobStreamsConfig, tmp_path: Path) -> None:
    with PrivateRedis.started(tmp_path / "redis") as server:
        connection = create_redis(server.url, timeout=timedelta(seconds=1))
        adapter = RedisJobStreams(connection, config)
        adapter.ensure_groups()
        server.kill()
        for call in (
            adapter.claim_name,
            lambda: adapter.read_new(1, timedelta(milliseconds=10)),
            lambda: adapter.claim_abandoned(timedelta(seconds=1), 1),
            adapter.lag,
            lambda: adapter.pending_jobs("g1", 10),
        ):
            with pytest.raises(ServiceUnavailable):
                call()
        connection.close()


def test_pending_entries_survive_a_redis_restart(config: JobStreamsConfig, tmp_path: Path) -> None:
    with PrivateRedis.started(tmp_path / "redis") as server:
        connection = create_redis(server.url, timeout=timedelta(seconds=2))
        adapter = RedisJobStreams(connection, config)
        adapter.ensure_groups()
        ids = [add_start(connection, config, f"g{n}") for n in range(3)]
        assert len(adapter.read_new(10, timedelta(milliseconds=50))) == 3
        server.restart()
        again = adapter.redeliver_own(JobKind.START, "", 10)
        assert [e.entry_id for e in again] == ids
        connection.close()
