"""The chaos soak (SPEC §11): two replicas under load while faults are injected.

    .venv/bin/python -m bench.soak --seconds 90      # the short run of scripts/test.sh
    .venv/bin/python -m bench.soak --minutes 30      # the long run (the default)

Set-up, all of its own and all torn down at the end (also on a failure,
Ctrl-C or SIGTERM): a private PostgreSQL and a private Redis
(`tests/support/`; the shared servers are never touched), a migrated
schema, a cluster, engine network, state root, stream names and Redis
prefix of the run's own, and two replicas (`rtmanager serve`, instance ids
`replica-a` and `replica-b`, each on its own loopback port, configured as
the e2e tests configure a server: `tests/e2e/conftest.py:server_env`). The
timings are the service's defaults (lease TTL 60 s, claim idle 30 s,
retry window 10 min) except `RTMANAGER_RECONCILE_INTERVAL=10s` (the default
is 60 s), so the settle phase does not wait a minute for a pass; the pool
has the default 10 connections. Bearer tokens are on: the Game Master
client uses the `game_master` token. Containers carry the cluster label
and `com.galaxy.test=<cluster>`. Every process logs into the run directory
(printed at the start): `replica-a.1.log` (one file per incarnation),
`redis/redis.log`, `postgres.log`, `soak.log` (the timeline of faults and
phases), `gm_calls.jsonl`, `watch.jsonl`, `producer.jsonl`, the stored data
at the end (`db_*.jsonl`, `redis_*.jsonl`) and `report.json`.

Load, bounded in rate: a Lobby producer (start/stop jobs for 14 games on
the two streams, about 1.5 jobs/s, a game's next job at least 2 ms after
its previous one); two Game Master threads (restart, patch between
engine-stub 1.0.0 and 1.0.1, get; through `RuntimeManagerClient` against
a random live replica with a 5 s deadline; every answer's status and code
recorded); a resuming watcher (`WatchRuntimes` with an initial snapshot,
then on any error — or its 60 s stream deadline — again with its last
cursor on a live replica; every event id recorded).

Faults, one at a time, in shuffled cycles of the seven kinds: kill -9 of a
replica (restarted under the same instance id 3 s later), SIGTERM of a
replica (restarted), Redis restart (down 2 s), PostgreSQL restart (fast or
immediate, down 2 s), dockerd restart (`scripts/dockerd.sh restart`, the
shared daemon), SIGSTOP of Redis and of PostgreSQL for 8 s (longer than the
RPC deadline), then SIGCONT. After each fault the soak waits (at most 60 s)
for both replicas to report SERVING, then 15-30 s (short runs: what the
remaining time allows, the dockerd restart last in the first cycle so the
others always fit). A fault that would not end before the deadline is not
started.

Settle (bounded, at most about 3 minutes): faults and Game Master traffic
stop; the soak waits until every produced job is answered (90 s), sends
one final job per game (half start, half stop; engines killed by a dockerd
restart are legitimately stopped, so the final state is defined by these),
waits for their answers (45 s), waits until records and containers stop
changing for 12 s (at most 30 s), and until the watcher has received the
newest stored event (15 s). Then `bench.soak_checks.evaluate` computes
the counts (its docstring defines each precisely), the soak prints a table
and the JSON object, writes `report.json`, and exits 1 unless every
must-be-zero count is 0 (2 when the set-up failed, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import docker
import docker.errors
import grpc
import psycopg
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench import soak_checks as checks
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.client import RuntimeManagerClient, RuntimeManagerClientError
from tests.conftest import TEST_LABEL, remove_labelled
from tests.e2e.conftest import REPO, free_port, run_cli, server_env, wait_serving
from tests.support.private_postgres import PrivatePostgres, private_postgres
from tests.support.private_redis import PrivateRedis

STUB = "galaxy/engine-stub:1.0.0"
STUB_PATCH = "galaxy/engine-stub:1.0.1"
OWNER_LABEL = "com.galaxy.owner"
CLUSTER_LABEL = "com.galaxy.rtmanager.cluster"
GAME_LABEL = "com.galaxy.game_id"
SCHEMA = "soak"
DOCKERD_LOG = Path("/var/log/rtmanager-dockerd.log")  # scripts/dockerd.sh
GM_TOKEN = "soak-gm-" + uuid.uuid4().hex
ADMIN_TOKEN = "soak-admin-" + uuid.uuid4().hex

RPC_DEADLINE = 5.0
PAUSE_FOR = 8.0
KILL_DOWN_FOR = 3.0
DOWN_FOR = 2.0
WATCH_STREAM_DEADLINE = 60.0
SERVING_TIMEOUT = 90.0
RECOVERY_TIMEOUT = 60.0
GAP = (15.0, 30.0)
# Settle phase budgets (seconds).
ANSWER_WAIT = 90.0
FINAL_ANSWER_WAIT = 45.0
STABLE_FOR = 12.0
STABLE_WAIT = 30.0
WATCH_CATCH_UP = 15.0

FAULT_KINDS = (
    "kill9_replica",
    "sigterm_replica",
    "redis_restart",
    "postgres_restart",
    "dockerd_restart",
    "redis_pause",
    "postgres_pause",
)
# How long each fault takes, injection to recovery, about (for the schedule).
FAULT_ESTIMATE = {
    "kill9_replica": 16.0,
    "sigterm_replica": 8.0,
    "redis_restart": 5.0,
    "postgres_restart": 5.0,
    "dockerd_restart": 15.0,
    "redis_pause": 10.0,
    "postgres_pause": 10.0,
}
CHANNEL_OPTIONS = [
    # A restarted replica is reached again within a second, not after
    # grpc's default reconnect backoff (up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class SoakLog:
    """The run's timeline: JSON lines in `soak.log`, and a short line on stderr."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def __call__(self, message: str, **fields: Any) -> None:
        elapsed = time.monotonic() - self._t0
        line = {"t": round(elapsed, 2), "at": _now(), "msg": message, **fields}
        with self._lock:
            self._file.write(json.dumps(line, default=str) + "\n")
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            sys.stderr.write(f"[soak {elapsed:7.1f}s] {message} {extra}\n")
            sys.stderr.flush()

    def close(self) -> None:
        self._file.close()


