"""Shared plumbing of the benchmarks: isolation, servers, statistics, result rows.

Every benchmark runs inside `isolation(name)`: its own PostgreSQL schema,
Redis key prefix, cluster (`RTMANAGER_CLUSTER`), `com.galaxy.test` label and
temporary state root. Leaving the block — normally, on an exception or on
Ctrl-C — drops the schema, deletes the Redis keys, removes every container
and network carrying the run's label or cluster, and deletes the state root.

Servers are started with the e2e tests' own helpers (`server_env`,
`run_cli`, `start_server`, `free_port`), so a benchmark server is configured
exactly as a test server is, apart from the overrides named here.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import docker.errors
import grpc
import psycopg
import redis
from psycopg import sql

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.adapters.instrumented import InstrumentedBackend
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.adapters.redis.client import create_redis
from rtmanager.adapters.redis.leases import RedisGameLeases
from rtmanager.app import lifecycle_settings
from rtmanager.config import REDIS_COMMAND_TIMEOUT, load_settings
from rtmanager.domain.ids import engine_endpoint
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.cleanup import CleanupService
from rtmanager.lifecycle.common import LifecycleDeps
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.lifecycle.start import StartService
from rtmanager.lifecycle.stop import StopService
from rtmanager.telemetry import Telemetry
from tests.conftest import DOCKER_HOST, POSTGRES_DSN, REDIS_URL, TEST_LABEL, remove_labelled
from tests.e2e.conftest import REPO, ServerProcess, free_port, run_cli, server_env, start_server

CLUSTER_LABEL = "com.galaxy.rtmanager.cluster"
ENGINE_IMAGE = "galaxy/engine-stub:1.0.0"
# The server's defaults (RTMANAGER_GRPC_MAX_WORKERS, RTMANAGER_GRPC_MAX_MESSAGE_BYTES),
# which the bare server copies.
GRPC_MAX_WORKERS = 32
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The test environment sets a pool of 4; benchmarks use the server default.
DEFAULT_POOL_SIZE = "10"


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the result table."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- isolation ---------------------------------------------------------------


@dataclass(frozen=True)
class Isolation:
    """Names owned by one benchmark run."""

    run_id: str
    schema: str
    redis_prefix: str
    cluster: str
    label: str
    """The value of `com.galaxy.test` on everything this run creates in Docker."""
    workdir: Path

    @property
    def state_root(self) -> Path:
        """The `RTMANAGER_STATE_ROOT` of this run's server."""
        return self.workdir / "games"

    @property
    def labels(self) -> dict[str, str]:
        """Labels for Docker objects the benchmark itself creates."""
        return {TEST_LABEL: self.label}


@contextlib.contextmanager
def isolation(name: str) -> Iterator[Isolation]:
    """A schema, prefix, cluster, label and state root of one run; all removed afterwards."""
    run_id = uuid.uuid4().hex[:8]
    iso = Isolation(
        run_id=run_id,
        schema=f"bench_{name}_{run_id}",
        redis_prefix=f"bench:{run_id}:",
        cluster=f"bench-{run_id}",
        # `server_env` labels engine containers `com.galaxy.test=<cluster minus "test-">`.
        label=f"bench-{run_id}",
        workdir=Path(tempfile.mkdtemp(prefix=f"rtmanager-bench-{name}-")),
    )
    iso.state_root.mkdir()
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(iso.schema)))
    try:
        yield iso
    finally:
        _cleanup(iso)


