"""The stream consumer: applies Lobby's start/stop jobs (SPEC §4, docs/lobby-jobs.md).

One consumer of the group per process, named `RTMANAGER_INSTANCE_ID`. It
reads both job streams through the `JobStreams` port, runs each game's jobs
one at a time in Lobby's order (`GameQueues`) on a bounded pool, applies
each through the start/stop lifecycle (op_source `lobby_stream`,
source_ref = the entry id, the job itself for the game's watermark) and
answers it exactly once.

Why it holds across replicas, crashes and outages:

- *Lobby's last word wins.* The lifecycle checks the game's job watermark
  under the game's lease and advances it in the same transaction as the
  record change: an older job, whichever replica holds it and whenever it
  runs, is answered `superseded` and changes nothing.
- *Transient is not poison.* A busy lease or an outage is retried here, in
  memory, with capped jittered backoff for `retry_for`; Redis never sees
  those retries, so they do not count as deliveries. Only a delivery to a
  consumer that then died (a restart re-reading its own entries, or a
  takeover of a dead consumer's) counts toward `max_deliveries`.
- *One answer per job.* `JobStreams.answer` publishes and acknowledges in
  one atomic step, only while the entry is still ours, and never twice.
- *No stealing.* Entries are taken over only from consumers without
  presence, after `claim_idle`; a live consumer keeps its entries however
  long it retries them.

Threads (started by `start()`, drained by `begin_drain()`, joined by
`stop()`): the reader (own pending entries first, then new ones), the
housekeeper (presence, takeovers, retries that are due, idle consumers,
lag) and `workers` job workers.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from rtmanager.backoff import Backoff
from rtmanager.domain.errors import ErrorCode, Failure, RuntimeManagerError
from rtmanager.domain.jobs import JobKind, JobOutcome, JobPosition, LobbyJob
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.ports import AnswerOutcome, JobEntry, JobStreams
from rtmanager.telemetry import Telemetry
from rtmanager.tracing import job_scope
from rtmanager.workers.job_messages import (
    JobAnswer,
    MalformedJob,
    StartJob,
    StopJob,
    dead_letter_answer,
    game_of,
    parse_job,
    result_answer,
)
from rtmanager.workers.job_ordering import GameQueues

log = logging.getLogger(__name__)

_ALL_READ = "all"


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


class ConsumerNameTaken(RuntimeError):
    """Another live process consumes the job streams under this consumer's name."""


@dataclass(frozen=True)
class ConsumerSettings:
    """How the consumer reads, retries and takes over (`RTMANAGER_STREAM_*`).

    `retry_for` is how long a transiently failing job is retried before it
    is answered as failed; it must outlast a dead holder's lease plus the
    time before its entries are taken over (the settings check that).
    """

    consumer: str
    workers: int = 4
    batch: int = 64
    block: timedelta = timedelta(seconds=1)
    max_buffered: int = 256
    max_deliveries: int = 5
    claim_idle: timedelta = timedelta(seconds=30)
    retry: Backoff = field(
        default_factory=lambda: Backoff(timedelta(milliseconds=200), timedelta(seconds=5))
    )
    retry_for: timedelta = timedelta(minutes=10)
    presence_ttl: timedelta = timedelta(seconds=10)
    consumer_expiry: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        for name, number in (
            ("workers", self.workers),
            ("batch", self.batch),
            ("max_buffered", self.max_buffered),
            ("max_deliveries", self.max_deliveries),
        ):
            if number < 1:
                raise ValueError(f"stream consumer: {name} must be at least 1, got {number}")
        for name, duration in (
            ("block", self.block),
            ("claim_idle", self.claim_idle),
            ("presence_ttl", self.presence_ttl),
            ("consumer_expiry", self.consumer_expiry),
        ):
            if duration < timedelta(milliseconds=1):
                raise ValueError(f"stream consumer: {name} must be positive, got {duration}")