class JsonLines:
    """A thread-safe JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a", buffering=1)
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        with self._lock:
            self._file.write(json.dumps({"at": _now(), **fields}, default=str) + "\n")

    def close(self) -> None:
        self._file.close()


def _now() -> str:
    return time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"


# -- replicas --------------------------------------------------------------------


class Replica:
    """One `rtmanager serve` process under a stable instance id, restartable."""

    def __init__(self, name: str, env: dict[str, str], run_dir: Path) -> None:
        self.name = name
        self.env = env
        self.address = env["RTMANAGER_GRPC_ADDR"]
        self.run_dir = run_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.up = False
        """Offered to clients (false while the soak takes it down)."""
        self.expected_exit = False
        self.exits: list[dict[str, Any]] = []
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.client = RuntimeManagerClient(
            self.address, token=GM_TOKEN, channel=self.channel, timeout=RPC_DEADLINE
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.{self.incarnation}.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start a new incarnation (does not wait)."""
        self.incarnation += 1
        self.expected_exit = False
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rtmanager.cli", "serve"],
                env=self.env,
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C of the soak reaches the soak only
            )

    def wait_serving(self, timeout: float = SERVING_TIMEOUT) -> bool:
        """Wait until it reports SERVING; False if it exited or timed out."""
        assert self.process is not None
        try:
            wait_serving(self.address, self.process, timeout)
        except (RuntimeError, TimeoutError):
            return False
        self.up = True
        return True

    def serving(self) -> bool:
        """One health check (1 s)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def kill(self) -> int | None:
        """SIGKILL and reap."""
        self.up = False
        self.expected_exit = True
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.kill()
        code = self.process.wait()
        self._exited(code, "SIGKILL")
        return code

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM and wait up to `timeout` (then SIGKILL); the exit code and how long it took."""
        self.up = False
        self.expected_exit = True
        if self.process is None or self.process.poll() is not None:
            return (self.process.returncode if self.process else None, 0.0)
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
            self._exited(code, "SIGTERM, then SIGKILL after the timeout")
            return code, time.monotonic() - began
        self._exited(code, "SIGTERM")
        return code, time.monotonic() - began

    def _exited(self, code: int, how: str) -> None:
        self.exits.append(
            {"incarnation": self.incarnation, "code": code, "how": how, "log": str(self.log_path)}
        )

    def close(self) -> None:
        self.client.close()


