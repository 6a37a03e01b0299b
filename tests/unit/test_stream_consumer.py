"""The stream consumer applies Lobby's jobs as SPEC §4 promises, across replicas and outages.

Real `StreamConsumer` threads and the real start/stop services run over
the fakes: one `FakeRedisStreams` shared by every consumer (each with its
own `FakeJobStreams` view, as replicas have their own connection), one fake
database, leases and Docker (`tests.unit.harness`). Each replica has its own
services and game lock, as separate processes would. Tests wait on
conditions with a bounded poll, never on fixed sleeps; retry timing is
made quick (milliseconds) or jumped over with `JumpClock`.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import pytest

from rtmanager.backoff import Backoff
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.jobs import JobKind, LobbyJob
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.common import LifecycleDeps
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.lifecycle.start import StartRequest, StartService
from rtmanager.lifecycle.stop import StopRequest, StopService
from rtmanager.ports import AnswerOutcome, ContainerSpec, GameLeases, Lease
from rtmanager.telemetry import Telemetry
from rtmanager.workers.stream_consumer import ConsumerNameTaken, ConsumerSettings, StreamConsumer
from tests.unit.fakes import DELETED_REASON, FakeJobStreams, FakeRedisStreams
from tests.unit.harness import IMAGE, LEASE_TTL, Harness

T = TypeVar("T")

GAME = "game-1"

# Quick, but with the production structure: backoff retries, takeovers
# after an idle time, presence renewed well within its TTL.
FAST: dict[str, Any] = {
    "workers": 2,
    "batch": 8,
    "block": timedelta(milliseconds=20),
    "claim_idle": timedelta(milliseconds=60),
    "retry": Backoff(timedelta(milliseconds=2), timedelta(milliseconds=10)),
    "presence_ttl": timedelta(seconds=3),
}


def eventually(what: str, condition: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll `condition` until it is truthy; fail saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


class JumpClock:
    """`time.monotonic`, plus an offset a test moves forward to skip a long wait."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, by: timedelta) -> None:
        self.offset += by.total_seconds()


class TickingClock:
    """A clock that moves `step` seconds forward each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class GatedLeases:
    """`GameLeases` whose `acquire` of one game waits until the test opens the gate.

    Holds a replica back just before it takes the game's lease, so another
    replica's job of that game runs first.
    """

    def __init__(self, leases: GameLeases, game_id: str) -> None:
        self._leases = leases
        self._game_id = game_id
        self.waiting = threading.Event()
        self.opened = threading.Event()

    def acquire(self, game_id: str, ttl: timedelta) -> Lease | None:
        if game_id == self._game_id:
            self.waiting.set()
            self.opened.wait(10)
        return self._leases.acquire(game_id, ttl)

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        return self._leases.renew(lease, ttl)

    def release(self, lease: Lease) -> bool:
        return self._leases.release(lease)


class JitteredLeases:
    """`GameLeases` that waits up to a few milliseconds before each acquire.

    Replicas then reach a game's lease in varying order, as real ones do.
    """

    def __init__(self, leases: GameLeases, seed: int) -> None:
        self._leases = leases
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def acquire(self, game_id: str, ttl: timedelta) -> Lease | None:
        with self._lock:
            pause = self._random.random() * 0.003
        time.sleep(pause)
        return self._leases.acquire(game_id, ttl)

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        return self._leases.renew(lease, ttl)

    def release(self, lease: Lease) -> bool:
        return self._leases.release(lease)


class Blocker:
    """A Docker hook that holds the first matching call until `release()`."""

    def __init__(self, container_name: str | None = None) -> None:
        self.name = container_name
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, spec: ContainerSpec) -> None:
        if self.entered.is_set() or (self.name is not None and spec.name != self.name):
            return
        self.entered.set()
        self.released.wait(10)

    def release(self) -> None:
        self.released.set()


@dataclass
class Replica:
    """One rtmanager process: its view of Redis, its services, its consumer."""

    name: str
    streams: FakeJobStreams
    start: StartService
    stop: StopService
    consumer: StreamConsumer


class Cluster:
    """Builds replicas over shared fakes and stops them all when the test ends."""

    def __init__(self, h: Harness, redis: FakeRedisStreams) -> None:
        self.h = h
        self.redis = redis
        self.replicas: list[Replica] = []
        self._cleanups: list[Callable[[], None]] = []

    def services(self, leases: GameLeases | None = None) -> tuple[StartService, StopService]:
        """Start and stop services of one process, over the shared database, leases and Docker."""
        h = self.h
        lock = GameLock(leases or h.leases, LEASE_TTL)
        recorder = OperationRecorder(h.units_of_work, Telemetry())
        deps = LifecycleDeps(recorder=recorder, lock=lock, engine=h.docker, settings=h.settings)
        return StartService(deps), StopService(deps)

    def consumer(
        self,
        name: str = "rtm-1",
        *,
        leases: GameLeases | None = None,
        clock: Callable[[], float] = time.monotonic,
        **settings: Any,
    ) -> Replica:
        """A replica's consumer, built but not registered or started."""
        values = {**FAST, **settings}
        streams = self.redis.consumer(name, presence_ttl=values["presence_ttl"])
        start, stop = self.services(leases)
        consumer = StreamConsumer(
            streams,
            start,
            stop,
            ConsumerSettings(consumer=name, **values),
            Telemetry(),
            clock=clock,
        )
        replica = Replica(name, streams, start, stop, consumer)
        self.replicas.append(replica)
        return replica

    def replica(self, name: str = "rtm-1", **options: Any) -> Replica:
        """A replica's consumer, registered and running."""
        replica = self.consumer(name, **options)
        replica.consumer.register()
        replica.consumer.start()
        return replica

    def on_teardown(self, cleanup: Callable[[], None]) -> None:
        """Run `cleanup` before the consumers are stopped (open gates, release hooks)."""
        self._cleanups.append(cleanup)

    def close(self) -> None:
        for cleanup in self._cleanups:
            cleanup()
        for replica in self.replicas:
            replica.consumer.stop(2.0)


