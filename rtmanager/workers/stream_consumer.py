"""The Lobby's job streams: start and stop engines on request (SPEC §4 Stream consumer).

Lobby appends start jobs (`game_id`, `image_ref`) and stop jobs (`game_id`,
optional `reason`) to two Redis streams. `StreamConsumer` reads both through
one consumer group, applies each job through the start/stop lifecycle
(op_source `lobby_stream`, source_ref = the entry id), publishes the outcome
to the results stream and only then acknowledges the entry.

Threads (all daemons, started by `start()`, joined by `stop()`):

- the *reader* reads both streams with one blocking `XREADGROUP` and hands
  entries, in entry-id order, to per-game queues. A read is COUNT-limited, so
  a stream that returned a full batch may hold more entries than were read;
  entries of the other stream past its *watermark* (the last id read from
  it) are held back until it has been read past them (`OrderedMerge`).
  Otherwise a stop could overtake the start it follows. Ids of the two
  streams compare by millisecond, then by each stream's own sequence, then
  start before stop: within one millisecond that is the best order there is.
- `workers` *job workers* run the jobs. `GameQueues` lets only the oldest job
  of a game run; the next one is released when it is done, so one game's
  jobs apply strictly in entry-id order while different games run in
  parallel.
- the *maintenance* thread re-queues transient failures when their backoff
  has passed, takes over entries of dead consumers (`XAUTOCLAIM`) and keeps
  this consumer's own entries fresh (`XCLAIM ... JUSTID`), so a long job or a
  long queue is never mistaken for a dead consumer's work.

Delivery rules: an entry is acknowledged only after its outcome is committed
and published (one script: `XADD` result, then `XACK`). Transient failures
(`service_unavailable`, lease busy / CAS race) stay pending and are retried
with exponential backoff, each retry re-claiming the entry so Redis counts
the delivery. An entry delivered more than `max_deliveries` times, or
malformed, is copied to the dead-letter stream and acknowledged. Redelivery
of a completed job is harmless: start and stop are idempotent.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol, cast

import redis
from redis.typing import StreamIdT

from rtmanager.config import Settings
from rtmanager.domain.errors import ErrorCode, Failure
from rtmanager.domain.operation import OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.telemetry import Telemetry

log = logging.getLogger(__name__)

# What "Redis is unreachable or timing out" looks like to redis-py; such
# errors never end a thread, they are logged and retried with backoff.
_REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
)
# Redis errors a job or a housekeeping pass survives: outages, and replies
# such as NOGROUP when a stream was deleted behind our back.
_REDIS_ERRORS: tuple[type[Exception], ...] = (*_REDIS_DOWN, redis.exceptions.ResponseError)

EntryId = tuple[int, int]
# Greater than any real entry id (both parts are 64-bit): "read to the end".
CAUGHT_UP: EntryId = (2**64, 0)
_NO_ID: EntryId = (0, 0)

# Publish an outcome and acknowledge its job in one step: the ack runs only
# if the XADD succeeded (a failing command stops the script), and nothing
# can happen in between. KEYS: target stream, job stream; ARGV: group,
# entry id, then the entry's field/value pairs.
_PUBLISH_AND_ACK = """
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
"""

_MAX_SHOWN = 64  # characters of a bad field value quoted in a dead-letter reason
_HEARTBEAT_CHUNK = 500  # ids per XCLAIM JUSTID call


class JobKind(StrEnum):
    """Which stream a job came from."""

    START = "start"
    STOP = "stop"


class StartHandler(Protocol):
    """What the consumer needs of the start lifecycle (`StartService`)."""

    def handle(self, request: StartRequest) -> OperationResult:
        """Apply the start; never raises."""
        ...


class StopHandler(Protocol):
    """What the consumer needs of the stop lifecycle (`StopService`)."""

    def handle(self, request: StopRequest) -> OperationResult:
        """Apply the stop; never raises."""
        ...


@dataclass(frozen=True)
class StreamSettings:
    """How the consumer reads, retries and reclaims.

    Stream names are used verbatim (no key prefix). `block` must stay below
    the Redis client's socket timeout, or an idle blocking read would time
    out. `max_buffered` bounds the jobs taken from Redis but not yet
    finished.
    """

    start_stream: str
    stop_stream: str
    results_stream: str
    dead_letter_stream: str
    group: str
    consumer: str
    max_deliveries: int = 5
    workers: int = 4
    block: timedelta = timedelta(seconds=1)
    claim_idle: timedelta = timedelta(seconds=30)
    retry_base: timedelta = timedelta(milliseconds=200)
    retry_max: timedelta = timedelta(seconds=5)
    batch_size: int = 64
    max_buffered: int = 256

    def __post_init__(self) -> None:
        names = {
            "start_stream": self.start_stream,
            "stop_stream": self.stop_stream,
            "results_stream": self.results_stream,
            "dead_letter_stream": self.dead_letter_stream,
            "group": self.group,
            "consumer": self.consumer,
        }
        for name, value in names.items():
            if not value.strip():
                raise ValueError(f"stream settings: {name} must not be empty")
        streams = [self.start_stream, self.stop_stream, self.results_stream]
        streams.append(self.dead_letter_stream)
        if len(set(streams)) != len(streams):
            raise ValueError("stream settings: the four stream names must differ")
        for name, number in (
            ("max_deliveries", self.max_deliveries),
            ("workers", self.workers),
            ("batch_size", self.batch_size),
            ("max_buffered", self.max_buffered),
        ):
            if number < 1:
                raise ValueError(f"stream settings: {name} must be at least 1, got {number}")
        # BLOCK 0 would mean "forever": the reader could never notice stop().
        if self.block < timedelta(milliseconds=1):
            raise ValueError(f"stream settings: block must be at least 1ms, got {self.block}")
        for name, duration in (
            ("claim_idle", self.claim_idle),
            ("retry_base", self.retry_base),
        ):
            if duration <= timedelta(0):
                raise ValueError(f"stream settings: {name} must be positive, got {duration}")
        if self.retry_max < self.retry_base:
            raise ValueError("stream settings: retry_max must not be below retry_base")

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamSettings:
        """The stream settings of the service's configuration."""
        return cls(
            start_stream=settings.start_jobs_stream,
            stop_stream=settings.stop_jobs_stream,
            results_stream=settings.job_results_stream,
            dead_letter_stream=settings.dead_letter_stream,
            group=settings.stream_group,
            consumer=settings.instance_id,
            max_deliveries=settings.stream_max_deliveries,
            workers=settings.stream_workers,
            claim_idle=settings.stream_claim_idle,
        )