class Replicas:
    """The two replicas, and what clients should call."""

    def __init__(self, replicas: list[Replica], log: SoakLog) -> None:
        self.all = replicas
        self.log = log
        self.crashes: list[dict[str, Any]] = []
        self.restart_failures: list[dict[str, Any]] = []
        self._rng = random.Random()

    def pick(self) -> Replica:
        """A random replica that is up (any, when none is)."""
        live = [r for r in self.all if r.up and r.alive]
        return self._rng.choice(live or self.all)

    def start(self, replica: Replica) -> bool:
        """Launch `replica` and wait for SERVING (one more try if it exits); count failures."""
        for attempt in (1, 2):
            replica.launch()
            if replica.wait_serving():
                return True
            failure = {
                "replica": replica.name,
                "incarnation": replica.incarnation,
                "attempt": attempt,
                "exit_code": replica.process.poll() if replica.process else None,
                "log": str(replica.log_path),
            }
            self.restart_failures.append(failure)
            self.log("replica did not reach SERVING", **failure)
            if replica.alive:
                # Still starting: leave it running, it may come up later.
                replica.up = True
                return False
        return False

    def tend(self) -> None:
        """Restart any replica that exited without the soak causing it (a crash)."""
        for replica in self.all:
            if replica.process is None or replica.alive or replica.expected_exit:
                continue
            code = replica.process.returncode
            crash = {
                "replica": replica.name,
                "incarnation": replica.incarnation,
                "exit_code": code,
                "log": str(replica.log_path),
            }
            replica._exited(code, "crashed")
            self.crashes.append(crash)
            self.log("replica exited by itself; restarting it", **crash)
            replica.up = False
            self.start(replica)

    def wait_all_serving(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tend()
            if all(r.alive and r.serving() for r in self.all):
                return True
            time.sleep(0.5)
        return False


# -- load ------------------------------------------------------------------------


class Producer(threading.Thread):
    """Lobby: start/stop jobs for the games on the two job streams."""

    def __init__(
        self, redis_url: str, env: dict[str, str], games: list[str], run_dir: Path, seed: int
    ) -> None:
        super().__init__(name="lobby-producer", daemon=True)
        self.start_stream = env["RTMANAGER_START_JOBS_STREAM"]
        self.stop_stream = env["RTMANAGER_STOP_JOBS_STREAM"]
        self.games = games
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.published = Counter[str]()
        self.failed = Counter[str]()
        self._last_kind: dict[str, str] = {}
        self._last_ms: dict[str, int] = {}
        self._log = JsonLines(run_dir / "producer.jsonl")
        # One attempt per job, a short timeout: a failed XADD is not retried
        # (Lobby would see the failure); the streams themselves say what
        # was produced.
        self.redis = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )

    def publish(self, game_id: str, kind: str) -> str | None:
        """Append one job (a game's jobs at least 2 ms apart); its entry id, None if it failed."""
        while time.time() * 1000 < self._last_ms.get(game_id, 0) + 2:
            time.sleep(0.001)
        if kind == checks.START:
            stream, fields = self.start_stream, {"game_id": game_id, "image_ref": STUB}
        else:
            reason = self.rng.choice(["lobby_request", "game_finished"])
            stream, fields = self.stop_stream, {"game_id": game_id, "reason": reason}
        try:
            entry_id = str(self.redis.xadd(stream, fields))  # type: ignore[arg-type]
        except redis.RedisError as error:
            self._last_ms[game_id] = int(time.time() * 1000)
            self.failed[type(error).__name__] += 1
            self._log.write(game_id=game_id, kind=kind, error=repr(error))
            return None
        self._last_ms[game_id] = max(int(entry_id.partition("-")[0]), int(time.time() * 1000))
        self._last_kind[game_id] = kind
        self.published[kind] += 1
        self._log.write(game_id=game_id, kind=kind, stream=stream, job_id=entry_id)
        return entry_id

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(0.3, 1.0)):
            game_id = self.rng.choice(self.games)
            last = self._last_kind.get(game_id, checks.STOP)
            flip = self.rng.random() < 0.75
            kind = (checks.START if last == checks.STOP else checks.STOP) if flip else last
            if self.publish(game_id, kind) is None:
                self.halt.wait(1.0)  # Redis is away: Lobby would back off too

    def close(self) -> None:
        self.redis.close()
        self._log.close()


class GameMaster(threading.Thread):
    """Game Master: restart, patch and get on random games through a random live replica."""

    def __init__(
        self, index: int, replicas: Replicas, games: list[str], calls: JsonLines, seed: int
    ) -> None:
        super().__init__(name=f"game-master-{index}", daemon=True)
        self.replicas = replicas
        self.games = games
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.calls: list[checks.Call] = []
        self._log = calls
        self._images: dict[str, str] = {}
        self._index = index
        self._serial = 0

    def call_once(self) -> None:
        replica = self.replicas.pick()
        client = replica.client
        game_id = self.rng.choice(self.games)
        method = self.rng.choices(["get", "restart", "patch"], weights=[2, 1, 1])[0]
        self._serial += 1
        ref = f"soak-gm{self._index}-{self._serial}"
        target = STUB if self._images.get(game_id) == STUB_PATCH else STUB_PATCH
        began = time.monotonic()
        status, code, detail, unreadable = "OK", "", "", False
        try:
            if method == "get":
                record = client.get_runtime(game_id, timeout=RPC_DEADLINE)
            elif method == "restart":
                record = client.restart_runtime(game_id, source_ref=ref, timeout=RPC_DEADLINE)
            else:
                record = client.patch_runtime(game_id, target, source_ref=ref, timeout=RPC_DEADLINE)
            if record.current_image_ref:
                self._images[game_id] = record.current_image_ref
            detail = str(record.status)
        except RuntimeManagerClientError as error:
            status, code, detail = error.status.name, error.code, error.message[:300]
        except Exception as error:
            status, unreadable, detail = "CLIENT_ERROR", True, repr(error)[:300]
        call = checks.Call(method=method, status=status, code=code, unreadable=unreadable)
        self.calls.append(call)
        self._log.write(
            replica=replica.name,
            method=method,
            game_id=game_id,
            source_ref=ref if method != "get" else "",
            image_ref=target if method == "patch" else "",
            status=status,
            code=code,
            detail=detail,
            seconds=round(time.monotonic() - began, 3),
        )

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(0.5, 1.5)):
            self.call_once()


