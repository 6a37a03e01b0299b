"""Watch fan-out: WatchRuntimes delivery latency and lost events at 100 and 1000 watchers.

rtmanager: the real `rtmanager serve` process on its own migrated schema,
with `RTMANAGER_WATCH_MAX_SUBSCRIBERS=1000` (watches run on the server's
event loop and take no thread, so the thread pool keeps its default size).
Events are produced by committing record changes the way the service does,
through the PostgreSQL adapters on the benchmark's schema: one unit of work
upserts a (stopped) record, appends its operation-log row and its event,
and commits. Floor: `bench.bare_fanout`, a bare `grpc.aio` servicer in its
own process (the same kind of server as rtmanager's watch path), one
asyncio queue per subscriber of pre-serialized bytes; an event is
published to it with one unary call carrying a `WatchRuntimesResponse`
built the same way (same record shape, same size).

Latency is measured from the moment the producer sends its `COMMIT` (or
its `Publish` call) to the moment the message arrives in a subscriber
process (`time.monotonic()`, one clock for every process): it includes the
commit itself (its duration is reported as `commit_ms`), because a commit
can reach watchers before `commit()` returns to the producer. Every watcher
watches everything, so every event goes to every subscriber. Lost =
subscriber-event pairs that never arrived within the drain time, plus
repeats; both must be 0.

Subscribers: `bench.watch_clients`, two processes (one per core), each one
asyncio loop holding half the streams over 4 connections; messages are
kept as bytes with their arrival time and parsed after the measurement.
The same clients measure both servers, so what they add is in the floor
too, and their CPU use is reported (`client_cpu_share`: CPU seconds of the
client processes per second of measurement).

Memory: `VmRSS` of both servers with 1000 watchers connected, after the
events of the last 1000-watcher round (and once idle, before any watcher).

Rounds alternate rtmanager / floor, floor / rtmanager. Each round is
bounded: connecting at most 120 s, a fixed count of events at a fixed
interval, and a drain of 3 s after the last one.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from bench.bare_fanout import PUBLISH_METHOD
from bench.common import (
    Isolation,
    Row,
    bare_process,
    isolation,
    latency_summary,
    log,
    proc_status,
    rtmanager_server,
)
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.api.convert_results import watch_item_to_pb
from rtmanager.domain.ids import engine_endpoint
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.watch import ChangeEvent
from rtmanager.ports import RuntimeEvent
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import REPO

NAME = "watch_fanout"
MAX_WATCHERS = 1000
CLIENT_PROCESSES = 2
CHANNELS_PER_CLIENT = 4
GAMES = 10
DRAIN_SECONDS = 3.0
READY_SECONDS = 150.0
WARMUP_EVENTS = 5


@dataclass(frozen=True)
class Case:
    """One subscriber count: how many events, how far apart, how many rounds."""

    watchers: int
    events: int
    """Measured events per round and target."""
    interval: float
    """Seconds between two commits (or publishes)."""
    rounds: int


DEFAULT = (Case(100, 300, 0.02, 2), Case(1000, 100, 0.1, 2))
QUICK = (Case(100, 100, 0.02, 1), Case(1000, 40, 0.1, 1))


# -- producers -----------------------------------------------------------------


def _record(iso: Isolation, game_id: str, now: datetime) -> RuntimeRecord:
    # Stopped: the reconciler leaves a stopped record without a container alone.
    return RuntimeRecord(
        game_id=game_id,
        status=RuntimeStatus.STOPPED,
        engine_endpoint=engine_endpoint(game_id, 8080),
        state_path=str(iso.state_root / game_id),
        docker_network=f"galaxy-{iso.cluster}",
        last_op_at=now,
        created_at=now - timedelta(minutes=10),
        current_container_id=uuid.uuid4().hex + uuid.uuid4().hex,
        current_image_ref="galaxy/engine-stub:1.0.0",
        started_at=now - timedelta(minutes=10),
        stopped_at=now,
    )


def _entry(game_id: str, now: datetime) -> OperationEntry:
    return OperationEntry(
        game_id=game_id,
        op_kind=OpKind.STOP,
        op_source=OpSource.ADMIN_REST,
        outcome=Outcome.SUCCESS,
        started_at=now,
        finished_at=now,
        image_ref="galaxy/engine-stub:1.0.0",
    )


class CommitProducer:
    """Commits record changes as the service does; each commit makes one event."""

    def __init__(self, iso: Isolation) -> None:
        self._iso = iso
        self._pool = create_pool(POSTGRES_DSN, iso.schema, max_size=1, timeout=10)
        self._units = PostgresUnitOfWorkFactory(self._pool, default_timeout=timedelta(seconds=10))
        self._n = 0
        self.commit_seconds: list[float] = []

    def produce(self) -> tuple[int, float]:
        """Commit one change; return its event id and when the commit was sent."""
        self._n += 1
        now = datetime.now(UTC)
        game_id = f"watch-{self._n % GAMES:02d}"
        record = _record(self._iso, game_id, now)
        with self._units() as uow:
            uow.records.upsert(record)
            stored = uow.operations.append(_entry(game_id, now))
            uow.events.append(stored, record)
            sent = time.monotonic()
            uow.commit()  # sends the event and COMMIT together
        self.commit_seconds.append(time.monotonic() - sent)
        [event_id] = uow.committed_event_ids
        return event_id, sent

    def close(self) -> None:
        self._pool.close()


class PublishProducer:
    """Publishes to the floor the message rtmanager would send for the same change."""

    def __init__(self, iso: Isolation, address: str) -> None:
        self._iso = iso
        self._channel = grpc.insecure_channel(address)
        self._publish = self._channel.unary_unary(PUBLISH_METHOD, None, None)
        self._n = 0
        self.message_bytes = 0

    def produce(self) -> tuple[int, float]:
        """Publish one event; return its id and when the call was made."""
        self._n += 1
        now = datetime.now(UTC)
        game_id = f"watch-{self._n % GAMES:02d}"
        event = RuntimeEvent(
            id=self._n,
            operation_id=self._n,
            op_kind=OpKind.STOP,
            op_source=OpSource.ADMIN_REST,
            outcome=Outcome.SUCCESS,
            record=_record(self._iso, game_id, now),
            committed_at=now,
        )
        message = watch_item_to_pb(ChangeEvent(event)).SerializeToString()
        self.message_bytes = len(message)
        sent = time.monotonic()
        self._publish(message, timeout=10)
        return self._n, sent

    def close(self) -> None:
        self._channel.close()


# -- the floor server ------------------------------------------------------------


@dataclass
class FanoutServer:
    """`bench.bare_fanout` in its own process."""

    process: subprocess.Popen[bytes]
    address: str


@contextlib.contextmanager
def fanout_server(iso: Isolation) -> Iterator[FanoutServer]:
    """Start `python -m bench.bare_fanout`; SIGTERM afterwards."""
    with bare_process(iso, "bench.bare_fanout") as started:
        yield FanoutServer(*started)


# -- subscribers -----------------------------------------------------------------


@contextlib.contextmanager
def subscribers(iso: Isolation, address: str, count: int, tag: str) -> Iterator[list[Path]]:
    """`count` WatchRuntimes streams in `CLIENT_PROCESSES` processes, all subscribed.

    Yields the files their results go to; leaving the block stops them.
    """
    processes: list[subprocess.Popen[str]] = []
    outs: list[Path] = []
    try:
        for k in range(CLIENT_PROCESSES):
            share = count // CLIENT_PROCESSES + (1 if k < count % CLIENT_PROCESSES else 0)
            out = iso.workdir / f"clients-{tag}-{k}.json"
            out.unlink(missing_ok=True)
            outs.append(out)
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.watch_clients",
                        "--target",
                        address,
                        "--streams",
                        str(share),
                        "--channels",
                        str(CHANNELS_PER_CLIENT),
                        "--out",
                        str(out),
                    ],
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + READY_SECONDS
        for process in processes:
            assert process.stdout is not None
            left = max(deadline - time.monotonic(), 0)
            ready, _, _ = select.select([process.stdout], [], [], left)
            line = process.stdout.readline().strip() if ready else "no answer"
            if line != "ready":
                raise RuntimeError(f"watch clients of {tag} not subscribed: {line}")
        yield outs
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("stop\n")
            process.stdin.flush()
        for process in processes:
            process.wait(timeout=120)
            if process.returncode != 0:
                raise RuntimeError(f"watch clients of {tag} exited with {process.returncode}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- one round -------------------------------------------------------------------


@dataclass
class RoundResult:
    """Latencies and counts of one or more rounds against one target."""

    latencies: list[float]
    expected: int = 0
    received: int = 0
    lost: int = 0
    repeated: int = 0
    ended_early: int = 0
    client_cpu_seconds: float = 0.0
    seconds: float = 0.0

    def add(self, other: RoundResult) -> None:
        self.latencies.extend(other.latencies)
        for name in ("expected", "received", "lost", "repeated", "ended_early"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.client_cpu_seconds += other.client_cpu_seconds
        self.seconds += other.seconds

    def summary(self) -> dict[str, Any]:
        return {
            **latency_summary(self.latencies),
            "expected": self.expected,
            "received": self.received,
            "lost": self.lost,
            "repeated": self.repeated,
            "ended_early": self.ended_early,
            "client_cpu_share": (self.client_cpu_seconds / self.seconds) if self.seconds else 0.0,
        }


def measure_round(
    iso: Isolation,
    address: str,
    produce: Callable[[], tuple[int, float]],
    case: Case,
    tag: str,
    server_pid: int,
    memory: dict[str, Any],
) -> RoundResult:
    """Subscribe `case.watchers` streams, produce the events, collect what arrived."""
    committed: dict[int, float] = {}
    with subscribers(iso, address, case.watchers, tag) as outs:
        for _ in range(WARMUP_EVENTS):
            produce()
            time.sleep(case.interval)
        time.sleep(DRAIN_SECONDS / 3)
        began = time.monotonic()
        next_at = began
        for _ in range(case.events):
            next_at += case.interval
            event_id, at = produce()
            committed[event_id] = at
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        time.sleep(DRAIN_SECONDS)
        seconds = time.monotonic() - began
        if case.watchers == MAX_WATCHERS:
            memory["with_watchers"] = proc_status(server_pid)
    result = RoundResult(latencies=[], seconds=seconds)
    for out in outs:
        report = json.loads(out.read_text())
        result.client_cpu_seconds += report["cpu_seconds"]
        for stream in report["streams"]:
            result.expected += len(committed)
            seen: set[int] = set()
            for cursor, arrived in stream["events"]:
                if cursor not in committed:
                    continue  # a warm-up event
                if cursor in seen:
                    result.repeated += 1
                    continue
                seen.add(cursor)
                result.latencies.append(arrived - committed[cursor])
            result.received += len(seen)
            result.lost += len(committed) - len(seen)
            if stream["ended"] not in ("cancelled", "OK"):
                result.ended_early += 1
    return result


# -- the benchmark -----------------------------------------------------------------


def run(*, quick: bool = False) -> dict[str, Any]:
    """Measure both servers at every subscriber count; return rows and raw numbers."""
    cases = QUICK if quick else DEFAULT
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    memory: dict[str, dict[str, Any]] = {"rtmanager": {}, "bare": {}}
    env = {"RTMANAGER_WATCH_MAX_SUBSCRIBERS": str(MAX_WATCHERS)}
    with (
        isolation(NAME) as iso,
        rtmanager_server(iso, extra_env=env) as server,
        fanout_server(iso) as bare,
    ):
        time.sleep(1.0)
        memory["rtmanager"]["idle"] = proc_status(server.process.pid)
        memory["bare"]["idle"] = proc_status(bare.process.pid)
        commits = CommitProducer(iso)
        publishes = PublishProducer(iso, bare.address)
        targets = {
            "rtmanager": (server.address, commits.produce, server.process.pid),
            "bare": (bare.address, publishes.produce, bare.process.pid),
        }
        try:
            for case in cases:
                label = f"{case.watchers} watchers"
                results = {name: RoundResult(latencies=[]) for name in targets}
                for round_no in range(case.rounds):
                    order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
                    for name in order:
                        log(f"{NAME}: {label}, round {round_no + 1}, {name}")
                        address, produce, pid = targets[name]
                        results[name].add(
                            measure_round(
                                iso,
                                address,
                                produce,
                                case,
                                f"{name}-{case.watchers}-{round_no}",
                                pid,
                                memory[name],
                            )
                        )
                raw[label] = {name: result.summary() for name, result in results.items()}
                ours, floor = raw[label]["rtmanager"], raw[label]["bare"]
                for metric in ("p50_ms", "p99_ms", "max_ms"):
                    name = f"delivery {metric[:-3]}"
                    rows.append(Row(NAME, label, name, "ms", ours[metric], floor[metric]))
                rows.append(
                    Row(
                        NAME,
                        label,
                        "lost + repeated",
                        "events",
                        ours["lost"] + ours["repeated"],
                        floor["lost"] + floor["repeated"],
                        notes={"expected": [ours["expected"], floor["expected"]]},
                    )
                )
        finally:
            commits.close()
            publishes.close()
    for when, case_name in (("idle", "idle, no watchers"), ("with_watchers", "1000 watchers")):
        if when in memory["rtmanager"] and when in memory["bare"]:
            rows.append(
                Row(
                    NAME,
                    case_name,
                    "VmRSS",
                    "MiB",
                    memory["rtmanager"][when]["rss_kb"] / 1024,
                    memory["bare"][when]["rss_kb"] / 1024,
                    notes={"threads": [memory[side][when]["threads"] for side in memory]},
                )
            )
    return {
        "params": {
            "cases": [asdict(case) for case in cases],
            "client_processes": CLIENT_PROCESSES,
            "channels_per_client": CHANNELS_PER_CLIENT,
            "drain_seconds": DRAIN_SECONDS,
            "warmup_events": WARMUP_EVENTS,
            "floor_message_bytes": publishes.message_bytes,
        },
        "commit_ms": latency_summary(commits.commit_seconds),
        "rows": [row.to_json() for row in rows],
        "raw": raw,
        "memory": memory,
    }