# --- pure pieces: ids, job fields, results -------------------------------------------


def parse_entry_id(value: bytes | str) -> EntryId:
    """Return a stream entry id (`ms-seq`) as a comparable pair of integers."""
    text = value.decode("ascii") if isinstance(value, bytes) else value
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream entry id: {text!r}")
    return int(ms), int(seq)


class MalformedJob(ValueError):
    """A job entry that cannot be applied as written; it goes to the dead letters."""


@dataclass(frozen=True)
class StartJob:
    """The fields of a start job."""

    game_id: str
    image_ref: str


@dataclass(frozen=True)
class StopJob:
    """The fields of a stop job."""

    game_id: str
    reason: StopReason


def _shown(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="backslashreplace")
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def _text_field(fields: Mapping[bytes, bytes], name: str, *, required: bool) -> str:
    """A field's text; "" when absent and optional. Raises `MalformedJob`."""
    raw = fields.get(name.encode())
    if raw is None or raw == b"":
        if required:
            raise MalformedJob(f"missing {name}" if raw is None else f"empty {name}")
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJob(f"{name} {_shown(raw)} is not valid UTF-8") from None


def parse_job(kind: JobKind, fields: Mapping[bytes, bytes]) -> StartJob | StopJob:
    """Check a job's fields; raise `MalformedJob` saying what is wrong.

    Only the shape is checked here (fields present, UTF-8, a known stop
    reason); whether the game id or image reference is acceptable is the
    lifecycle's call, reported as an `invalid_request` result. Unknown
    fields are ignored, so Lobby can add fields without breaking us.
    """
    if not fields:
        # History reads return deleted (trimmed) entries without fields.
        raise MalformedJob("the entry no longer exists in the stream (deleted or trimmed)")
    game_id = _text_field(fields, "game_id", required=True)
    if kind is JobKind.START:
        return StartJob(game_id=game_id, image_ref=_text_field(fields, "image_ref", required=True))
    reason_text = _text_field(fields, "reason", required=False)
    if not reason_text:
        return StopJob(game_id=game_id, reason=StopReason.LOBBY_REQUEST)
    try:
        reason = StopReason(reason_text)
    except ValueError:
        known = ", ".join(member.value for member in StopReason)
        raise MalformedJob(
            f"unknown reason {_shown(reason_text.encode())}; expected one of {known}"
        ) from None
    return StopJob(game_id=game_id, reason=reason)


def is_transient(failure: Failure | None) -> bool:
    """Whether a failed job may succeed if retried: a dependency outage or a lost race."""
    if failure is None:
        return False
    if failure.code is ErrorCode.SERVICE_UNAVAILABLE:
        return True
    return failure.code is ErrorCode.CONFLICT and failure.race