class Watcher(threading.Thread):
    """A resuming WatchRuntimes client: every event id it got, and its reconnects."""

    def __init__(self, replicas: Replicas, run_dir: Path) -> None:
        super().__init__(name="watcher", daemon=True)
        self.replicas = replicas
        self.halt = threading.Event()
        self.first_cursor: int | None = None
        self.cursor: int | None = None
        self.received: list[int] = []
        self.reconnects = Counter[str]()
        self.subscribed = threading.Event()
        self._log = JsonLines(run_dir / "watch.jsonl")
        self._lock = threading.Lock()
        self._current: RuntimeManagerClient | None = None

    def run(self) -> None:
        while not self.halt.is_set():
            replica = self.replicas.pick()
            request = pb.WatchRuntimesRequest(
                initial_snapshot=self.cursor is None,
                since="" if self.cursor is None else str(self.cursor),
            )
            client = RuntimeManagerClient(
                replica.address,
                token=GM_TOKEN,
                channel=grpc.insecure_channel(replica.address, options=CHANNEL_OPTIONS),
            )
            with self._lock:
                self._current = client
            self._log.write(connect=replica.name, since=request.since)
            reason = "stream ended"
            try:
                for item in client.watch_runtimes(request, timeout=WATCH_STREAM_DEADLINE):
                    self._take(item)
            except RuntimeManagerClientError as error:
                reason = f"{error.status.name} {error.code}".strip()
            except Exception as error:
                reason = f"client error {type(error).__name__}"
            finally:
                with self._lock:
                    self._current = None
                client.close()
            if self.halt.is_set():
                return
            self.reconnects[reason] += 1
            self._log.write(disconnected=replica.name, reason=reason, cursor=self.cursor)
            self.halt.wait(0.3)

    def _take(self, item: pb.WatchRuntimesResponse) -> None:
        which = item.WhichOneof("payload")
        if which == "snapshot_complete":
            cursor = int(item.snapshot_complete.cursor)
            if self.first_cursor is None:
                self.first_cursor = cursor
            self.cursor = cursor
            self.subscribed.set()
            self._log.write(first_cursor=cursor)
        elif which == "event":
            event_id = int(item.event.cursor)
            self.received.append(event_id)
            self.cursor = event_id if self.cursor is None else max(self.cursor, event_id)
            self._log.write(
                event=event_id,
                game_id=item.event.runtime.game_id,
                op_kind=pb.OpKind.Name(item.event.op_kind),
                status=pb.RuntimeStatus.Name(item.event.runtime.status),
            )
        elif which == "bookmark":
            cursor = int(item.bookmark.cursor)
            self.cursor = cursor if self.cursor is None else max(self.cursor, cursor)

    def stop(self) -> None:
        self.halt.set()
        with self._lock:
            if self._current is not None:
                self._current.close()
        self.join(timeout=10)
        self._log.close()


# -- faults ------------------------------------------------------------------------


@dataclass
class FaultRecord:
    """One injected fault."""

    kind: str
    target: str
    started: float
    started_at: float = 0.0
    """Wall-clock seconds (the clock of Redis's entry ids, on this machine)."""
    seconds: float = 0.0
    recovered_in: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Faults:
    """Injects one fault at a time and waits for the replicas to recover."""

    def __init__(
        self,
        replicas: Replicas,
        redis_server: PrivateRedis,
        postgres: PrivatePostgres,
        log: SoakLog,
        run_dir: Path,
        rng: random.Random,
    ) -> None:
        self.replicas = replicas
        self.redis = redis_server
        self.postgres = postgres
        self.log = log
        self.run_dir = run_dir
        self.rng = rng
        self.done: list[FaultRecord] = []
        self.dockerd_down = False

    def inject(self, kind: str) -> FaultRecord:
        began = time.monotonic()
        record = FaultRecord(
            kind=kind, target="", started=round(began, 1), started_at=round(time.time(), 3)
        )
        self.log("fault", kind=kind)
        getattr(self, f"_{kind}")(record)
        record.seconds = round(time.monotonic() - began, 1)
        ok = self.replicas.wait_all_serving(RECOVERY_TIMEOUT)
        record.recovered_in = round(time.monotonic() - began, 1) if ok else None
        self.done.append(record)
        self.log(
            "fault over",
            kind=kind,
            target=record.target,
            seconds=record.seconds,
            recovered_in=record.recovered_in,
            **record.details,
        )
        return record

    def _kill9_replica(self, record: FaultRecord) -> None:
        replica = self.rng.choice(self.replicas.all)
        record.target = replica.name
        record.details["exit_code"] = replica.kill()
        time.sleep(KILL_DOWN_FOR)
        record.details["serving"] = self.replicas.start(replica)

    def _sigterm_replica(self, record: FaultRecord) -> None:
        replica = self.rng.choice(self.replicas.all)
        record.target = replica.name
        code, took = replica.terminate(timeout=30)
        record.details.update(exit_code=code, drained_in=round(took, 1))
        time.sleep(1.0)
        record.details["serving"] = self.replicas.start(replica)

    def _redis_restart(self, record: FaultRecord) -> None:
        record.target = "redis"
        self.redis.restart(down_for=DOWN_FOR)

    def _postgres_restart(self, record: FaultRecord) -> None:
        mode = self.rng.choice(["fast", "immediate"])
        record.target = "postgres"
        record.details["mode"] = mode
        self.postgres.stop(mode)  # type: ignore[arg-type]
        time.sleep(DOWN_FOR)
        self.postgres.start()

    def _dockerd_restart(self, record: FaultRecord) -> None:
        record.target = "dockerd"
        self.dockerd_down = True
        with (self.run_dir / "dockerd-restarts.log").open("ab") as out:
            result = subprocess.run(
                ["bash", str(REPO / "scripts/dockerd.sh"), "restart", str(int(DOWN_FOR))],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=240,
                check=False,
            )
        record.details["exit_code"] = result.returncode
        if result.returncode == 0:
            self.dockerd_down = False

    def _redis_pause(self, record: FaultRecord) -> None:
        record.target = "redis"
        self.redis.pause()
        try:
            time.sleep(PAUSE_FOR)
        finally:
            self.redis.resume()

    def _postgres_pause(self, record: FaultRecord) -> None:
        record.target = "postgres"
        self.postgres.pause()
        try:
            time.sleep(PAUSE_FOR)
        finally:
            self.postgres.resume()

    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.done))