def _cleanup(iso: Isolation) -> None:
    """Remove everything of the run; each step runs even when another fails."""
    problems: list[str] = []
    try:
        _remove_docker_objects(iso)
    except Exception as error:
        problems.append(f"docker: {error}")
    try:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(iso.schema))
            )
    except Exception as error:
        problems.append(f"postgres: {error}")
    try:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{iso.redis_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
    except Exception as error:
        problems.append(f"redis: {error}")
    shutil.rmtree(iso.workdir, ignore_errors=True)
    for problem in problems:
        log(f"cleanup of run {iso.run_id} incomplete: {problem}")


def _remove_docker_objects(iso: Isolation) -> None:
    client = docker.DockerClient(base_url=DOCKER_HOST, timeout=60)
    try:
        remove_labelled(client, [f"{TEST_LABEL}={iso.label}", f"{CLUSTER_LABEL}={iso.cluster}"])
    finally:
        client.close()


# -- the rtmanager server ----------------------------------------------------


def seed_record(iso: Isolation, index: int, now: datetime) -> RuntimeRecord:
    """A stopped runtime record, shaped as the server writes them.

    Stopped, not running: the reconciler leaves a stopped record without a
    container alone, while it would dispose a running one.
    """
    game_id = f"seed-{index:03d}"
    started = now - timedelta(minutes=10)
    return RuntimeRecord(
        game_id=game_id,
        status=RuntimeStatus.STOPPED,
        engine_endpoint=engine_endpoint(game_id, 8080),
        state_path=str(iso.state_root / game_id),
        docker_network=f"galaxy-{iso.cluster}",
        last_op_at=now,
        created_at=started,
        current_container_id=uuid.uuid4().hex + uuid.uuid4().hex,
        current_image_ref=ENGINE_IMAGE,
        started_at=started,
        stopped_at=now,
    )


def seed_records(iso: Isolation, count: int) -> list[str]:
    """Write `count` records through the PostgreSQL adapters; return their game ids."""
    now = datetime.now(UTC)
    records = [seed_record(iso, index, now) for index in range(count)]
    pool = create_pool(POSTGRES_DSN, iso.schema, max_size=1, timeout=10)
    try:
        units = PostgresUnitOfWorkFactory(pool, default_timeout=timedelta(seconds=30))
        with units() as uow:
            for record in records:
                uow.records.upsert(record)
            uow.commit()
    finally:
        pool.close()
    return [record.game_id for record in records]


def migrated_server_env(iso: Isolation, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment of a server of this run (`server_env`, the default pool
    size, `extra_env`), with the run's schema migrated by `rtmanager migrate`."""
    env = server_env(
        pg_schema=iso.schema,
        redis_prefix=iso.redis_prefix,
        cluster=iso.cluster,
        state_root=iso.state_root,
        port=free_port(),
    )
    env["RTMANAGER_POSTGRES_POOL_SIZE"] = DEFAULT_POOL_SIZE
    env.update(extra_env or {})
    migrated = run_cli(env, "migrate")
    if migrated.returncode != 0:
        raise RuntimeError(f"rtmanager migrate failed: {migrated.stderr[-2000:]}")
    return env


@contextlib.contextmanager
def rtmanager_server(
    iso: Isolation, *, seed: int = 0, extra_env: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """`rtmanager serve` on a migrated (and optionally seeded) schema; SIGTERM afterwards.

    Auth and metrics are off (no `RTMANAGER_AUTH_TOKENS`, empty
    `RTMANAGER_METRICS_ADDR`, both from `server_env`); the pool has the
    default size of 10 instead of the tests' 4.
    """
    env = migrated_server_env(iso, extra_env)
    if seed:
        seed_records(iso, seed)
    handle = start_server(env, iso.workdir / "rtmanager.log")
    try:
        yield handle
    finally:
        code = handle.stop()
        if code not in (0, -signal.SIGTERM):
            log(f"rtmanager exited with {code}; log tail:\n{handle.log()[-3000:]}")


# -- the lifecycle services in this process ---------------------------------


class DockerRequests:
    """Counts the HTTP requests a docker-py client sends to the daemon, by kind.

    A kind is the method and the path with the API version, container ids
    and names left out: `GET /containers/json` (a listing), `GET
    /containers/{id}/json` (an inspect), `POST /containers/{id}/stop`, ...
    Attached as a response hook, so it counts each request that got an
    answer, whichever layer sent it.
    """

    _VERSION = re.compile(r"^/v[0-9.]+")
    # An image name may hold slashes; a container or network id or name may not.
    _IMAGE = re.compile(r"^/images/.+/json$")
    _NAMED = re.compile(r"^/(containers|networks)/(?!json$|create$|prune$)[^/]+")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def attach(self, api: docker.APIClient) -> None:
        """Count every request of `api` from now on."""
        api.hooks["response"].append(self._seen)

    def _seen(self, response: Any, *args: object, **kwargs: object) -> None:
        request = response.request
        path = self._VERSION.sub("", request.path_url.split("?")[0])
        path = self._IMAGE.sub("/images/{name}/json", path)
        path = self._NAMED.sub(lambda m: f"/{m.group(1)}/{{id}}", path)
        with self._lock:
            self._counts[f"{request.method} {path}"] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last `take` (or `attach`), and start again from zero."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


@dataclass
class InProcess:
    """The lifecycle services as `rtmanager.app` composes them, in this process.

    `requests` counts the HTTP requests the Docker adapter sends.
    """

    start: StartService
    stop: StopService
    cleanup: CleanupService
    reconciler: Reconciler
    requests: DockerRequests


@contextlib.contextmanager
def in_process_lifecycles(
    iso: Isolation, *, extra_env: Mapping[str, str] | None = None
) -> Iterator[InProcess]:
    """The run's schema migrated, and the services of a server of this run built on it.

    The settings are those `rtmanager_server` gives its server (from
    `server_env`, the default pool size, `extra_env`); the adapters, the
    lease lock and the recorder are wired as `rtmanager.app.Application`
    wires them. No server, no workers: the caller drives the use cases.
    """
    env = migrated_server_env(iso, extra_env)
    settings = load_settings(env)
    telemetry = Telemetry()
    pool = create_pool(
        settings.postgres_dsn,
        settings.postgres_schema,
        max_size=settings.postgres_pool_size,
        timeout=timedelta(seconds=5),
    )
    redis_client = create_redis(settings.redis_url, timeout=REDIS_COMMAND_TIMEOUT)
    adapter = DockerEngineAdapter(
        base_url=settings.docker_host, cluster=settings.cluster, timeout=settings.docker_timeout
    )
    try:
        requests = DockerRequests()
        adapter.ping()
        # Built here (asking the daemon's API version), so the counter sees
        # every later request; `ping` has a client of its own.
        requests.attach(adapter._api())
        lock = GameLock(
            RedisGameLeases(redis_client, prefix=settings.redis_prefix), settings.game_lease_ttl
        )
        deps = LifecycleDeps(
            recorder=OperationRecorder(
                PostgresUnitOfWorkFactory(pool), telemetry, lease_check=lock.check
            ),
            lock=lock,
            engine=InstrumentedBackend(adapter, telemetry),
            settings=lifecycle_settings(settings),
        )
        start, stop = StartService(deps), StopService(deps)
        yield InProcess(
            start=start,
            stop=stop,
            cleanup=CleanupService(deps, stop=stop),
            reconciler=Reconciler(deps, telemetry=telemetry),
            requests=requests,
        )
    finally:
        adapter.close()
        redis_client.close()
        pool.close()


@dataclass
class TimedRound:
    """One round of one side of a throughput benchmark: its wall time and
    the latency of each of its calls (or jobs)."""

    seconds: float
    latencies: list[float] = field(default_factory=list)


# -- the bare server ---------------------------------------------------------


@dataclass
class BareServer:
    """The floor: `bench.bare_server` in its own process."""

    process: subprocess.Popen[bytes]
    address: str


@contextlib.contextmanager
def bare_process(
    iso: Isolation, module: str, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run `python -m <module> --port <free port> <args>`, a floor server of the
    benchmarks; yield it with its address once its channel is ready; SIGTERM
    (then SIGKILL) afterwards."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = iso.workdir / f"{module.rpartition('.')[2]}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port), *args],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_channel_ready(address, process, log_path)
        yield process, address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def bare_server(iso: Isolation, records_file: Path) -> Iterator[BareServer]:
    """Start `python -m bench.bare_server` answering with the records in `records_file`."""
    with bare_process(iso, "bench.bare_server", "--records", str(records_file)) as started:
        yield BareServer(*started)


def _wait_channel_ready(
    address: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"bare server exited with {process.returncode}:\n"
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
    raise TimeoutError(f"bare server at {address} not ready within {timeout}s")


# -- measurements ------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process, from /proc/<pid>/status."""
    wanted = {"VmRSS": "rss_kb", "VmHWM": "hwm_kb", "Threads": "threads"}
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            values[wanted[key]] = int(rest.split()[0])
    return values


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Count, mean and p50/p90/p99/max of latencies, in milliseconds."""
    ordered = sorted(seconds)
    count = len(ordered)
    return {
        "n": count,
        "mean_ms": (sum(ordered) / count * 1000) if count else math.nan,
        "p50_ms": percentile(ordered, 50) * 1000,
        "p90_ms": percentile(ordered, 90) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] * 1000) if count else math.nan,
    }


@dataclass(frozen=True)
class Row:
    """One line of the result table: rtmanager against its floor."""

    benchmark: str
    case: str
    metric: str
    unit: str
    rtmanager: float
    floor: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """rtmanager / floor (NaN when the floor is zero or missing)."""
        if not self.floor or math.isnan(self.floor):
            return math.nan
        return self.rtmanager / self.floor

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the row, ratio included."""
        return {
            "benchmark": self.benchmark,
            "case": self.case,
            "metric": self.metric,
            "unit": self.unit,
            "rtmanager": self.rtmanager,
            "floor": self.floor,
            "ratio": self.ratio,
            **({"notes": self.notes} if self.notes else {}),
        }


def cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))