@pytest.fixture
def redis() -> FakeRedisStreams:
    return FakeRedisStreams()


@pytest.fixture
def cluster(h: Harness, redis: FakeRedisStreams) -> Iterator[Cluster]:
    running = Cluster(h, redis)
    yield running
    running.close()


def op_kind(job: LobbyJob) -> OpKind:
    return OpKind.START if job.kind is JobKind.START else OpKind.STOP


def rows_of(h: Harness, game_id: str, job: LobbyJob) -> list[OperationEntry]:
    """The audit rows a job wrote (its op kind, source_ref = its entry id)."""
    return [
        row
        for row in h.rows(game_id)
        if row.source_ref == job.entry_id and row.op_kind is op_kind(job)
    ]


def success_rows(h: Harness, game_id: str, job: LobbyJob) -> list[OperationEntry]:
    return [row for row in rows_of(h, game_id, job) if row.outcome is Outcome.SUCCESS]


def answered(redis: FakeRedisStreams, *jobs: LobbyJob) -> bool:
    return all(redis.answers_of(job) for job in jobs)


def engines(h: Harness, game_id: str) -> list[str]:
    """States of the game's engine containers."""
    return [c.state for c in h.docker.containers.values() if c.name == f"galaxy-game-{game_id}"]


# --- one consumer, one game ----------------------------------------------------------