def fault_phase(faults: Faults, replicas: Replicas, seconds: float, rng: random.Random) -> None:
    """Inject faults until `seconds` have passed, none running past the end."""
    began = time.monotonic()
    deadline = began + seconds
    full_cycle = sum(FAULT_ESTIMATE.values()) + len(FAULT_KINDS) * GAP[0]
    short = seconds < full_cycle + 10
    warmup = min(8.0, seconds / 10)
    if short:
        budget = seconds - warmup - sum(FAULT_ESTIMATE.values())
        gap_range = (max(1.0, budget / len(FAULT_KINDS)),) * 2
    else:
        gap_range = GAP
    first = True
    cycle: list[str] = []
    _sleep_tending(replicas, warmup)
    while True:
        if not cycle:
            cycle = list(FAULT_KINDS)
            rng.shuffle(cycle)
            if first and short:
                # The dockerd restart is the one that may not fit a short run.
                cycle.remove("dockerd_restart")
                cycle.append("dockerd_restart")
            first = False
        left = deadline - time.monotonic()
        kind = next((k for k in cycle if FAULT_ESTIMATE[k] <= left), None)
        if kind is None:
            break
        cycle.remove(kind)
        faults.inject(kind)
        gap = rng.uniform(*gap_range)
        if time.monotonic() + gap >= deadline:
            break
        _sleep_tending(replicas, gap)
    _sleep_tending(replicas, max(0.0, deadline - time.monotonic()))


def _sleep_tending(replicas: Replicas, seconds: float) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        replicas.tend()
        time.sleep(min(0.5, left))


# -- reading what is stored --------------------------------------------------------