def record_json(record: RuntimeRecord | None) -> str:
    """The runtime record as published with a job result ("" when there is none)."""
    if record is None:
        return ""

    def stamp(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return json.dumps(
        {
            "game_id": record.game_id,
            "status": str(record.status),
            "current_container_id": record.current_container_id,
            "current_image_ref": record.current_image_ref,
            "engine_endpoint": record.engine_endpoint,
            "state_path": record.state_path,
            "docker_network": record.docker_network,
            "started_at": stamp(record.started_at),
            "stopped_at": stamp(record.stopped_at),
            "removed_at": stamp(record.removed_at),
            "last_op_at": stamp(record.last_op_at),
            "created_at": stamp(record.created_at),
        },
        separators=(",", ":"),
    )


def result_fields(
    *, job_id: str, stream: str, game_id: str, result: OperationResult
) -> dict[str, str]:
    """The fields of a job's entry on the results stream."""
    failure = result.failure
    return {
        "job_id": job_id,
        "stream": stream,
        "game_id": game_id,
        "outcome": str(result.outcome),
        "error_code": str(failure.code) if failure else "",
        "error_message": failure.message if failure else "",
        "record": record_json(result.record),
    }


def dead_letter_fields(
    *, stream: str, job_id: str, reason: str, deliveries: int, fields: Mapping[bytes, bytes]
) -> dict[str, str]:
    """The fields of a job's entry on the dead-letter stream (its original fields as JSON)."""
    original = {
        key.decode("utf-8", errors="backslashreplace"): value.decode(
            "utf-8", errors="backslashreplace"
        )
        for key, value in fields.items()
    }
    return {
        "stream": stream,
        "job_id": job_id,
        "reason": reason,
        "deliveries": str(deliveries),
        "fields": json.dumps(original, ensure_ascii=False, separators=(",", ":")),
    }


def retry_delay(
    attempt: int,
    base: timedelta,
    cap: timedelta,
    *,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): doubling, capped, jittered.

    "Equal jitter": half the delay is fixed, half random, so replicas retrying
    the same outage do not hit Redis or Docker in lockstep.
    """
    exponent = min(max(attempt - 1, 0), 32)
    delay = min(cap.total_seconds(), base.total_seconds() * 2.0**exponent)
    return delay / 2 + jitter() * delay / 2


# --- pure pieces: ordering -------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One stream entry on its way through the consumer.

    `order` sorts jobs by entry id across both streams; equal ids (the two
    streams' clocks are the same millisecond) put the start before the stop.
    """

    kind: JobKind
    stream: str
    entry_id: str
    order: tuple[int, int, int]
    fields: dict[bytes, bytes]
    # Deliveries as Redis counts them; None until looked up (reclaimed or
    # re-read entries; a fresh `>` read is delivery 1).
    deliveries: int | None = None
    # Claim the entry again (XCLAIM, which counts a delivery) before running.
    reclaim: bool = False
    attempts: int = 0
    last_problem: str = ""
    game_id: str = ""
    # Set once the lifecycle returned a final outcome; a retry then only
    # publishes it (the operation is not applied twice for a Redis hiccup).
    result: OperationResult | None = None

    @classmethod
    def of(
        cls,
        kind: JobKind,
        stream: str,
        entry_id: bytes | str,
        fields: Mapping[bytes, bytes] | None,
        *,
        deliveries: int | None = None,
    ) -> Job:
        """A job of `stream` for one entry as Redis returned it."""
        text = entry_id.decode("ascii") if isinstance(entry_id, bytes) else entry_id
        ms, seq = parse_entry_id(text)
        rank = 0 if kind is JobKind.START else 1
        return cls(
            kind=kind,
            stream=stream,
            entry_id=text,
            order=(ms, seq, rank),
            fields=dict(fields or {}),
            deliveries=deliveries,
        )

    @property
    def entry(self) -> EntryId:
        """The entry id as a comparable pair."""
        return self.order[0], self.order[1]

    @property
    def game_key(self) -> bytes:
        """What serialises this job: its raw game id, or the entry itself without one."""
        raw = self.fields.get(b"game_id")
        if raw:
            return raw
        # No game to order against: the job runs on its own (and is dead-lettered).
        return b"\0" + self.stream.encode() + b"\0" + self.entry_id.encode()


@dataclass
class StreamRead:
    """What one read call returned for one stream.

    `last_id` is the id of the last entry returned (None when none was);
    `caught_up` says the read reached the end of the stream, i.e. the stream
    had no further entries at the moment of the read.
    """

    jobs: list[Job]
    last_id: EntryId | None
    caught_up: bool


class OrderedMerge:
    """Merges COUNT-limited reads of several streams into one entry-id order.

    After each read call, a job is released only when no stream can still
    deliver an older entry: its id must not exceed any stream's watermark —
    the last id read from that stream, or "everything" when that stream was
    caught up *in this very read* (a stream left out of a read may have
    grown since). Not thread-safe: the caller locks.
    """

    def __init__(self, streams: Sequence[str]) -> None:
        # Before its first read nothing is known of a stream: hold everything.
        self._position: dict[str, EntryId] = dict.fromkeys(streams, _NO_ID)
        self._caught_up: dict[str, bool] = dict.fromkeys(streams, False)
        self._held: list[Job] = []

    def add_read(self, reads: Mapping[str, StreamRead]) -> list[Job]:
        """Take one read call's result; return the jobs now safe to run, oldest first.

        Streams missing from `reads` were not read by this call.
        """
        for stream in self._position:
            read = reads.get(stream)
            self._caught_up[stream] = read is not None and read.caught_up
            if read is not None:
                if read.last_id is not None:
                    self._position[stream] = read.last_id
                self._held.extend(read.jobs)
        watermark = min(
            CAUGHT_UP if self._caught_up[stream] else position
            for stream, position in self._position.items()
        )
        return self._release(watermark)

    def add_claimed(self, jobs: Iterable[Job]) -> list[Job]:
        """Take entries reclaimed from other consumers; return those safe to run now.

        A reclaimed entry no later than every stream's read position cannot
        be overtaken by an unread entry, and every older held entry would
        have been released already; a later one waits for the reads to pass
        it, like any other entry.
        """
        self._held.extend(jobs)
        return self._release(min(self._position.values()))

    def streams_to_read(self, batch_size: int) -> list[str]:
        """The streams the next read should include.

        A stream with a batch of entries already held back is skipped (that
        bounds what is held) — unless no other stream is behind it, since
        only reading the stream furthest behind lets anything be released.
        """
        behind = min(self._position.values())
        return [
            stream
            for stream, position in self._position.items()
            if self.held(stream) < batch_size or position <= behind
        ]

    def held(self, stream: str | None = None) -> int:
        """How many jobs (of `stream`, or of all streams) are held back."""
        return sum(1 for job in self._held if stream is None or job.stream == stream)

    def _release(self, watermark: EntryId) -> list[Job]:
        released = [job for job in self._held if job.entry <= watermark]
        self._held = [job for job in self._held if job.entry > watermark]
        released.sort(key=lambda job: job.order)
        return released


class GameQueues:
    """One queue per game: only a game's oldest job runs; the next waits for it.

    The head of a game's queue is running (or waiting for its retry); jobs
    arriving later queue behind it in entry-id order — a reclaimed older
    entry goes before younger ones still waiting. Not thread-safe: the
    caller locks.
    """

    def __init__(self) -> None:
        self._queues: dict[bytes, list[Job]] = {}

    def add(self, job: Job) -> Job | None:
        """Queue `job`; return it when it may run right away (its game was idle)."""
        waiting = self._queues.get(job.game_key)
        if waiting is None:
            self._queues[job.game_key] = [job]
            return job
        bisect.insort(waiting, job, lo=1, key=lambda queued: queued.order)
        return None

    def finish(self, job: Job) -> Job | None:
        """Drop the finished head `job`; return its game's next job to run, if any."""
        waiting = self._queues.get(job.game_key)
        if not waiting or waiting[0] is not job:
            raise ValueError(f"job {job.entry_id} is not running")
        waiting.pop(0)
        if not waiting:
            del self._queues[job.game_key]
            return None
        return waiting[0]

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._queues.values())