def test_a_start_and_the_stop_after_it_read_together_are_both_applied_in_order(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    start = redis.add_start(GAME, IMAGE)
    stop = redis.add_stop(GAME)

    cluster.replica()
    eventually("both answers", lambda: answered(redis, start, stop))

    started, stopped = redis.answer_of(start), redis.answer_of(stop)
    assert (started["outcome"], stopped["outcome"]) == ("success", "success")
    assert (started["kind"], stopped["kind"]) == ("start", "stop")
    assert started["game_id"] == stopped["game_id"] == GAME
    assert json.loads(started["record"])["status"] == "running"
    assert json.loads(stopped["record"])["status"] == "stopped"
    assert [(row.source_ref, row.op_kind, row.op_source) for row in h.rows(GAME)] == [
        (start.entry_id, OpKind.START, OpSource.LOBBY_STREAM),
        (stop.entry_id, OpKind.STOP, OpSource.LOBBY_STREAM),
    ]
    assert [started["operation_id"], stopped["operation_id"]] == [
        str(row.id) for row in h.rows(GAME)
    ]
    assert h.record(GAME).status is RuntimeStatus.STOPPED
    assert engines(h, GAME) == ["exited"]
    assert redis.pending_on("rtm-1") == []
    mark = h.store.job_marks[GAME]
    assert mark.job == stop and mark.outcome is Outcome.SUCCESS


def test_a_stop_reason_given_by_lobby_is_applied(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    h.seed_running(GAME)
    stop = redis.add_stop(GAME, reason=str(StopReason.GAME_FINISHED))

    cluster.replica()
    eventually("the answer", lambda: answered(redis, stop))

    assert redis.answer_of(stop)["outcome"] == "success"
    assert h.record(GAME).status is RuntimeStatus.STOPPED


def test_a_job_the_lifecycle_refuses_is_answered_failure_with_its_code(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    bad_game = redis.add_start("../Bad Id", IMAGE)
    foreign_image = redis.add_start(GAME, "evil/engine:1.0.0")

    cluster.replica()
    eventually("both answers", lambda: answered(redis, bad_game, foreign_image))

    assert redis.answer_of(bad_game)["error_code"] == "invalid_request"
    refused = redis.answer_of(foreign_image)
    assert (refused["outcome"], refused["error_code"]) == ("failure", "image_not_allowed")
    assert redis.dead_letters() == []
    assert engines(h, GAME) == []
    # A final failure is Lobby's job done: it settles the game's older jobs.
    assert h.store.job_marks[GAME].job == foreign_image


# --- Lobby's last word wins, across replicas --------------------------------------------


def test_a_stop_taken_before_its_older_start_leaves_the_game_stopped(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    h.seed_stopped(GAME)
    gate = GatedLeases(h.leases, GAME)
    cluster.on_teardown(gate.opened.set)
    start = redis.add_start(GAME, IMAGE)
    # Replica a holds one job at most, so the stop goes to replica b.
    cluster.replica("rtm-a", leases=gate, max_buffered=1)
    eventually("replica a about to take the lease", gate.waiting.is_set)
    stop = redis.add_stop(GAME)

    cluster.replica("rtm-b")
    eventually("the stop's answer", lambda: answered(redis, stop))
    gate.opened.set()
    eventually("the start's answer", lambda: answered(redis, start))

    assert redis.answer_of(stop)["outcome"] == "success"
    superseded = redis.answer_of(start)
    assert superseded["outcome"] == "superseded"
    assert (superseded["superseded_by"], superseded["superseded_by_stream"]) == (
        stop.entry_id,
        stop.stream,
    )
    assert (superseded["error_code"], superseded["operation_id"]) == ("", "")
    assert json.loads(superseded["record"])["status"] == "stopped"
    assert rows_of(h, GAME, start) == []
    assert h.record(GAME).status is RuntimeStatus.STOPPED
    assert h.docker.call_names("create", "start") == []
    assert h.store.job_marks[GAME].job == stop


def test_a_start_and_a_stop_with_the_same_entry_id_count_the_start_first(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    stop = redis.add_stop(GAME, entry_id="1800000000000-0")
    start = redis.add_start(GAME, IMAGE, entry_id="1800000000000-0")

    cluster.replica()
    eventually("both answers", lambda: answered(redis, start, stop))

    assert [row.op_kind for row in h.rows(GAME)] == [OpKind.START, OpKind.STOP]
    assert h.record(GAME).status is RuntimeStatus.STOPPED


def test_two_replicas_taking_interleaved_jobs_of_many_games_end_each_game_as_its_last_job_says(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    rng = random.Random(20261201)
    games = [f"game-{n}" for n in range(16)]
    for game in games:
        h.seed_stopped(game)
    plan = [(game, rng.choice(list(JobKind))) for game in games for _ in range(rng.randint(1, 5))]
    rng.shuffle(plan)
    jobs: list[tuple[str, LobbyJob]] = []

    def add(steps: list[tuple[str, JobKind]]) -> None:
        for game, kind in steps:
            job = redis.add_start(game, IMAGE) if kind is JobKind.START else redis.add_stop(game)
            jobs.append((game, job))

    add(plan[: len(plan) // 2])
    for name, seed in (("rtm-a", 1), ("rtm-b", 2)):
        cluster.replica(name, leases=JitteredLeases(h.leases, seed), workers=3, batch=3)
    add(plan[len(plan) // 2 :])
    eventually("every answer", lambda: answered(redis, *(job for _, job in jobs)), timeout=15)

    assert redis.answer_count() == len(jobs)
    assert redis.dead_letters() == []
    for game in games:
        own = sorted((job for g, job in jobs if g == game), key=lambda job: job.position)
        last = own[-1]
        record = h.record(game)
        if last.kind is JobKind.START:
            assert record.status is RuntimeStatus.RUNNING, game
            assert engines(h, game) == ["running"], game
        else:
            assert record.status is RuntimeStatus.STOPPED, game
            assert "running" not in engines(h, game), game
        applied = []
        for job in own:
            answer = redis.answer_of(job)
            if answer["outcome"] == "superseded":
                newer = next(j for j in own if j.entry_id == answer["superseded_by"])
                assert (
                    newer.position > job.position and newer.stream == answer["superseded_by_stream"]
                ), (game, job, answer)
                assert success_rows(h, game, job) == [], (game, job)
            else:
                assert answer["outcome"] == "success", (game, job, answer)
                (row,) = success_rows(h, game, job)
                assert answer["operation_id"] == str(row.id)
                applied.append((row.id, job.position))
        # What was applied, was applied in Lobby's order.
        assert [position for _, position in sorted(applied)] == sorted(
            position for _, position in applied
        ), game
        assert h.store.job_marks[game].job == last
    assert h.leases.all_released


# --- transient is not poison -------------------------------------------------------------


def test_a_job_whose_lease_is_held_elsewhere_is_retried_without_a_delivery_until_it_frees(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    h.leases.busy.add(GAME)
    job = redis.add_start(GAME, IMAGE)

    cluster.replica()
    eventually("three tries", lambda: h.leases.refused.count(GAME) >= 3)
    assert redis.answers_of(job) == []
    assert redis.owner_of(job) == "rtm-1"
    assert redis.deliveries_of(job) == 1
    h.leases.busy.discard(GAME)
    eventually("the answer", lambda: answered(redis, job))

    assert redis.answer_of(job)["outcome"] == "success"
    assert redis.deliveries_of(job) == 1
    assert redis.dead_letters() == []
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert len(success_rows(h, GAME, job)) == 1


def test_a_job_still_blocked_after_retry_for_is_answered_failure_with_the_transient_code(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    clock = JumpClock()
    retry_for = timedelta(minutes=10)
    h.leases.busy.add(GAME)
    job = redis.add_start(GAME, IMAGE)

    cluster.replica(clock=clock, retry_for=retry_for)
    eventually("two tries", lambda: h.leases.refused.count(GAME) >= 2)
    assert redis.answers_of(job) == []
    clock.advance(retry_for + timedelta(seconds=1))
    eventually("the answer", lambda: answered(redis, job))

    answer = redis.answer_of(job)
    assert (answer["outcome"], answer["error_code"]) == ("failure", "conflict")
    assert answer["error_message"].startswith("gave up after retrying for")
    assert redis.dead_letters() == []
    assert redis.deliveries_of(job) == 1
    # Not Lobby's job done: the watermark stays, so the game's next job applies.
    assert GAME not in h.store.job_marks
    h.leases.busy.discard(GAME)
    retried = redis.add_start(GAME, IMAGE)
    eventually("the next job's answer", lambda: answered(redis, retried))
    assert redis.answer_of(retried)["outcome"] == "success"


def test_jobs_wait_out_a_database_outage_and_are_applied_once_it_is_back(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    h.units_of_work.down = True
    job = redis.add_start(GAME, IMAGE)

    cluster.replica()
    eventually("three tries", lambda: len(h.units_of_work.units) >= 3)
    assert redis.answers_of(job) == []
    assert redis.owner_of(job) == "rtm-1"
    h.units_of_work.down = False
    eventually("the answer", lambda: answered(redis, job))

    assert redis.answer_of(job)["outcome"] == "success"
    assert redis.deliveries_of(job) == 1
    assert engines(h, GAME) == ["running"]
    assert len(success_rows(h, GAME, job)) == 1


def test_a_start_whose_commit_fails_is_retried_and_leaves_one_engine(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    h.store.fail_next_appends(1)
    job = redis.add_start(GAME, IMAGE)

    cluster.replica()
    eventually("the answer", lambda: answered(redis, job))

    assert redis.answer_of(job)["outcome"] == "success"
    assert h.docker.call_names("create") == ["create"] * 2
    assert engines(h, GAME) == ["running"]
    assert len(success_rows(h, GAME, job)) == 1


def test_an_answer_that_cannot_be_published_is_retried_without_applying_the_job_again(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    job = redis.add_start(GAME, IMAGE)
    replica = cluster.consumer()

    def lose_redis(container_id: str) -> None:
        replica.streams.down = True

    h.docker.before("start", lose_redis)
    replica.consumer.register()
    replica.consumer.start()
    eventually("two failed answers", lambda: replica.streams.calls.count("answer") >= 2)
    h.docker.before("start", None)
    replica.streams.down = False
    eventually("the answer", lambda: answered(redis, job))

    assert redis.answer_of(job)["outcome"] == "success"
    assert h.docker.call_names("create") == ["create"]
    assert len(rows_of(h, GAME, job)) == 1


def test_a_consumer_started_while_redis_is_down_serves_once_it_is_back(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    redis.down = True
    replica = cluster.replica()  # registering is left to the reader
    job = redis.add_start(GAME, IMAGE)
    eventually("a failed read", lambda: replica.streams.calls.count("claim_name") >= 2)
    redis.down = False
    eventually("the answer", lambda: answered(redis, job))

    assert redis.answer_of(job)["outcome"] == "success"
    assert redis.present("rtm-1")


# --- one answer per job, whatever was seen before ----------------------------------------


def test_a_job_applied_before_a_crash_is_answered_with_its_stored_outcome_and_not_applied_again(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    job = redis.add_start(GAME, IMAGE)
    # The previous process under this name took the job, applied it, and
    # was killed before answering it.
    assert len(redis.consumer("rtm-1").read_new(8, timedelta(0))) == 1
    start, _ = cluster.services()
    first = start.handle(
        StartRequest(GAME, IMAGE, OpSource.LOBBY_STREAM, source_ref=job.entry_id, job=job)
    )
    assert first.ok and first.record is not None

    cluster.replica("rtm-1")
    eventually("the answer", lambda: answered(redis, job))

    answer = redis.answer_of(job)
    assert (answer["outcome"], answer["operation_id"]) == ("success", str(first.operation_id))
    record = json.loads(answer["record"])
    assert record["current_container_id"] == first.record.current_container_id
    assert h.docker.call_names("create") == ["create"]
    assert len(h.rows(GAME)) == 1
    assert redis.deliveries_of(job) == 2


def test_a_failed_job_seen_again_repeats_its_failure_without_a_second_row(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    job = redis.add_stop(GAME)
    assert len(redis.consumer("rtm-1").read_new(8, timedelta(0))) == 1
    _, stop = cluster.services()
    first = stop.handle(
        StopRequest(
            GAME,
            OpSource.LOBBY_STREAM,
            reason=StopReason.LOBBY_REQUEST,
            source_ref=job.entry_id,
            job=job,
        )
    )
    assert first.failure is not None and first.failure.code is ErrorCode.NOT_FOUND

    cluster.replica("rtm-1")
    eventually("the answer", lambda: answered(redis, job))

    answer = redis.answer_of(job)
    assert (answer["outcome"], answer["error_code"]) == ("failure", "not_found")
    assert answer["error_message"] == first.failure.message
    assert answer["operation_id"] == str(first.operation_id)
    assert len(h.rows(GAME)) == 1


def test_an_answered_job_delivered_again_is_acknowledged_without_a_second_answer(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    job = redis.add_start(GAME, IMAGE)
    first = cluster.replica("rtm-1")
    eventually("the answer", lambda: answered(redis, job))
    assert first.consumer.stop(2.0)
    redis.redeliver(job, to="rtm-1", deliveries=1)  # its acknowledgement was lost

    cluster.replica("rtm-1")
    eventually("the job acknowledged again", lambda: redis.owner_of(job) is None)

    assert [(a.consumer, a.outcome) for a in redis.attempts_of(job)] == [
        ("rtm-1", AnswerOutcome.ANSWERED),
        ("rtm-1", AnswerOutcome.ALREADY_ANSWERED),
    ]
    assert len(redis.answers_of(job)) == 1
    assert h.docker.call_names("create") == ["create"]
    assert len(h.rows(GAME)) == 1


def test_a_consumer_whose_presence_expired_loses_its_job_to_another_and_its_answer_is_not_ours(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    blocker = Blocker()
    h.docker.before("create", blocker)
    cluster.on_teardown(blocker.release)
    job = redis.add_start(GAME, IMAGE)
    a = cluster.replica("rtm-a")
    eventually("replica a creating the engine", blocker.entered.is_set)
    # Replica a is cut off from Redis and cannot renew its presence; it expires.
    a.streams.down = True
    redis.expire_presence("rtm-a")

    gate = GatedLeases(h.leases, GAME)
    cluster.on_teardown(gate.opened.set)
    cluster.replica("rtm-b", leases=gate)
    eventually("replica b running the job it took over", gate.waiting.is_set)
    assert redis.owner_of(job) == "rtm-b"
    assert redis.deliveries_of(job) == 2
    a.streams.down = False
    blocker.release()
    eventually("replica a's answer", lambda: redis.attempts_of(job))
    assert [(x.consumer, x.outcome) for x in redis.attempts_of(job)] == [
        ("rtm-a", AnswerOutcome.NOT_OURS)
    ]
    assert redis.answers_of(job) == []
    gate.opened.set()
    eventually("replica b's answer", lambda: answered(redis, job))

    assert [(x.consumer, x.outcome) for x in redis.attempts_of(job)] == [
        ("rtm-a", AnswerOutcome.NOT_OURS),
        ("rtm-b", AnswerOutcome.ANSWERED),
    ]
    answer = redis.answer_of(job)
    (row,) = success_rows(h, GAME, job)
    assert (answer["outcome"], answer["operation_id"]) == ("success", str(row.id))
    assert engines(h, GAME) == ["running"]
    assert h.docker.call_names("create") == ["create"]


def test_entries_of_a_live_consumer_are_never_taken_over(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    h.leases.busy.add(GAME)
    job = redis.add_start(GAME, IMAGE)
    cluster.replica("rtm-a")
    eventually("replica a holding the job", lambda: redis.owner_of(job) == "rtm-a")
    b = cluster.replica("rtm-b")

    # Long past the claim idle time of b, which keeps looking for abandoned entries.
    eventually("b looking three times", lambda: b.streams.calls.count("claim_abandoned") >= 3)
    eventually("many tries of a", lambda: h.leases.refused.count(GAME) >= 5)
    assert redis.owner_of(job) == "rtm-a"
    assert redis.deliveries_of(job) == 1
    h.leases.busy.discard(GAME)
    eventually("the answer", lambda: answered(redis, job))
    assert [x.consumer for x in redis.attempts_of(job)] == ["rtm-a"]


# --- dead letters ------------------------------------------------------------------------


def test_malformed_jobs_go_to_the_dead_letters_at_once_with_one_answer(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    no_image = redis.add_job(JobKind.START, {"game_id": GAME})
    bad_reason = redis.add_stop(GAME, reason="because")
    not_utf8 = redis.add_job(JobKind.START, {b"game_id": b"g\xff", b"image_ref": IMAGE.encode()})
    good = redis.add_start(GAME, IMAGE)

    cluster.replica()
    eventually("every answer", lambda: answered(redis, no_image, bad_reason, not_utf8, good))

    assert len(redis.dead_letters()) == 3
    letters = [redis.answer_of(job) for job in (no_image, bad_reason, not_utf8)]
    assert [letter["deliveries"] for letter in letters] == ["1", "1", "1"]
    assert letters[0]["reason"] == "malformed job: missing image_ref"
    assert letters[1]["reason"].startswith("malformed job: unknown reason 'because'")
    assert "not valid UTF-8" in letters[2]["reason"]
    assert json.loads(redis.answer_of(not_utf8)["fields"]) == {
        "game_id": "g\\xff",
        "image_ref": IMAGE,
    }
    assert [r["job_id"] for r in redis.results()] == [good.entry_id]
    assert [row.source_ref for row in h.rows()] == [good.entry_id]
    assert h.leases.acquires_of(GAME) == 1


@pytest.mark.parametrize(("earlier", "dead"), [(2, False), (3, True)])
def test_a_job_delivered_more_than_max_deliveries_goes_to_the_dead_letters(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster, earlier: int, dead: bool
) -> None:
    job = redis.add_start(GAME, IMAGE)
    # Consumers that took it died on it, `earlier` times.
    redis.consumer("ghost").read_new(8, timedelta(0))
    redis.redeliver(job, to="ghost", deliveries=earlier)

    cluster.replica(max_deliveries=3)
    eventually("the answer", lambda: answered(redis, job))

    assert redis.deliveries_of(job) == earlier + 1
    if dead:
        (letter,) = redis.dead_letters()
        assert letter["reason"].startswith("delivered 4 times, more than the limit of 3")
        assert letter["deliveries"] == "4"
        assert json.loads(letter["fields"]) == {"game_id": GAME, "image_ref": IMAGE}
        assert redis.results() == [] and h.rows() == [] and engines(h, GAME) == []
    else:
        assert redis.answer_of(job)["outcome"] == "success"
        assert redis.dead_letters() == []


def test_a_job_deleted_from_its_stream_while_its_consumer_was_gone_is_dead_lettered_once(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    job = redis.add_start(GAME, IMAGE)
    redis.consumer("ghost").read_new(8, timedelta(0))
    redis.delete_entry(job)

    cluster.replica()
    eventually("the answer", lambda: answered(redis, job))

    assert redis.answer_of(job)["reason"] == DELETED_REASON
    assert redis.results() == [] and h.rows() == []
    assert redis.owner_of(job) is None


def test_a_restart_takes_back_every_own_pending_job_even_when_some_were_deleted(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    jobs = [redis.add_start(f"game-{n}", IMAGE) for n in range(3)]
    assert len(redis.consumer("rtm-1").read_new(8, timedelta(0))) == 3
    redis.delete_entry(jobs[0])  # while the process was down

    cluster.replica("rtm-1", batch=2)
    eventually("every answer", lambda: answered(redis, *jobs), timeout=2)

    assert redis.answer_of(jobs[0])["reason"] == DELETED_REASON
    assert [redis.answer_of(job)["outcome"] for job in jobs[1:]] == ["success", "success"]
    assert redis.pending_on("rtm-1") == []


def test_a_restart_takes_back_more_own_pending_jobs_than_one_batch(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    jobs = [redis.add_start(f"game-{n}", IMAGE) for n in range(5)]
    jobs.append(redis.add_stop("game-0"))
    assert len(redis.consumer("rtm-1").read_new(8, timedelta(0))) == 6

    cluster.replica("rtm-1", batch=2)
    eventually("every answer", lambda: answered(redis, *jobs))

    assert all(redis.deliveries_of(job) == 2 for job in jobs)
    assert h.record("game-0").status is RuntimeStatus.STOPPED


# --- draining, names, housekeeping -------------------------------------------------------


def test_draining_lets_the_running_job_finish_and_leaves_unstarted_jobs_pending(
    h: Harness, redis: FakeRedisStreams, cluster: Cluster
) -> None:
    blocker = Blocker("galaxy-game-game-1")
    h.docker.before("create", blocker)
    cluster.on_teardown(blocker.release)
    running = redis.add_start("game-1", IMAGE)
    queued = redis.add_start("game-2", IMAGE)
    behind = redis.add_stop("game-1")
    replica = cluster.replica(workers=1)
    eventually("the first job running", blocker.entered.is_set)
    eventually("every job read", lambda: len(redis.pending_on("rtm-1")) == 3)

    replica.consumer.begin_drain()
    blocker.release()
    eventually("the running job's answer", lambda: answered(redis, running))
    assert replica.consumer.stop(2.0)

    assert redis.answer_of(running)["outcome"] == "success"
    assert redis.answers_of(queued) == [] and redis.answers_of(behind) == []
    assert redis.pending_on("rtm-1") == [queued, behind]
    assert engines(h, "game-2") == []
    assert not redis.present("rtm-1")

    # The same name started again takes them back and applies them.
    cluster.replica("rtm-1")
    eventually("the other answers", lambda: answered(redis, queued, behind))
    assert redis.answer_count() == 3
    assert h.record("game-1").status is RuntimeStatus.STOPPED
    assert h.record("game-2").status is RuntimeStatus.RUNNING
    assert redis.deliveries_of(queued) == redis.deliveries_of(behind) == 2


def test_register_refuses_a_name_another_live_process_holds(
    redis: FakeRedisStreams, cluster: Cluster
) -> None:
    live = redis.consumer("rtm-1", presence_ttl=timedelta(minutes=1))
    assert live.claim_name()
    replica = cluster.consumer(
        "rtm-1", clock=TickingClock(step=1.0), presence_ttl=timedelta(milliseconds=100)
    )

    with pytest.raises(ConsumerNameTaken, match="RTMANAGER_INSTANCE_ID"):
        replica.consumer.register()

    assert redis.presence["rtm-1"][0] == live.token
    assert replica.streams.calls.count("claim_name") >= 2


def test_register_waits_out_the_presence_of_a_predecessor_that_was_killed(
    redis: FakeRedisStreams, cluster: Cluster
) -> None:
    ttl = timedelta(milliseconds=300)
    killed = redis.consumer("rtm-1", presence_ttl=ttl)
    assert killed.claim_name()
    started = time.monotonic()
    replica = cluster.consumer("rtm-1", presence_ttl=ttl)

    replica.consumer.register()

    assert time.monotonic() - started >= 0.25
    assert redis.presence["rtm-1"][0] == replica.streams.token


def test_a_running_consumer_keeps_its_presence_and_gives_it_up_on_stop(
    redis: FakeRedisStreams, cluster: Cluster
) -> None:
    replica = cluster.replica(presence_ttl=timedelta(milliseconds=300))
    eventually("two renewals", lambda: replica.streams.calls.count("keep_name") >= 2)
    assert redis.presence["rtm-1"][0] == replica.streams.token

    assert replica.consumer.stop(2.0)
    assert "rtm-1" not in redis.presence


def test_consumers_long_gone_are_removed_from_the_group_once_nothing_is_pending_on_them(
    redis: FakeRedisStreams, cluster: Cluster
) -> None:
    job = redis.add_stop("game-9")
    redis.consumer("gone").read_new(8, timedelta(0))  # took the job and died
    redis.consumer("idle").read_new(8, timedelta(0))  # found nothing and died

    cluster.replica(consumer_expiry=timedelta(milliseconds=1))
    eventually("the idle consumer removed", lambda: "idle" not in redis.group_consumers)
    # Removing the other one first would have dropped the job it held.
    eventually("the answer", lambda: answered(redis, job))
    eventually("the other one removed", lambda: "gone" not in redis.group_consumers)

    assert redis.answer_of(job)["error_code"] == "not_found"
    assert "rtm-1" in redis.group_consumers


def test_the_consumer_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1"):
        ConsumerSettings(consumer="c", workers=0)
    with pytest.raises(ValueError, match="claim_idle must be positive"):
        ConsumerSettings(consumer="c", claim_idle=timedelta(0))
    assert replace(ConsumerSettings(consumer="c"), batch=3).batch == 3