def xrange(client: redis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream (a decoding client)."""
    return cast(list[tuple[str, dict[str, str]]], client.xrange(stream))


def read_jobs(client: redis.Redis, env: dict[str, str]) -> list[checks.Job]:
    jobs: list[checks.Job] = []
    for kind, var in (
        (checks.START, "RTMANAGER_START_JOBS_STREAM"),
        (checks.STOP, "RTMANAGER_STOP_JOBS_STREAM"),
    ):
        stream = env[var]
        for entry_id, fields in xrange(client, stream):
            jobs.append(checks.Job(stream, entry_id, kind, fields.get("game_id", "")))
    return jobs


def read_answers(client: redis.Redis, env: dict[str, str]) -> list[checks.Answer]:
    return [answer for answer, _id in read_answer_entries(client, env)]


def read_answer_entries(
    client: redis.Redis, env: dict[str, str]
) -> list[tuple[checks.Answer, str]]:
    """Every answer with its own entry id: results, then dead letters."""
    answers = [
        (checks.Answer(f["stream"], f["job_id"], False, f["outcome"], f.get("error_code", "")), i)
        for i, f in xrange(client, env["RTMANAGER_JOB_RESULTS_STREAM"])
    ]
    answers += [
        (checks.Answer(f["stream"], f["job_id"], True, "dead_letter", ""), i)
        for i, f in xrange(client, env["RTMANAGER_DEAD_LETTER_STREAM"])
    ]
    return answers


def read_records(dsn: str) -> list[checks.Record]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT game_id, status, current_container_id, current_image_ref"
                " FROM {}.runtime_records"
            ).format(sql.Identifier(SCHEMA))
        ).fetchall()
    return [checks.Record(*row) for row in rows]


def read_event_ids(dsn: str) -> list[int]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id FROM {}.runtime_events ORDER BY id").format(sql.Identifier(SCHEMA))
        ).fetchall()
    return [int(row[0]) for row in rows]


def read_containers(docker_client: docker.DockerClient, cluster: str) -> list[checks.Container]:
    found = docker_client.api.containers(
        all=True, filters={"label": [f"{OWNER_LABEL}=rtmanager", f"{CLUSTER_LABEL}={cluster}"]}
    )
    return [
        checks.Container(c["Id"], c.get("Labels", {}).get(GAME_LABEL, ""), c.get("State", ""))
        for c in found
    ]


def dump_tables(dsn: str, run_dir: Path) -> None:
    """The stored state at the end, for diagnosis: one JSON-lines file per table."""
    tables = ("runtime_records", "operation_log", "lobby_job_watermarks", "runtime_events")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        for table in tables:
            cursor = conn.execute(
                sql.SQL("SELECT * FROM {}.{} ORDER BY 1").format(
                    sql.Identifier(SCHEMA), sql.Identifier(table)
                )
            )
            names = [d.name for d in cursor.description or []]
            with (run_dir / f"db_{table}.jsonl").open("w") as out:
                for row in cursor:
                    out.write(json.dumps(dict(zip(names, row, strict=True)), default=str) + "\n")


def dump_streams(client: redis.Redis, env: dict[str, str], run_dir: Path) -> None:
    for var in (
        "RTMANAGER_START_JOBS_STREAM",
        "RTMANAGER_STOP_JOBS_STREAM",
        "RTMANAGER_JOB_RESULTS_STREAM",
        "RTMANAGER_DEAD_LETTER_STREAM",
    ):
        name = var.removeprefix("RTMANAGER_").removesuffix("_STREAM").lower()
        with (run_dir / f"redis_{name}.jsonl").open("w") as out:
            for entry_id, fields in xrange(client, env[var]):
                out.write(json.dumps({"id": entry_id, **fields}) + "\n")


# -- the run -----------------------------------------------------------------------


@dataclass
class Names:
    """Everything the run owns, named after its id."""

    run_id: str
    run_dir: Path

    @property
    def cluster(self) -> str:
        return f"soak-{self.run_id}"

    @property
    def redis_prefix(self) -> str:
        return f"soak:{self.run_id}:"

    @property
    def state_root(self) -> Path:
        return self.run_dir / "games"

    @property
    def network(self) -> str:
        return f"galaxy-{self.cluster}"


def replica_environment(
    names: Names, postgres_dsn: str, redis_url: str, name: str
) -> dict[str, str]:
    env = server_env(
        pg_schema=SCHEMA,
        redis_prefix=names.redis_prefix,
        cluster=names.cluster,
        state_root=names.state_root,
        port=free_port(),
    )
    env.update(
        {
            "RTMANAGER_INSTANCE_ID": name,
            "RTMANAGER_POSTGRES_DSN": postgres_dsn,
            "RTMANAGER_POSTGRES_POOL_SIZE": "10",
            "RTMANAGER_REDIS_URL": redis_url,
            "RTMANAGER_RECONCILE_INTERVAL": "10s",
            "RTMANAGER_AUTH_TOKENS": f"game_master={GM_TOKEN},admin={ADMIN_TOKEN}",
            "RTMANAGER_CONTAINER_LABELS": f"{TEST_LABEL}={names.cluster}",
        }
    )
    return env


def wait_until(
    probe: Callable[[], bool], timeout: float, replicas: Replicas, every: float = 1.0
) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        replicas.tend()
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def docker_up() -> bool:
    try:
        client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@dataclass
class Outcome:
    report: checks.Report
    summary: dict[str, Any]


def soak(seconds: float, games_count: int, seed: int, run_dir: Path) -> Outcome:
    """Set up, load, inject faults, settle, check; torn down by the caller's stack."""
    rng = random.Random(seed)
    names = Names(run_id=uuid.uuid4().hex[:8], run_dir=run_dir)
    names.state_root.mkdir(parents=True)
    log = SoakLog(run_dir / "soak.log")
    games = [f"soak-g{n:02d}" for n in range(games_count)]
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.callback(log.close)
        log("set-up", run_dir=str(run_dir), cluster=names.cluster, seed=seed)
        stack.callback(shutil.rmtree, run_dir / "redis" / "appendonlydir", ignore_errors=True)
        redis_server = stack.enter_context(PrivateRedis.started(run_dir / "redis"))
        stack.callback(_copy_dockerd_log, _file_size(DOCKERD_LOG), run_dir)
        postgres = stack.enter_context(private_postgres())
        stack.callback(_copy_postgres_log, postgres, run_dir)
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        docker_client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=60)
        stack.callback(_remove_docker_objects, names, log)
        envs = {
            name: replica_environment(names, postgres.dsn, redis_server.url, name)
            for name in ("replica-a", "replica-b")
        }
        env = envs["replica-a"]
        migrated = run_cli(env, "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(f"rtmanager migrate failed: {migrated.stderr[-2000:]}")
        replica_list = [Replica(name, e, run_dir) for name, e in envs.items()]
        replicas = Replicas(replica_list, log)
        stack.callback(_stop_replicas, replica_list, log)
        for replica in replica_list:
            replica.launch()  # together: both race to create the engine network
        for replica in replica_list:
            if not replica.wait_serving():
                raise RuntimeError(f"{replica.name} did not come up; see {replica.log_path}")
        log("replicas serving", **{r.name: r.address for r in replica_list})

        watcher = Watcher(replicas, run_dir)
        watcher.start()
        stack.callback(watcher.stop)
        if not watcher.subscribed.wait(30):
            raise RuntimeError("the watcher did not subscribe within 30s")
        gm_log = JsonLines(run_dir / "gm_calls.jsonl")
        stack.callback(gm_log.close)
        producer = Producer(redis_server.url, env, games, run_dir, rng.randrange(1 << 30))
        stack.callback(producer.close)
        masters = [GameMaster(i, replicas, games, gm_log, rng.randrange(1 << 30)) for i in (1, 2)]
        producer.start()
        for master in masters:
            master.start()
        faults = Faults(replicas, redis_server, postgres, log, run_dir, rng)
        log("load and faults", seconds=seconds, games=games_count)
        try:
            fault_phase(faults, replicas, seconds, rng)
        finally:
            if faults.dockerd_down and not docker_up():
                subprocess.run(
                    ["bash", str(REPO / "scripts/dockerd.sh"), "start"], check=False, timeout=240
                )
            for master in masters:
                master.halt.set()
            producer.halt.set()
            for master in masters:
                master.join(timeout=RPC_DEADLINE * 2)
            producer.join(timeout=10)
        fault_seconds = time.monotonic() - began
        log("settling: faults and Game Master traffic stopped")
        settle_began = time.monotonic()

        reader = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=10)
        stack.callback(reader.close)

        def all_answered() -> bool:
            answered = {a.key for a in read_answers(reader, env)}
            return all(job.key in answered for job in read_jobs(reader, env))

        answered_all = wait_until(all_answered, ANSWER_WAIT, replicas)
        log(
            "produced jobs answered",
            all=answered_all,
            seconds=round(time.monotonic() - settle_began, 1),
        )

        finals = games[:]
        rng.shuffle(finals)
        final_kind = {g: checks.START if i % 2 == 0 else checks.STOP for i, g in enumerate(finals)}
        final_ids: list[tuple[str, str]] = []
        for game_id in games:
            entry_id = None
            for _attempt in range(5):
                entry_id = producer.publish(game_id, final_kind[game_id])
                if entry_id:
                    break
                time.sleep(1)
            if entry_id is None:
                raise RuntimeError(f"could not publish the final job of {game_id}")
            stream = (
                producer.start_stream
                if final_kind[game_id] == checks.START
                else producer.stop_stream
            )
            final_ids.append((stream, entry_id))

        def finals_answered() -> bool:
            answered = {a.key for a in read_answers(reader, env)}
            return all(key in answered for key in final_ids)

        finals_ok = wait_until(finals_answered, FINAL_ANSWER_WAIT, replicas, every=0.5)
        log("final jobs answered", all=finals_ok)

        stable_ok = _wait_stable(postgres.dsn, docker_client, names.cluster, replicas)
        log("records and containers stable", stable=stable_ok)

        newest = max(read_event_ids(postgres.dsn), default=0)
        caught_up = wait_until(
            lambda: (watcher.cursor or 0) >= newest, WATCH_CATCH_UP, replicas, every=0.5
        )
        log("watcher caught up", caught_up=caught_up, newest=newest, cursor=watcher.cursor)
        watcher.stop()
        settle_seconds = time.monotonic() - settle_began

        jobs = read_jobs(reader, env)
        answer_entries = read_answer_entries(reader, env)
        answers = [answer for answer, _id in answer_entries]
        records = read_records(postgres.dsn)
        containers = read_containers(docker_client, names.cluster)
        event_ids = read_event_ids(postgres.dsn)
        dump_tables(postgres.dsn, run_dir)
        dump_streams(reader, env, run_dir)
        calls = [call for master in masters for call in master.calls]
        report = checks.evaluate(
            jobs=jobs,
            answers=answers,
            records=records,
            containers=containers,
            calls=calls,
            watch_first_cursor=watcher.first_cursor,
            watch_received=watcher.received,
            stored_event_ids=event_ids,
            replica_crashes=len(replicas.crashes),
            replica_restart_failures=len(replicas.restart_failures),
            answer_ids=[entry_id for _answer, entry_id in answer_entries],
            kills_at=[f.started_at for f in faults.done if f.kind == "kill9_replica"],
        )
        summary = {
            "run_dir": str(run_dir),
            "cluster": names.cluster,
            "seed": seed,
            "seconds_asked": seconds,
            "fault_phase_seconds": round(fault_seconds, 1),
            "settle_seconds": round(settle_seconds, 1),
            "settle": {
                "all_answered_in_time": answered_all,
                "final_jobs_answered_in_time": finals_ok,
                "stable_in_time": stable_ok,
                "watcher_caught_up": caught_up,
            },
            "games": games_count,
            "faults": faults.counts(),
            "fault_log": [asdict(f) for f in faults.done],
            "producer": {
                "published": dict(producer.published),
                "failed": dict(producer.failed),
                "final_jobs": len(final_ids),
            },
            "gm_calls": dict(Counter(c.method for c in calls)),
            "watcher_reconnects": dict(watcher.reconnects),
            "replica_exits": {r.name: r.exits for r in replica_list},
            "replica_crashes": replicas.crashes,
            "replica_restart_failures": replicas.restart_failures,
        }
        log("checked", ok=report.ok, failed=",".join(report.failed))
        docker_client.close()
        return Outcome(report, summary)