@dataclass(eq=False)
class HeldJob:
    """One entry this consumer holds, from its delivery until its answer."""

    entry: JobEntry
    attempts: int = 0
    first_failure: float | None = None
    # Decided once; a retry after a Redis hiccup only publishes it again.
    answer: JobAnswer | None = None

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the entry among everything this consumer holds."""
        return self.entry.stream, self.entry.entry_id

    @property
    def game_key(self) -> str:
        """What serialises it: the game, or the entry itself when it names none."""
        return game_of(self.entry.fields) or f"\0{self.entry.stream}\0{self.entry.entry_id}"

    @property
    def position(self) -> JobPosition:
        """Its place in Lobby's order."""
        return self.entry.job.position

    def log_fields(self) -> dict[str, object]:
        """The job's identity for log lines."""
        return {
            "game_id": game_of(self.entry.fields),
            "job_id": self.entry.entry_id,
            "stream": self.entry.stream,
        }


class StreamConsumer:
    """Applies Lobby's jobs (see the module docstring for the guarantees)."""

    def __init__(
        self,
        streams: JobStreams,
        start: StartHandler,
        stop: StopHandler,
        settings: ConsumerSettings,
        telemetry: Telemetry,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._streams = streams
        self._start_service = start
        self._stop_service = stop
        self._settings = settings
        self._telemetry = telemetry
        self._clock = clock
        self._reconnect = Backoff(timedelta(milliseconds=200), timedelta(seconds=5))

        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when a job is let go
        self._draining = threading.Event()
        self._wake = threading.Event()  # wakes the housekeeper early
        self._registered = threading.Event()
        self._games: GameQueues[HeldJob] = GameQueues()
        self._held: dict[tuple[str, str], HeldJob] = {}
        self._ready: queue.Queue[HeldJob | None] = queue.Queue()
        self._retries: list[tuple[float, int, HeldJob]] = []
        self._retry_seq = itertools.count()
        # Re-reading own pending entries after a restart: the last id taken
        # back per stream, `_ALL_READ` once done.
        self._own_after: dict[JobKind, str] = {}
        self._threads: list[threading.Thread] = []
        self._workers: list[threading.Thread] = []

    # -- lifecycle of the consumer ---------------------------------------------------

    def register(self, stop: threading.Event | None = None) -> None:
        """Take this consumer's name before serving; raise `ConsumerNameTaken` if it is in use.

        A predecessor killed without releasing the name loses it within the
        presence TTL, so the name is waited for that long (and a little
        more) before giving up. Redis being down is not an error here: the
        reader keeps trying to register.
        """
        give_up = self._clock() + self._settings.presence_ttl.total_seconds() * 1.5 + 1.0
        while True:
            try:
                if self._streams.claim_name():
                    self._registered.set()
                    return
            except RuntimeManagerError as error:
                log.warning(
                    "cannot register the stream consumer yet; will retry",
                    extra={"problem": str(error)},
                )
                return
            if self._clock() >= give_up:
                raise ConsumerNameTaken(
                    f"another live rtmanager process consumes the job streams as "
                    f"{self._settings.consumer!r}; give each replica its own "
                    "RTMANAGER_INSTANCE_ID"
                )
            if stop is not None and stop.wait(0.2):
                return
            if stop is None:
                time.sleep(0.2)

    def start(self) -> None:
        """Start the reader, the housekeeper and the job workers."""
        if self._threads:
            raise RuntimeError("stream consumer already started")
        self._workers = [
            threading.Thread(target=self._work_forever, name=f"stream-worker-{n}", daemon=True)
            for n in range(self._settings.workers)
        ]
        self._threads = [
            threading.Thread(target=self._read_forever, name="stream-reader", daemon=True),
            threading.Thread(target=self._keep_house, name="stream-housekeeper", daemon=True),
            *self._workers,
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "stream consumer started",
            extra={"consumer": self._settings.consumer, "workers": self._settings.workers},
        )

    def begin_drain(self) -> None:
        """Take no new work from now on; jobs already running go on (returns at once).

        Jobs not yet started stay pending in Redis, never acknowledged: this
        consumer takes them back when it starts again under the same name,
        and any other consumer takes them over once this one is gone.
        """
        self._draining.set()
        self._wake.set()
        with self._room:
            self._room.notify_all()
        for _ in self._workers:
            self._ready.put(None)

    def stop(self, timeout: float) -> bool:
        """Drain, let running jobs finish within `timeout` seconds, give up the name.

        Returns True when every thread ended in time.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        self.begin_drain()
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if self._registered.is_set():
            try:
                self._streams.release_name()
            except RuntimeManagerError as error:
                log.warning(
                    "could not release the stream consumer's name", extra={"problem": str(error)}
                )
        if alive:
            log.warning("stream consumer did not stop in time", extra={"threads": alive})
        else:
            log.info("stream consumer stopped")
        return not alive

    # -- the reader ------------------------------------------------------------------

    def _read_forever(self) -> None:
        failures = 0
        groups_ready = False
        while not self._draining.is_set():
            try:
                if not self._registered.is_set():
                    if not self._streams.claim_name():
                        log.error(
                            "another live process consumes the job streams under this "
                            "name; not reading until it is gone",
                            extra={"consumer": self._settings.consumer},
                        )
                        self._draining.wait(self._settings.presence_ttl.total_seconds())
                        continue
                    self._registered.set()
                if not groups_ready:
                    self._streams.ensure_groups()
                    groups_ready = True
                room = self._wait_for_room()
                if room:
                    self._read_once(room)
                failures = 0
            except RuntimeManagerError as error:
                failures += 1
                log.warning("reading the job streams failed", extra={"problem": str(error)})
                self._draining.wait(self._reconnect.delay(failures))
            except Exception:
                failures += 1
                log.exception("bug while reading the job streams")
                self._draining.wait(self._reconnect.delay(failures))

    def _wait_for_room(self) -> int:
        """Wait until fewer than `max_buffered` jobs are held; return how many more fit."""
        with self._room:
            while len(self._held) >= self._settings.max_buffered and not self._draining.is_set():
                self._room.wait(self._settings.block.total_seconds())
            if self._draining.is_set():
                return 0
            return min(self._settings.batch, self._settings.max_buffered - len(self._held))

    def _read_once(self, room: int) -> None:
        """Re-read this consumer's own pending entries (after a restart), then new ones."""
        unread = [kind for kind in JobKind if self._own_after.get(kind) != _ALL_READ]
        if unread:
            kind = unread[0]
            entries = self._streams.redeliver_own(kind, self._own_after.get(kind, ""), room)
            # A short page is not the end (entries deleted from the stream are
            # dead-lettered, not returned): only an empty one is.
            self._own_after[kind] = entries[-1].entry_id if entries else _ALL_READ
            if entries:
                log.info(
                    "took back this consumer's pending jobs",
                    extra={"count": len(entries), "kind": str(kind)},
                )
        else:
            # COUNT applies to each stream: ask for half the room from each.
            entries = self._streams.read_new(max(1, room // 2), self._settings.block)
        if not self._draining.is_set():
            self._hold(entries)
        # Entries read while draining stay pending on this consumer: not lost.

    def _hold(self, entries: list[JobEntry]) -> None:
        """Queue new entries behind their game's earlier jobs."""
        with self._lock:
            for entry in sorted(entries, key=lambda e: e.job.position):
                held = HeldJob(entry)
                if held.key in self._held:
                    continue  # already ours, in progress
                self._held[held.key] = held
                runnable = self._games.add(held)
                if runnable is not None:
                    self._ready.put(runnable)

    # -- the housekeeper -------------------------------------------------------------

    def _keep_house(self) -> None:
        settings = self._settings
        presence_every = settings.presence_ttl.total_seconds() / 3
        claim_every = settings.claim_idle.total_seconds() / 2
        expiry_every = min(settings.consumer_expiry.total_seconds() / 4, 300.0)
        now = self._clock()
        due = {"presence": now + presence_every, "claim": now + claim_every, "expiry": now}
        while not self._draining.is_set():
            self._wake.clear()
            now = self._clock()
            next_retry = self._release_due_retries(now)
            if self._registered.is_set():
                if now >= due["presence"]:
                    self._guarded("renewing the consumer's presence", self._keep_name)
                    due["presence"] = now + presence_every
                if now >= due["claim"]:
                    self._guarded("taking over abandoned jobs", self._take_over)
                    self._guarded("measuring the consumer lag", self._measure_lag)
                    due["claim"] = now + claim_every
                if now >= due["expiry"]:
                    self._guarded("removing idle consumers", self._remove_idle_consumers)
                    due["expiry"] = now + expiry_every
            wake_at = min(next_retry, *due.values())
            self._wake.wait(max(wake_at - self._clock(), 0.01))

    def _guarded(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except RuntimeManagerError as error:
            log.warning("%s failed", what, extra={"problem": str(error)})
        except Exception:
            log.exception("bug while %s", what)

    def _keep_name(self) -> None:
        if self._streams.keep_name():
            return
        # Our presence lapsed (Redis restarted or was paused): others may
        # have taken over our entries meanwhile; answering checks that.
        if self._streams.claim_name():
            log.warning("the stream consumer's presence had lapsed; registered again")
        else:
            log.error(
                "another live process took this stream consumer's name",
                extra={"consumer": self._settings.consumer},
            )

    def _take_over(self) -> None:
        with self._lock:
            room = self._settings.max_buffered - len(self._held)
        if room <= 0:
            return
        entries = self._streams.claim_abandoned(self._settings.claim_idle, room)
        if entries:
            log.info(
                "took over jobs of a consumer that is gone",
                extra={"job_ids": [entry.entry_id for entry in entries]},
            )
            self._hold(entries)

    def _remove_idle_consumers(self) -> None:
        removed = self._streams.remove_idle_consumers(self._settings.consumer_expiry)
        if removed:
            log.info("removed idle stream consumers", extra={"consumers": removed})

    def _measure_lag(self) -> None:
        for stream, lag in self._streams.lag().items():
            self._telemetry.stream_lag(stream, lag)

    def _release_due_retries(self, now: float) -> float:
        """Queue the retries whose backoff has passed; return when the next one is due."""
        with self._lock:
            while self._retries and self._retries[0][0] <= now:
                _, _, held = heapq.heappop(self._retries)
                if not self._draining.is_set():
                    self._ready.put(held)
            return self._retries[0][0] if self._retries else now + 3600.0

    # -- the job workers -------------------------------------------------------------

    def _work_forever(self) -> None:
        while True:
            held = self._ready.get()
            if held is None:
                return
            if self._draining.is_set():
                continue  # not started: it stays pending in Redis
            try:
                with job_scope(f"lobby {held.entry.job.kind} job", held.log_fields()):
                    self._run(held)
            except Exception as error:
                log.exception("bug while running a stream job", extra=held.log_fields())
                self._retry(held, f"internal: {type(error).__name__}: {error}")

    def _run(self, held: HeldJob) -> None:
        if held.answer is None:
            held.answer = self._decide(held)
            if held.answer is None:
                return  # retried later
        try:
            outcome = self._streams.answer(
                held.entry, held.answer.fields, dead_letter=held.answer.dead_letter
            )
        except RuntimeManagerError as error:
            self._retry(held, f"answering: {error}")
            return
        self._answered(held, held.answer, outcome)

    def _decide(self, held: HeldJob) -> JobAnswer | None:
        """Apply the job and return its answer, or None when it is to be retried."""
        entry = held.entry
        limit = self._settings.max_deliveries
        if entry.deliveries > limit:
            return dead_letter_answer(
                entry.job,
                reason=(
                    f"delivered {entry.deliveries} times, more than the limit of {limit}: "
                    "every consumer that took it died before answering it"
                ),
                deliveries=entry.deliveries,
                fields=entry.fields,
            )
        try:
            parsed = parse_job(entry.job.kind, entry.fields)
        except MalformedJob as error:
            return dead_letter_answer(
                entry.job,
                reason=f"malformed job: {error}",
                deliveries=entry.deliveries,
                fields=entry.fields,
            )
        result = self._apply(entry.job, parsed)
        failure = result.failure
        if (failure is not None and failure.transient) or result.unrecorded:
            problem = f"{failure.code}: {failure.message}" if failure else "not recorded"
            now = self._clock()
            if held.first_failure is None:
                held.first_failure = now
            retried = now - held.first_failure
            if retried < self._settings.retry_for.total_seconds():
                self._retry(held, problem)
                return None
            failure = Failure(
                failure.code if failure else ErrorCode.SERVICE_UNAVAILABLE,
                f"gave up after retrying for {retried:.0f}s: {problem}",
            )
        return result_answer(
            entry.job,
            game_id=parsed.game_id,
            outcome=_job_outcome(result, failure),
            failure=failure,
            record=result.record,
            operation_id=result.operation_id,
            superseded_by=result.superseded_by,
        )

    def _apply(self, job: LobbyJob, parsed: StartJob | StopJob) -> OperationResult:
        """Call the lifecycle; a service that raises (a bug) counts as `internal`."""
        try:
            if isinstance(parsed, StartJob):
                return self._start_service.handle(
                    StartRequest(
                        game_id=parsed.game_id,
                        image_ref=parsed.image_ref,
                        op_source=OpSource.LOBBY_STREAM,
                        source_ref=job.entry_id,
                        job=job,
                    )
                )
            return self._stop_service.handle(
                StopRequest(
                    game_id=parsed.game_id,
                    op_source=OpSource.LOBBY_STREAM,
                    reason=parsed.reason,
                    source_ref=job.entry_id,
                    job=job,
                )
            )
        except Exception as error:
            log.exception("lifecycle raised on a stream job", extra={"job_id": job.entry_id})
            kind = OpKind.START if isinstance(parsed, StartJob) else OpKind.STOP
            return OperationResult(
                parsed.game_id,
                kind,
                Outcome.FAILURE,
                failure=Failure(ErrorCode.INTERNAL, f"internal error: {type(error).__name__}"),
            )

    def _retry(self, held: HeldJob, problem: str) -> None:
        """Keep the entry pending and run it again after a backoff (not a delivery)."""
        held.attempts += 1
        delay = self._settings.retry.delay(held.attempts)
        self._telemetry.stream_job(held.entry.stream, "retry")
        log.warning(
            "stream job will be retried",
            extra={
                **held.log_fields(),
                "problem": problem,
                "attempt": held.attempts,
                "delay_ms": round(delay * 1000),
            },
        )
        with self._lock:
            if self._draining.is_set():
                return  # stays pending in Redis
            heapq.heappush(self._retries, (self._clock() + delay, next(self._retry_seq), held))
        self._wake.set()

    def _answered(self, held: HeldJob, answer: JobAnswer, outcome: AnswerOutcome) -> None:
        extra = {**held.log_fields(), "outcome": answer.outcome, "answer": str(outcome)}
        if answer.error_code:
            extra["error_code"] = answer.error_code
        if answer.dead_letter:
            extra["reason"] = answer.fields.get("reason", "")
        if outcome is AnswerOutcome.NOT_OURS:
            log.info("stream job taken over by another consumer; not answered here", extra=extra)
        else:
            self._telemetry.stream_job(held.entry.stream, answer.outcome)
            level = logging.INFO if answer.outcome in ("success", "superseded") else logging.WARNING
            log.log(level, "stream job answered", extra=extra)
        self._let_go(held)

    def _let_go(self, held: HeldJob) -> None:
        """Forget a job and let its game's next job run."""
        with self._room:
            self._held.pop(held.key, None)
            following = self._games.finish(held)
            if following is not None and not self._draining.is_set():
                self._ready.put(following)
            self._room.notify_all()


def _job_outcome(result: OperationResult, failure: Failure | None) -> JobOutcome:
    if result.superseded_by is not None:
        return JobOutcome.SUPERSEDED
    return JobOutcome.FAILURE if failure is not None else JobOutcome.SUCCESS