# --- the consumer -----------------------------------------------------------------------


class StreamConsumer:
    """Applies Lobby's start/stop jobs (see the module docstring for the design)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        start: StartHandler,
        stop: StopHandler,
        settings: StreamSettings,
        telemetry: Telemetry,
    ) -> None:
        socket_timeout = redis_client.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout is not None and settings.block.total_seconds() >= socket_timeout:
            raise ValueError(
                f"stream block {settings.block} must be shorter than the Redis socket "
                f"timeout ({socket_timeout}s), or idle reads would time out"
            )
        self._redis = redis_client
        self._publish_and_ack = redis_client.register_script(_PUBLISH_AND_ACK)
        self._start_service = start
        self._stop_service = stop
        self._settings = settings
        self._telemetry = telemetry
        self._kinds = {settings.start_stream: JobKind.START, settings.stop_stream: JobKind.STOP}
        self._streams = (settings.start_stream, settings.stop_stream)

        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when a job finishes
        self._stopping = threading.Event()
        self._wake = threading.Event()  # wakes the maintenance thread early
        self._groups_ready = threading.Event()
        self._merge = OrderedMerge(self._streams)
        self._games = GameQueues()
        # Every entry this consumer holds in memory (held, queued, running,
        # waiting to retry): duplicates from reclaims are skipped, and these
        # entries are kept fresh against other consumers' XAUTOCLAIM.
        self._known: dict[tuple[str, str], Job] = {}
        self._ready: queue.Queue[Job | None] = queue.Queue()
        self._retries: list[tuple[float, int, Job]] = []
        self._retry_seq = itertools.count()
        # Start by re-reading our own pending entries (a restart under the
        # same consumer name), then switch to new entries (`>`).
        self._cursors = dict.fromkeys(self._streams, "0-0")
        self._threads: list[threading.Thread] = []

    # -- lifecycle of the consumer ---------------------------------------------------

    def start(self) -> None:
        """Create the consumer groups (if Redis answers) and start the threads.

        Redis being down is not an error here: the reader keeps trying.
        """
        if self._threads:
            raise RuntimeError("stream consumer already started")
        try:
            self.ensure_groups()
        except _REDIS_ERRORS as error:
            log.warning(
                "cannot create the job stream consumer groups yet; will retry",
                extra={"problem": _problem(error)},
            )
        threads = [
            threading.Thread(target=self._read_forever, name="stream-reader", daemon=True),
            threading.Thread(target=self._maintain_forever, name="stream-maintenance", daemon=True),
        ]
        threads += [
            threading.Thread(target=self._work_forever, name=f"stream-worker-{n}", daemon=True)
            for n in range(self._settings.workers)
        ]
        self._threads = threads
        for thread in threads:
            thread.start()
        log.info(
            "stream consumer started",
            extra={
                "streams": list(self._streams),
                "group": self._settings.group,
                "consumer": self._settings.consumer,
                "workers": self._settings.workers,
            },
        )

    def begin_drain(self) -> None:
        """Stop reading and starting jobs; returns at once (running jobs go on)."""
        self._stopping.set()
        self._wake.set()
        with self._room:
            self._room.notify_all()

    def stop(self, timeout: float) -> bool:
        """Stop reading at once; let running jobs finish within `timeout` seconds.

        Jobs not yet started are left pending in Redis (never acknowledged):
        this consumer re-reads them when it starts again under the same
        name, and any other consumer reclaims them once idle. Returns True
        when every thread ended in time.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        self._stopping.set()
        self._wake.set()
        with self._room:
            self._room.notify_all()
        for _ in range(self._settings.workers):
            self._ready.put(None)  # one wake-up per worker; queued jobs are skipped
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if alive:
            log.warning("stream consumer did not stop in time", extra={"threads": alive})
        else:
            log.info("stream consumer stopped")
        return not alive

    def ensure_groups(self) -> None:
        """Create the consumer group on both job streams (from id 0) unless it exists."""
        for stream in self._streams:
            try:
                self._redis.xgroup_create(stream, self._settings.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        self._groups_ready.set()

    # -- reader ---------------------------------------------------------------------

    def _read_forever(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if not self._groups_ready.is_set():
                    self.ensure_groups()
                if self._wait_for_room():
                    self._read_once()
                failures = 0
            except Exception as error:
                failures += 1
                if isinstance(error, redis.exceptions.ResponseError) and "NOGROUP" in str(error):
                    # The stream or group was deleted behind our back: recreate it.
                    self._groups_ready.clear()
                if isinstance(error, _REDIS_ERRORS):
                    log.warning("reading job streams failed", extra={"problem": _problem(error)})
                else:
                    log.exception("bug while reading job streams")
                self._stopping.wait(self._backoff(failures))

    def _wait_for_room(self) -> bool:
        """Wait until fewer than `max_buffered` jobs are queued or running."""
        with self._room:
            while (
                len(self._known) - self._merge.held() >= self._settings.max_buffered
                and not self._stopping.is_set()
            ):
                self._room.wait(self._settings.block.total_seconds())
        return not self._stopping.is_set()

    def _read_once(self) -> None:
        """One XREADGROUP over the streams that may be read, then dispatch."""
        batch = self._settings.batch_size
        with self._lock:
            streams = {s: self._cursors[s] for s in self._merge.streams_to_read(batch)}
            # Block only when idle: held entries wait for an immediate read
            # of the other stream, and history reads never block anyway.
            idle = self._merge.held() == 0 and all(c == ">" for c in streams.values())
        if not streams:
            return
        block_ms = max(1, int(self._settings.block.total_seconds() * 1000)) if idle else None
        response = self._redis.xreadgroup(
            self._settings.group,
            self._settings.consumer,
            cast("dict[Any, Any]", streams),
            count=batch,
            block=block_ms,
        )
        if self._stopping.is_set():
            # Entries read now stay pending for this consumer: not lost.
            return
        entries = _entries_by_stream(response)
        with self._lock:
            reads: dict[str, StreamRead] = {}
            for stream, cursor in streams.items():
                got = entries.get(stream.encode(), [])
                history = cursor != ">"
                jobs = []
                for entry_id, fields in got:
                    key = (stream, entry_id.decode("ascii"))
                    if key in self._known:
                        continue
                    # A `>` read is the entry's first delivery; a history read's
                    # count is looked up before the job runs.
                    job = Job.of(
                        self._kinds[stream],
                        stream,
                        entry_id,
                        fields,
                        deliveries=None if history else 1,
                    )
                    self._known[key] = job
                    jobs.append(job)
                full = len(got) >= batch
                last_id = parse_entry_id(got[-1][0]) if got else None
                if history:
                    if got:
                        self._cursors[stream] = got[-1][0].decode("ascii")
                    if not full:
                        self._cursors[stream] = ">"
                # The end of our own history is not the end of the stream.
                reads[stream] = StreamRead(jobs, last_id, caught_up=not full and not history)
            self._dispatch(self._merge.add_read(reads))

    def _dispatch(self, jobs: Iterable[Job]) -> None:
        """Queue jobs behind their game's earlier jobs (caller holds the lock)."""
        for job in jobs:
            runnable = self._games.add(job)
            if runnable is not None:
                self._ready.put(runnable)

    # -- maintenance: retries, reclaims, keeping our entries fresh -------------------

    def _maintain_forever(self) -> None:
        claim_every = self._settings.claim_idle.total_seconds() / 2
        refresh_every = self._settings.claim_idle.total_seconds() / 3
        now = time.monotonic()
        next_claim, next_refresh = now, now + refresh_every
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            next_retry = self._release_due_retries(now)
            if now >= next_claim and self._groups_ready.is_set():
                self._guarded("reclaiming idle job entries", self.reclaim_once)
                self._guarded("measuring consumer lag", self._measure_lag)
                next_claim = now + claim_every
            if now >= next_refresh:
                self._guarded("refreshing held job entries", self._refresh_held)
                next_refresh = now + refresh_every
            wake_at = min(next_claim, next_refresh, next_retry)
            self._wake.wait(max(wake_at - time.monotonic(), 0.001))

    def _measure_lag(self) -> None:
        """Report how many entries of each job stream the group has not read yet."""
        for stream in (self._settings.start_stream, self._settings.stop_stream):
            groups: Any = self._redis.xinfo_groups(stream)
            for group in groups:
                name = group.get(b"name", group.get("name"))
                if _text(name) == self._settings.group:
                    lag = group.get(b"lag", group.get("lag"))
                    if isinstance(lag, int):
                        self._telemetry.stream_lag(stream, lag)

    def _guarded(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except _REDIS_ERRORS as error:
            log.warning("%s failed", what, extra={"problem": _problem(error)})
        except Exception:
            log.exception("bug while %s", what)

    def _release_due_retries(self, now: float) -> float:
        """Queue the retries whose backoff has passed; return when the next one is due."""
        with self._lock:
            while self._retries and self._retries[0][0] <= now:
                _, _, job = heapq.heappop(self._retries)
                if not self._stopping.is_set():
                    self._ready.put(job)
            return self._retries[0][0] if self._retries else float("inf")

    def reclaim_once(self) -> int:
        """Take over entries idle for `claim_idle` on any consumer (XAUTOCLAIM); return how many.

        The maintenance thread calls this every `claim_idle / 2`.
        """
        min_idle_ms = int(self._settings.claim_idle.total_seconds() * 1000)
        taken = 0
        for stream in self._streams:
            cursor: bytes | str = "0-0"
            while not self._stopping.is_set():
                with self._lock:
                    room = self._settings.max_buffered - (len(self._known) - self._merge.held())
                if room <= 0:
                    return taken
                response = cast(
                    "list[Any]",
                    self._redis.xautoclaim(
                        stream,
                        self._settings.group,
                        self._settings.consumer,
                        min_idle_ms,
                        start_id=cursor,
                        count=min(room, self._settings.batch_size),
                    ),
                )
                cursor, claimed = response[0], response[1] or []
                deleted = response[2] if len(response) > 2 else []
                if deleted:
                    # Redis dropped these from the pending list itself: the
                    # entries were trimmed away before anyone finished them.
                    log.warning(
                        "pending job entries vanished from the stream",
                        extra={"stream": stream, "job_ids": [_text(i) for i in deleted]},
                    )
                jobs = []
                with self._lock:
                    for entry_id, fields in claimed:
                        if entry_id is None:
                            continue
                        key = (stream, _text(entry_id))
                        if key in self._known:
                            continue  # ours already, in progress
                        job = Job.of(self._kinds[stream], stream, entry_id, fields)
                        self._known[key] = job
                        jobs.append(job)
                    self._dispatch(self._merge.add_claimed(jobs))
                if jobs:
                    log.info(
                        "reclaimed idle job entries",
                        extra={"stream": stream, "job_ids": [job.entry_id for job in jobs]},
                    )
                taken += len(jobs)
                if _text(cursor) == "0-0":
                    break
        return taken

    def _refresh_held(self) -> None:
        """Reset the idle time of every entry we hold, so no one reclaims it from us.

        XCLAIM with JUSTID does not count a delivery.
        """
        with self._lock:
            held: dict[str, list[StreamIdT]] = {stream: [] for stream in self._streams}
            for stream, entry_id in self._known:
                held[stream].append(entry_id)
        for stream, ids in held.items():
            for chunk in range(0, len(ids), _HEARTBEAT_CHUNK):
                self._redis.xclaim(
                    stream,
                    self._settings.group,
                    self._settings.consumer,
                    0,
                    ids[chunk : chunk + _HEARTBEAT_CHUNK],
                    justid=True,
                )

    # -- workers --------------------------------------------------------------------

    def _work_forever(self) -> None:
        while True:
            job = self._ready.get()
            if job is None or self._stopping.is_set():
                if job is None:
                    return
                continue  # not started: it stays pending in Redis
            try:
                self._run(job)
            except Exception as error:
                log.exception("bug while running a stream job", extra=self._job_extra(job))
                self._retry(job, f"internal: {type(error).__name__}: {error}")

    def _run(self, job: Job) -> None:
        try:
            if job.result is None and not self._apply(job):
                return
            self._publish(job)
        except _REDIS_ERRORS as error:
            self._retry(job, f"redis: {_problem(error)}")

    def _apply(self, job: Job) -> bool:
        """Run the job's lifecycle; True when its final result is ready to publish."""
        settings = self._settings
        if job.reclaim:
            if not self._claim(job):
                self._drop(job)
                return False
            job.reclaim = False
            job.deliveries = None
        if job.deliveries is None:
            job.deliveries = self._deliveries(job)
            if job.deliveries is None:
                self._drop(job)
                return False
        if job.deliveries > settings.max_deliveries:
            reason = f"delivered {job.deliveries} times, more than the limit of "
            reason += f"{settings.max_deliveries}"
            if job.last_problem:
                reason += f"; last failure: {job.last_problem}"
            self._dead_letter(job, reason)
            return False
        try:
            parsed = parse_job(job.kind, job.fields)
        except MalformedJob as error:
            self._dead_letter(job, f"malformed job: {error}")
            return False
        job.game_id = parsed.game_id
        result = self._call(job, parsed)
        if is_transient(result.failure):
            assert result.failure is not None
            self._retry(job, f"{result.failure.code}: {result.failure.message}")
            return False
        job.result = result
        return True

    def _call(self, job: Job, parsed: StartJob | StopJob) -> OperationResult:
        """Call the lifecycle; a service that raises (a bug) counts as `internal`."""
        try:
            if isinstance(parsed, StartJob):
                return self._start_service.handle(
                    StartRequest(
                        game_id=parsed.game_id,
                        image_ref=parsed.image_ref,
                        op_source=OpSource.LOBBY_STREAM,
                        source_ref=job.entry_id,
                    )
                )
            return self._stop_service.handle(
                StopRequest(
                    game_id=parsed.game_id,
                    op_source=OpSource.LOBBY_STREAM,
                    reason=parsed.reason,
                    source_ref=job.entry_id,
                )
            )
        except Exception as error:
            log.exception("lifecycle raised on a stream job", extra=self._job_extra(job))
            kind = OpKind.START if isinstance(parsed, StartJob) else OpKind.STOP
            return OperationResult(
                parsed.game_id,
                kind,
                Outcome.FAILURE,
                failure=Failure(ErrorCode.INTERNAL, f"internal error: {type(error).__name__}"),
            )

    def _claim(self, job: Job) -> bool:
        """Claim the entry for this consumer (a counted delivery); False when it is gone."""
        claimed = cast(
            "list[Any]",
            self._redis.xclaim(
                job.stream, self._settings.group, self._settings.consumer, 0, [job.entry_id]
            ),
        )
        for entry_id, fields in claimed:
            if entry_id is not None and _text(entry_id) == job.entry_id:
                job.fields = dict(fields or {})
                return True
        return False

    def _deliveries(self, job: Job) -> int | None:
        """How often Redis delivered the entry; None when it is no longer pending."""
        pending = cast(
            "list[dict[str, Any]]",
            self._redis.xpending_range(
                job.stream, self._settings.group, job.entry_id, job.entry_id, 1
            ),
        )
        return int(pending[0]["times_delivered"]) if pending else None

    def _publish(self, job: Job) -> None:
        """Publish the final result and acknowledge the entry, atomically."""
        result = job.result
        assert result is not None
        fields = result_fields(
            job_id=job.entry_id, stream=job.stream, game_id=job.game_id, result=result
        )
        self._send(self._settings.results_stream, job, fields)
        failure = result.failure
        self._finished(job, str(result.outcome), failure.code if failure else "")

    def _dead_letter(self, job: Job, reason: str) -> None:
        """Copy the entry to the dead-letter stream and acknowledge it, atomically."""
        fields = dead_letter_fields(
            stream=job.stream,
            job_id=job.entry_id,
            reason=reason,
            deliveries=job.deliveries or 0,
            fields=job.fields,
        )
        self._send(self._settings.dead_letter_stream, job, fields)
        self._finished(job, "dead_letter", "", reason=reason)

    def _send(self, target: str, job: Job, fields: Mapping[str, str]) -> None:
        """Append `fields` to `target` and acknowledge the job's entry (see `_PUBLISH_AND_ACK`).

        If the reply is lost the job is retried and may publish twice; a
        consumer of the results sees the same job id again, which is as
        harmless as a redelivered job.
        """
        pairs = [part for item in fields.items() for part in item]
        self._publish_and_ack(
            keys=[target, job.stream], args=[self._settings.group, job.entry_id, *pairs]
        )

    def _drop(self, job: Job) -> None:
        """Forget a job whose entry is no longer pending (another consumer finished it)."""
        log.info("stream job no longer pending; skipped", extra=self._job_extra(job))
        self._release(job)

    def _retry(self, job: Job, problem: str) -> None:
        """Keep the entry pending and run it again after a backoff."""
        job.attempts += 1
        job.last_problem = problem
        # Only a job not yet applied is claimed again; one whose result is
        # known just retries publishing it.
        job.reclaim = job.result is None
        delay = retry_delay(job.attempts, self._settings.retry_base, self._settings.retry_max)
        self._telemetry.stream_job(job.stream, "retry")
        log.warning(
            "stream job will be retried",
            extra={
                **self._job_extra(job),
                "outcome": "retry",
                "problem": problem,
                "attempt": job.attempts,
                "delay_ms": round(delay * 1000),
            },
        )
        with self._lock:
            if self._stopping.is_set():
                return  # stays pending in Redis
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._retry_seq), job))
        self._wake.set()

    def _finished(self, job: Job, outcome: str, error_code: str, *, reason: str = "") -> None:
        self._telemetry.stream_job(job.stream, outcome)
        extra = {**self._job_extra(job), "outcome": outcome, "error_code": str(error_code)}
        if reason:
            extra["reason"] = reason
        if outcome == "success":
            log.info("stream job done", extra=extra)
        else:
            log.warning("stream job done", extra=extra)
        self._release(job)

    def _release(self, job: Job) -> None:
        """Forget a finished job and let its game's next job run."""
        with self._room:
            self._known.pop((job.stream, job.entry_id), None)
            following = self._games.finish(job)
            if following is not None and not self._stopping.is_set():
                self._ready.put(following)
            self._room.notify_all()

    def _job_extra(self, job: Job) -> dict[str, object]:
        game_id = job.game_id or _text(job.fields.get(b"game_id", b""))
        return {"game_id": game_id, "job_id": job.entry_id, "stream": job.stream}

    def _backoff(self, failures: int) -> float:
        return retry_delay(failures, self._settings.retry_base, self._settings.retry_max)


def _entries_by_stream(response: Any) -> dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]]:
    """XREADGROUP's reply as {stream: [(id, fields), ...]} (RESP2 list or RESP3 map)."""
    if not response:
        return {}
    if isinstance(response, dict):
        items: Iterable[tuple[Any, Any]] = (
            (name, value[0] if value and isinstance(value[0], list) else value)
            for name, value in response.items()
        )
    else:
        items = ((name, entries) for name, entries in response)
    result: dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]] = {}
    for name, entries in items:
        key = name if isinstance(name, bytes) else str(name).encode()
        result[key] = [
            (_bytes(entry_id), dict(fields or {}))
            for entry_id, fields in entries or []
            if entry_id is not None
        ]
    return result


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else value


def _problem(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