def _wait_stable(
    dsn: str, docker_client: docker.DockerClient, cluster: str, replicas: Replicas
) -> bool:
    """Wait until records and containers have not changed for STABLE_FOR seconds."""
    deadline = time.monotonic() + STABLE_WAIT
    last: Any = None
    since = time.monotonic()
    while True:
        replicas.tend()
        now = (
            sorted(map(astuple_safe, read_records(dsn))),
            sorted(map(astuple_safe, read_containers(docker_client, cluster))),
        )
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= STABLE_FOR:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def astuple_safe(item: Any) -> tuple[Any, ...]:
    return tuple(str(v) for v in asdict(item).values())


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _copy_dockerd_log(offset: int, run_dir: Path) -> None:
    """What the shared dockerd logged during the run."""
    with contextlib.suppress(OSError), DOCKERD_LOG.open("rb") as source:
        source.seek(offset)
        (run_dir / "dockerd.log").write_bytes(source.read())


def _copy_postgres_log(postgres: PrivatePostgres, run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copy(postgres.log_file, run_dir / "postgres.log")


def _stop_replicas(replicas: list[Replica], log: SoakLog) -> None:
    """SIGTERM every replica at once, then wait for each (SIGKILL after 30 s)."""
    began = time.monotonic()
    for replica in replicas:
        replica.up = False
        replica.expected_exit = True
        if replica.alive and replica.process is not None:
            replica.process.send_signal(signal.SIGTERM)
    for replica in replicas:
        process = replica.process
        if process is not None and process.returncode is None:
            try:
                code = process.wait(timeout=max(1.0, 30 - (time.monotonic() - began)))
                how = "SIGTERM at teardown"
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                how = "SIGTERM at teardown, then SIGKILL after 30 s"
            replica._exited(code, how)
            log("replica stopped", replica=replica.name, code=code, how=how)
        replica.close()


def _remove_docker_objects(names: Names, log: SoakLog) -> None:
    if not docker_up():
        log("dockerd is down at teardown; starting it to clean up")
        subprocess.run(
            ["bash", str(REPO / "scripts/dockerd.sh"), "start"], check=False, timeout=240
        )
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=60)
    try:
        remove_labelled(
            client, [f"{TEST_LABEL}={names.cluster}", f"{CLUSTER_LABEL}={names.cluster}"]
        )
        for network in client.networks.list(names=[names.network]):
            with contextlib.suppress(docker.errors.APIError):
                network.remove()
    finally:
        client.close()
    shutil.rmtree(names.state_root, ignore_errors=True)


