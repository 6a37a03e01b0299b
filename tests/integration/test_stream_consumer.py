"""The stream consumer against a real Redis, with fake start/stop lifecycles.

The fakes record every request and return results the test chooses, so
these tests check the consumer's contract (SPEC §4): what is called, in
which order, what is published, acknowledged, retried, dead-lettered and
reclaimed — fast and without Docker or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, cast

import pytest
import redis

from rtmanager.adapters.redis.client import create_redis
from rtmanager.domain.errors import ErrorCode, Failure
from rtmanager.domain.operation import OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.telemetry import Telemetry
from rtmanager.workers.stream_consumer import StreamConsumer, StreamSettings
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration

GROUP = "rtmanager"
CONSUMER = "rtm-test"
IMAGE = "galaxy/engine-stub:1.0.0"

Request = StartRequest | StopRequest
Behaviour = Callable[[Request], OperationResult | None]


# --- fakes -------------------------------------------------------------------------------


def record_of(game_id: str, status: RuntimeStatus, image_ref: str = IMAGE) -> RuntimeRecord:
    now = utc_now()
    return RuntimeRecord(
        game_id=game_id,
        status=status,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/games/{game_id}",
        docker_network="galaxy-engines",
        last_op_at=now,
        created_at=now,
        current_container_id="c0ffee" if status is RuntimeStatus.RUNNING else "",
        current_image_ref=image_ref,
        started_at=now,
        stopped_at=now if status is RuntimeStatus.STOPPED else None,
    )


def success(request: Request) -> OperationResult:
    if isinstance(request, StartRequest):
        record = record_of(request.game_id, RuntimeStatus.RUNNING, request.image_ref)
        return OperationResult(request.game_id, OpKind.START, Outcome.SUCCESS, record=record)
    record = record_of(request.game_id, RuntimeStatus.STOPPED)
    return OperationResult(request.game_id, OpKind.STOP, Outcome.SUCCESS, record=record)


def failure(
    request: Request, code: ErrorCode, message: str, *, race: bool = False
) -> OperationResult:
    kind = OpKind.START if isinstance(request, StartRequest) else OpKind.STOP
    return OperationResult(
        request.game_id, kind, Outcome.FAILURE, failure=Failure(code, message, race=race)
    )


@dataclass
class Call:
    request: Request
    started: float
    finished: float = 0.0


@dataclass
class FakeLifecycles:
    """Start and stop services sharing one call log.

    `behaviour(request)` may return the result to give (None: success) and
    may sleep; `overlaps` counts calls that ran while another call of the
    same game was running (which must never happen).
    """

    behaviour: Behaviour = lambda request: None
    calls: list[Call] = field(default_factory=list)
    overlaps: int = 0
    _running: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    started: threading.Event = field(default_factory=threading.Event)

    def handle(self, request: Request) -> OperationResult:
        call = Call(request, time.monotonic())
        with self._lock:
            self.calls.append(call)
            if request.game_id in self._running:
                self.overlaps += 1
            self._running.add(request.game_id)
        self.started.set()
        try:
            return self.behaviour(request) or success(request)
        finally:
            call.finished = time.monotonic()
            with self._lock:
                self._running.discard(request.game_id)

    def requests(self, game_id: str | None = None) -> list[Request]:
        with self._lock:
            return [c.request for c in self.calls if game_id in (None, c.request.game_id)]


class StartSide:
    def __init__(self, fake: FakeLifecycles) -> None:
        self.fake = fake

    def handle(self, request: StartRequest) -> OperationResult:
        return self.fake.handle(request)


class StopSide:
    def __init__(self, fake: FakeLifecycles) -> None:
        self.fake = fake

    def handle(self, request: StopRequest) -> OperationResult:
        return self.fake.handle(request)


class CountingTelemetry(Telemetry):
    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def stream_job(self, stream: str, outcome: str) -> None:
        with self._lock:
            self.jobs.append((stream, outcome))

    def outcomes(self) -> list[str]:
        with self._lock:
            return [outcome for _, outcome in self.jobs]


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = create_redis(REDIS_URL, timeout=timedelta(seconds=5))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def streams(redis_prefix: str) -> StreamSettings:
    return StreamSettings(
        start_stream=f"{redis_prefix}start_jobs",
        stop_stream=f"{redis_prefix}stop_jobs",
        results_stream=f"{redis_prefix}job_results",
        dead_letter_stream=f"{redis_prefix}dead_letter",
        group=GROUP,
        consumer=CONSUMER,
        max_deliveries=3,
        workers=4,
        block=timedelta(milliseconds=100),
        retry_base=timedelta(milliseconds=20),
        retry_max=timedelta(milliseconds=80),
    )


@dataclass
class Rig:
    client: redis.Redis
    settings: StreamSettings
    fake: FakeLifecycles
    telemetry: CountingTelemetry
    consumers: list[StreamConsumer] = field(default_factory=list)

    def consumer(self, client: redis.Redis | None = None, **changes: Any) -> StreamConsumer:
        settings = replace(self.settings, **changes)
        consumer = StreamConsumer(
            client or self.client,
            StartSide(self.fake),
            StopSide(self.fake),
            settings,
            self.telemetry,
        )
        self.consumers.append(consumer)
        return consumer

    def start(self, **changes: Any) -> StreamConsumer:
        consumer = self.consumer(**changes)
        consumer.start()
        return consumer

    def publish_start(self, game_id: str, image_ref: str = IMAGE, **extra: Any) -> str:
        fields: dict[Any, Any] = {"game_id": game_id, "image_ref": image_ref, **extra}
        return _text(self.client.xadd(self.settings.start_stream, fields))

    def publish_stop(self, game_id: str, **extra: Any) -> str:
        fields: dict[Any, Any] = {"game_id": game_id, **extra}
        return _text(self.client.xadd(self.settings.stop_stream, fields))

    def results(self) -> list[dict[str, str]]:
        return entries(self.client, self.settings.results_stream)

    def dead_letters(self) -> list[dict[str, str]]:
        return entries(self.client, self.settings.dead_letter_stream)

    def pending(self, stream: str | None = None) -> int:
        total = 0
        for name in [stream] if stream else [self.settings.start_stream, self.settings.stop_stream]:
            with contextlib.suppress(redis.exceptions.ResponseError):
                summary = cast("dict[str, Any]", self.client.xpending(name, GROUP))
                total += int(summary["pending"])
        return total

    def pending_ids(self, stream: str) -> list[str]:
        rows = cast(
            "list[dict[str, Any]]", self.client.xpending_range(stream, GROUP, "-", "+", 100)
        )
        return [_text(row["message_id"]) for row in rows]

    def create_groups(self) -> None:
        for stream in (self.settings.start_stream, self.settings.stop_stream):
            with contextlib.suppress(redis.exceptions.ResponseError):
                self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)


@pytest.fixture
def rig(client: redis.Redis, streams: StreamSettings) -> Iterator[Rig]:
    rig = Rig(client, streams, FakeLifecycles(), CountingTelemetry())
    try:
        yield rig
    finally:
        for consumer in rig.consumers:
            consumer.stop(5)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(stream))
    return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in rows]


def poll(condition: Callable[[], bool], *, within: float = 5.0, every: float = 0.01) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


# --- the tests ----------------------------------------------------------------------------


def test_start_job_is_applied_published_and_acknowledged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rtmanager.workers.stream_consumer")
    rig.start()
    job_id = rig.publish_start("g1")

    assert poll(lambda: len(rig.results()) == 1)
    assert poll(lambda: rig.pending() == 0)

    [request] = rig.fake.requests()
    assert request == StartRequest(
        game_id="g1", image_ref=IMAGE, op_source=OpSource.LOBBY_STREAM, source_ref=job_id
    )
    [result] = rig.results()
    assert {k: v for k, v in result.items() if k != "record"} == {
        "job_id": job_id,
        "stream": rig.settings.start_stream,
        "game_id": "g1",
        "outcome": "success",
        "error_code": "",
        "error_message": "",
    }
    record = json.loads(result["record"])
    assert record["game_id"] == "g1"
    assert record["status"] == "running"
    assert record["current_image_ref"] == IMAGE
    assert record["started_at"].endswith("+00:00")
    assert rig.telemetry.jobs == [(rig.settings.start_stream, "success")]
    [line] = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    fields = [getattr(line, name) for name in ("game_id", "stream", "outcome", "error_code")]
    assert fields == ["g1", rig.settings.start_stream, "success", ""]


def test_stop_job_passes_its_reason_and_defaults_to_lobby_request(rig: Rig) -> None:
    rig.start()
    finished = rig.publish_stop("g1", reason="game_finished")
    plain = rig.publish_stop("g2")

    assert poll(lambda: len(rig.results()) == 2 and rig.pending() == 0)

    by_game = {r.game_id: r for r in rig.fake.requests()}
    assert by_game["g1"] == StopRequest(
        game_id="g1",
        op_source=OpSource.LOBBY_STREAM,
        reason=StopReason.GAME_FINISHED,
        source_ref=finished,
    )
    assert by_game["g2"] == StopRequest(
        game_id="g2",
        op_source=OpSource.LOBBY_STREAM,
        reason=StopReason.LOBBY_REQUEST,
        source_ref=plain,
    )
    assert {r["stream"] for r in rig.results()} == {rig.settings.stop_stream}


def test_final_failure_is_published_and_acknowledged(rig: Rig) -> None:
    rig.fake.behaviour = lambda request: failure(request, ErrorCode.NOT_FOUND, "no record")
    rig.start()
    job_id = rig.publish_stop("ghost")

    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)

    [result] = rig.results()
    assert (result["job_id"], result["outcome"]) == (job_id, "failure")
    assert (result["error_code"], result["error_message"], result["record"]) == (
        "not_found",
        "no record",
        "",
    )
    assert len(rig.fake.requests()) == 1
    assert rig.telemetry.outcomes() == ["failure"]


def test_start_then_stop_of_one_game_apply_in_order(rig: Rig) -> None:
    # The start is slow, so a stop running on its own would overtake it.
    def slow_start(request: Request) -> None:
        if isinstance(request, StartRequest):
            time.sleep(0.2)

    rig.fake.behaviour = slow_start
    rig.start()
    start_id = rig.publish_start("g1")
    stop_id = rig.publish_stop("g1")

    assert poll(lambda: len(rig.results()) == 2 and rig.pending() == 0)

    assert [r.source_ref for r in rig.fake.requests()] == [start_id, stop_id]
    assert rig.fake.overlaps == 0


@pytest.mark.parametrize("running_first", [False, True], ids=["backlog", "live"])
def test_interleaved_games_keep_entry_id_order_per_game_with_small_batches(
    rig: Rig, running_first: bool
) -> None:
    rng = random.Random(7)

    def jittery(request: Request) -> None:
        time.sleep(rng.random() * 0.004)

    rig.fake.behaviour = jittery
    if running_first:
        rig.start(batch_size=2)
    games = [f"g{n}" for n in range(12)]
    published: dict[str, list[str]] = {game: [] for game in games}
    for _ in range(4):
        # A burst of starts, then the stops in another order: the stop stream
        # is short, so a batch of 2 reads a game's stop long before its
        # start; only the watermark keeps the stop waiting.
        for game in rng.sample(games, len(games)):
            published[game].append(rig.publish_start(game))
        # Ids of the two streams only compare by millisecond: entries of one
        # millisecond on both streams order by their per-stream sequence,
        # not by publish time. A new millisecond keeps publish order = id order.
        time.sleep(0.002)
        for game in rng.sample(games, len(games)):
            published[game].append(rig.publish_stop(game))
        time.sleep(0.002)
    if not running_first:
        rig.start(batch_size=2)

    total = sum(len(ids) for ids in published.values())
    assert poll(lambda: len(rig.results()) == total and rig.pending() == 0, within=15)

    def as_order(entry_id: str) -> tuple[int, int]:
        ms, seq = entry_id.split("-")
        return int(ms), int(seq)

    for game in games:
        applied = [r.source_ref for r in rig.fake.requests(game)]
        assert applied == sorted(published[game], key=as_order), game
        kinds = [type(r).__name__ for r in rig.fake.requests(game)]
        assert kinds == ["StartRequest", "StopRequest"] * 4, game
    assert rig.fake.overlaps == 0


def test_different_games_run_in_parallel(rig: Rig) -> None:
    rig.fake.behaviour = lambda request: time.sleep(0.5)
    rig.start()
    began = time.monotonic()
    rig.publish_start("g1")
    rig.publish_start("g2")

    assert poll(lambda: len(rig.results()) == 2)
    elapsed = time.monotonic() - began

    assert elapsed < 0.9
    first, second = rig.fake.calls
    assert second.started < first.finished


def test_redelivered_job_is_applied_again_harmlessly(rig: Rig) -> None:
    rig.start()
    job_id = rig.publish_start("g1")
    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)

    # Rewind the group: Redis delivers the same entry again.
    for stream in (rig.settings.start_stream, rig.settings.stop_stream):
        rig.client.xgroup_setid(stream, GROUP, "0")
    # And Lobby may publish the same job twice.
    again = rig.publish_start("g1")

    assert poll(lambda: len(rig.results()) == 3 and rig.pending() == 0)
    assert [r.source_ref for r in rig.fake.requests()] == [job_id, job_id, again]
    assert [r["job_id"] for r in rig.results()] == [job_id, job_id, again]
    assert {r["outcome"] for r in rig.results()} == {"success"}


def test_malformed_jobs_are_dead_lettered_and_acknowledged(rig: Rig) -> None:
    rig.start()
    start = rig.settings.start_stream
    stop = rig.settings.stop_stream
    no_image = rig.publish_start("g1", image_ref="")
    rig.client.xadd(start, {"image_ref": IMAGE})
    bad_bytes = _text(rig.client.xadd(start, {"game_id": b"g\xff", "image_ref": IMAGE}))
    bad_reason = rig.publish_stop("g2", reason="tired")
    fine = rig.publish_stop("g3", note="unknown fields are fine")

    assert poll(lambda: len(rig.dead_letters()) == 4 and len(rig.results()) == 1)
    assert poll(lambda: rig.pending() == 0)

    # Ids are unique per stream only: both streams may hand out the same id.
    letters = {(letter["stream"], letter["job_id"]): letter for letter in rig.dead_letters()}
    assert letters[start, no_image]["reason"] == "malformed job: empty image_ref"
    assert letters[start, no_image]["deliveries"] == "1"
    assert json.loads(letters[start, no_image]["fields"]) == {"game_id": "g1", "image_ref": ""}
    assert "game_id" in letters[start, bad_bytes]["reason"]
    assert "UTF-8" in letters[start, bad_bytes]["reason"]
    assert "unknown reason 'tired'" in letters[stop, bad_reason]["reason"]
    assert "malformed job: missing game_id" in {letter["reason"] for letter in letters.values()}
    assert [r.source_ref for r in rig.fake.requests()] == [fine]
    assert rig.telemetry.outcomes().count("dead_letter") == 4


def test_transient_failure_is_retried_until_it_succeeds(rig: Rig) -> None:
    attempts: list[int] = []

    def busy_once(request: Request) -> OperationResult | None:
        attempts.append(1)
        if len(attempts) == 1:
            return failure(request, ErrorCode.CONFLICT, "lease busy", race=True)
        return None

    rig.fake.behaviour = busy_once
    rig.start()
    job_id = rig.publish_start("g1")

    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)

    assert [r.source_ref for r in rig.fake.requests()] == [job_id, job_id]
    [result] = rig.results()
    assert result["outcome"] == "success"
    assert rig.telemetry.outcomes() == ["retry", "success"]


def test_job_failing_transiently_is_dead_lettered_after_max_deliveries(rig: Rig) -> None:
    rig.fake.behaviour = lambda request: failure(
        request, ErrorCode.SERVICE_UNAVAILABLE, "docker unreachable"
    )
    rig.start()
    job_id = rig.publish_start("g1")
    later = rig.publish_stop("g1")

    assert poll(lambda: len(rig.dead_letters()) == 2 and rig.pending() == 0)

    # max_deliveries=3: applied three times, dead-lettered on the fourth delivery.
    requests = [r.source_ref for r in rig.fake.requests()]
    assert requests == [job_id] * 3 + [later] * 3
    letter = rig.dead_letters()[0]
    assert (letter["job_id"], letter["deliveries"]) == (job_id, "4")
    assert "more than the limit of 3" in letter["reason"]
    assert "service_unavailable: docker unreachable" in letter["reason"]
    assert rig.results() == []
    # Retries back off: the three attempts are spread out.
    calls = rig.fake.calls[:3]
    assert calls[2].started - calls[0].started >= 0.02
    assert rig.telemetry.outcomes().count("retry") == 6


def test_job_is_not_acknowledged_until_its_result_is_published(rig: Rig) -> None:
    # The results stream cannot be written (a string sits on its key).
    rig.client.set(rig.settings.results_stream, "in the way")
    rig.start()
    job_id = rig.publish_start("g1")

    assert poll(lambda: "retry" in rig.telemetry.outcomes())
    assert rig.pending_ids(rig.settings.start_stream) == [job_id]

    rig.client.delete(rig.settings.results_stream)
    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)
    # The outcome was kept: only publishing was retried, the start ran once.
    assert [r.source_ref for r in rig.fake.requests()] == [job_id]
    assert rig.results()[0]["outcome"] == "success"


def test_entries_of_a_dead_consumer_are_reclaimed(rig: Rig) -> None:
    rig.create_groups()
    job_id = rig.publish_start("g1")
    # "dead-1" takes the entry and dies without acknowledging it.
    taken = rig.client.xreadgroup(GROUP, "dead-1", {rig.settings.start_stream: ">"}, count=10)
    assert taken
    assert rig.pending_ids(rig.settings.start_stream) == [job_id]

    rig.start(claim_idle=timedelta(milliseconds=300))

    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)
    assert [r.source_ref for r in rig.fake.requests()] == [job_id]
    assert rig.results()[0]["job_id"] == job_id


def test_own_pending_entries_are_read_again_on_restart(rig: Rig) -> None:
    rig.create_groups()
    job_id = rig.publish_stop("g1")
    # A previous run under the same consumer name read it, then crashed.
    rig.client.xreadgroup(GROUP, CONSUMER, {rig.settings.stop_stream: ">"}, count=10)

    rig.start()  # claim_idle is 30s: only the re-read of own entries can find it

    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)
    assert [r.source_ref for r in rig.fake.requests()] == [job_id]


def test_long_jobs_are_not_reclaimed_by_other_consumers(rig: Rig) -> None:
    # The job lasts more than twice the idle time after which entries are reclaimed.
    rig.fake.behaviour = lambda request: time.sleep(1.2)
    rig.start(claim_idle=timedelta(milliseconds=500))
    rig.start(claim_idle=timedelta(milliseconds=500), consumer="rtm-other")
    job_id = rig.publish_start("g1")
    assert poll(rig.fake.started.is_set)
    time.sleep(1.0)

    # The holder keeps its entry fresh: neither the other replica nor its
    # own reclaim pass takes it over (which would count a delivery).
    [row] = cast(
        "list[dict[str, Any]]",
        rig.client.xpending_range(rig.settings.start_stream, GROUP, "-", "+", 10),
    )
    assert (_text(row["message_id"]), row["times_delivered"]) == (job_id, 1)
    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)
    assert len(rig.fake.requests()) == 1


def test_stop_lets_the_running_job_finish_and_leaves_the_rest_pending(rig: Rig) -> None:
    release = threading.Event()

    def slow(request: Request) -> None:
        release.wait(5)

    rig.fake.behaviour = slow
    consumer = rig.start(workers=1)
    running = rig.publish_start("g1")
    assert poll(rig.fake.started.is_set)
    waiting = rig.publish_start("g2")
    assert poll(lambda: waiting in rig.pending_ids(rig.settings.start_stream))

    threading.Timer(0.2, release.set).start()
    assert consumer.stop(5) is True

    assert [r.source_ref for r in rig.fake.requests()] == [running]
    assert [r["job_id"] for r in rig.results()] == [running]
    # The job never started stays pending: not acknowledged, not lost.
    assert rig.pending_ids(rig.settings.start_stream) == [waiting]

    successor = rig.start(consumer=CONSUMER)
    assert poll(lambda: len(rig.results()) == 2 and rig.pending() == 0)
    assert [r.source_ref for r in rig.fake.requests()] == [running, waiting]
    assert successor.stop(5)


def test_stop_returns_false_when_a_job_outlasts_the_timeout(rig: Rig) -> None:
    release = threading.Event()

    def slow(request: Request) -> None:
        release.wait(5)

    rig.fake.behaviour = slow
    consumer = rig.start(workers=1)
    job_id = rig.publish_start("g1")
    assert poll(rig.fake.started.is_set)

    assert consumer.stop(0.2) is False

    release.set()
    # The job still completes after stop() returned, and only then is acknowledged.
    assert poll(lambda: len(rig.results()) == 1 and rig.pending() == 0)
    assert rig.results()[0]["job_id"] == job_id


class FlakyProxy:
    """A TCP proxy in front of Redis that can drop every connection on demand."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            if not self._up.is_set():
                downstream.close()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self._up.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.down()
        self._server.close()


def test_consumer_survives_a_redis_outage(rig: Rig) -> None:
    target = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
    proxy = FlakyProxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))
    db = int(target.get("db", 0))
    flaky = create_redis(f"redis://127.0.0.1:{proxy.port}/{db}", timeout=timedelta(seconds=1))
    try:
        consumer = rig.consumer(client=flaky)
        consumer.start()
        first = rig.publish_start("g1")
        assert poll(lambda: len(rig.results()) == 1)

        proxy.down()
        time.sleep(0.5)  # the reader and workers now fail, log and back off
        second = rig.publish_stop("g1")
        time.sleep(0.3)
        proxy.up()

        assert poll(lambda: len(rig.results()) == 2 and rig.pending() == 0, within=10)
        assert [r.source_ref for r in rig.fake.requests()] == [first, second]
        assert consumer.stop(5)
    finally:
        flaky.close()
        proxy.close()


def test_block_must_be_shorter_than_the_socket_timeout(rig: Rig) -> None:
    with pytest.raises(ValueError, match="shorter than the Redis socket timeout"):
        rig.consumer(block=timedelta(seconds=5))
