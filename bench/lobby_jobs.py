"""Lobby jobs through Redis Streams against the same starts and stops as direct RPCs.

One `rtmanager serve` process, on the benchmark's own stream names and
Redis prefix (`server_env`), with `RTMANAGER_START_SETTLE=0s` as in
`bench.lifecycle` and the default `RTMANAGER_STREAM_WORKERS` (4 games at
a time).

- **streams**: a round appends a start job (`game_id`, `image_ref`, the
  format of docs/lobby-jobs.md) for each of 8 fresh games at once, then,
  once all are answered, a stop job (`reason=lobby_request`) for each. A
  job's time runs from its XADD until its entry appears on the results
  stream (a reader blocked on XREAD sees it); the phase ends with the last
  answer.
- **rpc**: the same 8 starts, then 8 stops, as `StartRuntime`/`StopRuntime`
  calls of `RuntimeManagerClient` from 4 threads, the consumer's parallelism.

Between rounds each game is cleaned up with `CleanupRuntime` (unmeasured).
Rounds alternate which side goes first, after one unmeasured warm-up round
each. Round count, a time budget and per-job timeouts bound the run.
Throughput = jobs (starts + stops) / wall time of the phases.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

from bench.common import (
    ENGINE_IMAGE,
    Row,
    TimedRound,
    isolation,
    latency_summary,
    log,
    rtmanager_server,
)
from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import REDIS_URL
from tests.e2e.conftest import ServerProcess

NAME = "lobby_jobs"
CALL_TIMEOUT = 60.0
STREAM_WORKERS = 4  # RTMANAGER_STREAM_WORKERS default
SERVER_ENV = {"RTMANAGER_START_SETTLE": "0s"}


@dataclass(frozen=True)
class LobbyJobsParams:
    """Games per round, rounds and the time budget of the measured rounds."""

    games: int = 8
    rounds: int = 10
    warmup_rounds: int = 1
    max_seconds: float = 240.0


DEFAULT = LobbyJobsParams()
QUICK = LobbyJobsParams(rounds=2, max_seconds=90.0)


class ResultWatcher:
    """Follows the results stream and notes when each job's answer appears."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self._client = client
        self._stream = stream
        self._seen: dict[str, tuple[float, dict[str, str]]] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="results", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        last = "0-0"
        while not self._stop.is_set():
            reply = cast(
                "list[Any]", self._client.xread({self._stream: last}, block=200, count=100)
            )
            now = time.perf_counter()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    decoded = {k.decode(): v.decode() for k, v in fields.items()}
                    with self._changed:
                        self._seen[decoded["job_id"]] = (now, decoded)
                        self._changed.notify_all()

    def wait(self, job_ids: list[str], timeout: float) -> dict[str, tuple[float, dict[str, str]]]:
        """The arrival time and fields of each job's answer; TimeoutError if one is missing."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(job in self._seen for job in job_ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [job for job in job_ids if job not in self._seen]
                    raise TimeoutError(f"no answer within {timeout}s for jobs {missing}")
                self._changed.wait(left)
            return {job: self._seen[job] for job in job_ids}

    def close(self) -> None:
        """Stop following (the reader's block is short)."""
        self._stop.set()
        self._thread.join(timeout=5)


class StreamSide:
    """Starts and stops as Lobby sends them: XADD, then the answer on the results stream."""

    def __init__(self, client: redis.Redis, env: dict[str, str], watcher: ResultWatcher) -> None:
        self._client = client
        self._start_stream = env["RTMANAGER_START_JOBS_STREAM"]
        self._stop_stream = env["RTMANAGER_STOP_JOBS_STREAM"]
        self._watcher = watcher

    def _phase(self, stream: str, jobs: list[dict[str, str]]) -> TimedRound:
        began = time.perf_counter()
        sent: dict[str, float] = {}
        pipe = self._client.pipeline(transaction=False)
        for fields in jobs:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        for entry_id in pipe.execute():
            sent[entry_id.decode()] = began
        answers = self._watcher.wait(list(sent), CALL_TIMEOUT * 2)
        failed = {job: f for job, (_, f) in answers.items() if f["outcome"] != "success"}
        if failed:
            raise RuntimeError(f"jobs not answered success: {failed}")
        ended = max(at for at, _ in answers.values())
        return TimedRound(ended - began, [at - sent[job] for job, (at, _) in answers.items()])

    def starts(self, games: list[str]) -> TimedRound:
        """One start job per game, appended at once (one pipeline)."""
        return self._phase(
            self._start_stream, [{"game_id": g, "image_ref": ENGINE_IMAGE} for g in games]
        )

    def stops(self, games: list[str]) -> TimedRound:
        """One stop job per game, appended at once."""
        return self._phase(
            self._stop_stream, [{"game_id": g, "reason": "lobby_request"} for g in games]
        )


class RpcSide:
    """The same starts and stops as calls, from as many threads as the consumer has workers."""

    def __init__(self, client: RuntimeManagerClient, pool: ThreadPoolExecutor) -> None:
        self._client = client
        self._pool = pool

    def _phase(self, call: Any, games: list[str], status: RuntimeStatus) -> TimedRound:
        began = time.perf_counter()

        def one(game_id: str) -> float:
            record = call(game_id)
            if record.status is not status:
                raise RuntimeError(f"{game_id} is {record.status}, expected {status}")
            return time.perf_counter() - began

        latencies = [f.result(CALL_TIMEOUT * 2) for f in [self._pool.submit(one, g) for g in games]]
        return TimedRound(time.perf_counter() - began, latencies)

    def starts(self, games: list[str]) -> TimedRound:
        """`StartRuntime` of each game."""
        return self._phase(
            lambda g: self._client.start_runtime(g, ENGINE_IMAGE, timeout=CALL_TIMEOUT),
            games,
            RuntimeStatus.RUNNING,
        )

    def stops(self, games: list[str]) -> TimedRound:
        """`StopRuntime` of each game."""
        return self._phase(
            lambda g: self._client.stop_runtime(g, timeout=CALL_TIMEOUT),
            games,
            RuntimeStatus.STOPPED,
        )


def _clean_up(client: RuntimeManagerClient, pool: ThreadPoolExecutor, games: list[str]) -> None:
    for future in [
        pool.submit(client.cleanup_runtime, g, force=True, timeout=CALL_TIMEOUT) for g in games
    ]:
        future.result(CALL_TIMEOUT * 2)


def _dead_letters(client: redis.Redis, server: ServerProcess) -> int:
    return cast("int", client.xlen(server.env["RTMANAGER_DEAD_LETTER_STREAM"]))


def run(*, quick: bool = False) -> dict[str, Any]:
    """Alternate stream and RPC rounds on one server; return rows and raw numbers."""
    params = QUICK if quick else DEFAULT
    phases = ("start", "stop")
    samples: dict[str, dict[str, list[TimedRound]]] = {
        side: {phase: [] for phase in phases} for side in ("streams", "rpc")
    }
    dead_letters = 0
    with isolation(NAME) as iso:
        redis_client = redis.Redis.from_url(REDIS_URL, socket_timeout=10)
        try:
            with (
                rtmanager_server(iso, extra_env=SERVER_ENV) as server,
                RuntimeManagerClient(server.address, timeout=CALL_TIMEOUT) as client,
                ThreadPoolExecutor(STREAM_WORKERS, thread_name_prefix="bench") as pool,
            ):
                watcher = ResultWatcher(redis_client, server.env["RTMANAGER_JOB_RESULTS_STREAM"])
                try:
                    sides: dict[str, StreamSide | RpcSide] = {
                        "streams": StreamSide(redis_client, server.env, watcher),
                        "rpc": RpcSide(client, pool),
                    }
                    order = list(sides)
                    budget_ends = None
                    for index in range(params.warmup_rounds + params.rounds):
                        measured = index >= params.warmup_rounds
                        if measured and budget_ends is None:
                            budget_ends = time.monotonic() + params.max_seconds
                        if budget_ends is not None and time.monotonic() > budget_ends:
                            log(f"{NAME}: time budget of {params.max_seconds:.0f} s used; stopping")
                            break
                        for name in order if index % 2 == 0 else list(reversed(order)):
                            games = [
                                f"lj-{iso.run_id}-{name[0]}{index:02d}-{k}"
                                for k in range(params.games)
                            ]
                            side = sides[name]
                            try:
                                started = side.starts(games)
                                stopped = side.stops(games)
                            finally:
                                _clean_up(client, pool, games)
                            if measured:
                                samples[name]["start"].append(started)
                                samples[name]["stop"].append(stopped)
                        if measured:
                            log(
                                f"{NAME}: round {index - params.warmup_rounds + 1}/"
                                f"{params.rounds}: streams "
                                f"{samples['streams']['start'][-1].seconds * 1000:.0f}+"
                                f"{samples['streams']['stop'][-1].seconds * 1000:.0f} ms, rpc "
                                f"{samples['rpc']['start'][-1].seconds * 1000:.0f}+"
                                f"{samples['rpc']['stop'][-1].seconds * 1000:.0f} ms "
                                f"for {params.games} starts + stops"
                            )
                    dead_letters = _dead_letters(redis_client, server)
                finally:
                    watcher.close()
        finally:
            redis_client.close()
    if dead_letters:
        raise RuntimeError(f"{dead_letters} jobs were dead-lettered")

    def throughput(results: list[TimedRound]) -> float:
        seconds = sum(r.seconds for r in results)
        return sum(len(r.latencies) for r in results) / seconds if seconds else float("nan")

    rows: list[Row] = []
    for label, chosen in (("start", ("start",)), ("stop", ("stop",)), ("all", phases)):
        ours = [r for p in chosen for r in samples["streams"][p]]
        floor = [r for p in chosen for r in samples["rpc"][p]]
        case = f"{params.games} games, {label} jobs (floor: RPCs x{STREAM_WORKERS})"
        rows.append(
            Row(
                NAME,
                case,
                "throughput",
                "jobs/s",
                throughput(ours),
                throughput(floor),
                notes={"rounds": len(samples["streams"]["start"])},
            )
        )
        if label != "all":
            mine = latency_summary([x for r in ours for x in r.latencies])
            theirs = latency_summary([x for r in floor for x in r.latencies])
            rows.append(Row(NAME, case, "job latency p50", "ms", mine["p50_ms"], theirs["p50_ms"]))
    return {
        "params": {
            **asdict(params),
            "rpc_threads": STREAM_WORKERS,
            "image": ENGINE_IMAGE,
            "server_env": SERVER_ENV,
        },
        "rows": [row.to_json() for row in rows],
        "raw": {
            side: {phase: [asdict(r) for r in results] for phase, results in by_phase.items()}
            for side, by_phase in samples.items()
        },
    }