def print_outcome(outcome: Outcome) -> None:
    report, summary = outcome.report, outcome.summary
    print(f"# Chaos soak: {'PASS' if report.ok else 'FAIL'} ({summary['run_dir']})\n")
    print(checks.render_table(report))
    print("\n| fault | count |\n| --- | ---: |")
    for kind in FAULT_KINDS:
        print(f"| {kind} | {summary['faults'].get(kind, 0)} |")
    published = summary["producer"]["published"]
    print(
        f"\nLoad: {sum(published.values())} jobs published by the producer "
        f"({published}; {summary['producer']['final_jobs']} of them final jobs), "
        f"{sum(summary['producer']['failed'].values())} XADDs failed; "
        f"{sum(summary['gm_calls'].values())} Game Master calls {summary['gm_calls']}; "
        f"watcher reconnects {summary['watcher_reconnects']}."
    )
    print(
        f"Fault phase {summary['fault_phase_seconds']} s, settle {summary['settle_seconds']} s; "
        f"settle: {summary['settle']}."
    )
    print(f"Job outcomes: {report.details['job_outcomes']}")
    print(f"Seconds from job to answer: {report.details['answer_delay_s']}")
    for late in report.details["answered_after_60s"]:
        print(f"Answered after 60 s: {late}")
    print(f"Game Master answers: {report.details['gm_answers']}")
    for name in report.failed:
        offenders = report.details.get(name, report.details["watch"])
        print(f"\nFAILED {name}: {json.dumps(offenders, default=str)[:3000]}")
    print(
        "\n"
        + json.dumps(
            {"ok": report.ok, "failed": report.failed, "counts": report.counts, **summary},
            default=str,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="length of the fault phase (default 30)")
    length.add_argument("--seconds", type=float, help="length of the fault phase in seconds")
    parser.add_argument("--games", type=int, default=14)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where logs go (default: a new /tmp directory)"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 30.0) * 60
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    run_dir = args.run_dir or Path(
        tempfile.mkdtemp(prefix=f"rtmanager-soak-{time.strftime('%Y%m%d-%H%M%S')}-")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[soak] run directory: {run_dir}", file=sys.stderr, flush=True)

    def interrupted(_signum: int, _frame: Any) -> None:
        # Once: a second Ctrl-C must not cut the teardown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    # Explicitly: a soak started in the background of a script inherits an
    # ignored SIGINT.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        outcome = soak(seconds, args.games, seed, run_dir)
    except KeyboardInterrupt:
        print(f"[soak] interrupted; torn down; logs in {run_dir}", file=sys.stderr)
        return 130
    except Exception as error:
        print(f"[soak] set-up or run failed: {error!r}; logs in {run_dir}", file=sys.stderr)
        import traceback

        traceback.print_exc()
        return 2
    (run_dir / "report.json").write_text(
        json.dumps(
            {
                "ok": outcome.report.ok,
                "failed": outcome.report.failed,
                "counts": outcome.report.counts,
                "details": outcome.report.details,
                **outcome.summary,
            },
            indent=2,
            default=str,
        )
    )
    print_outcome(outcome)
    return 0 if outcome.report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
