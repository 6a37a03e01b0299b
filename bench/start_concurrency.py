"""Concurrent starts: 8 `StartRuntime` clients at once against 8 threads of raw docker-py.

rtmanager: 8 threads, each with its own `RuntimeManagerClient`, start one
fresh game each at the same moment (a barrier), through the real
`rtmanager serve` process (`RTMANAGER_START_SETTLE=0s`, as in
`bench.lifecycle`). A round ends when the last start has returned RUNNING.

Floor: 8 threads sharing one docker-py client do the same Docker work:
create with rtmanager's options (`bench.lifecycle.create_engine_container`)
on the same engine network, with the same image and labels of the same
shape (owner set to `bench-docker-py`, so the server never adopts them),
start, inspect until running.

Between rounds every container is stopped and removed (rtmanager: stop +
cleanup RPCs; floor: stop + remove), unmeasured. Rounds alternate which
side goes first; one unmeasured warm-up round per side comes first (the
rtmanager one creates the engine network the floor then uses). A round
count and a time budget bound the run; every call has a timeout.
Throughput = starts / wall time of the round, summed over rounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import docker

from bench.common import (
    CLUSTER_LABEL,
    ENGINE_IMAGE,
    Isolation,
    Row,
    TimedRound,
    isolation,
    latency_summary,
    log,
    rtmanager_server,
)
from bench.lifecycle import STOP_TIMEOUT_SECONDS, create_engine_container, wait_running
from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import DOCKER_HOST

NAME = "start_concurrency"
CALL_TIMEOUT = 60.0
SERVER_ENV = {"RTMANAGER_START_SETTLE": "0s"}


@dataclass(frozen=True)
class StartConcurrencyParams:
    """Concurrency, rounds and the time budget of the measured rounds."""

    concurrency: int = 8
    rounds: int = 6
    warmup_rounds: int = 1
    max_seconds: float = 240.0


DEFAULT = StartConcurrencyParams()
QUICK = StartConcurrencyParams(rounds=2, max_seconds=90.0)


def _concurrently(pool: ThreadPoolExecutor, work: list[Callable[[], float]]) -> TimedRound:
    """Run the callables at once (released by one barrier); wall time and latencies."""
    barrier = threading.Barrier(len(work) + 1)

    def timed(job: Callable[[], float]) -> float:
        barrier.wait(timeout=CALL_TIMEOUT)
        return job()

    futures = [pool.submit(timed, job) for job in work]
    barrier.wait(timeout=CALL_TIMEOUT)
    began = time.perf_counter()
    latencies = [future.result(timeout=CALL_TIMEOUT * 2) for future in futures]
    return TimedRound(time.perf_counter() - began, latencies)


class RtmanagerStarts:
    """Starts through the server, one client per thread."""

    def __init__(self, clients: list[RuntimeManagerClient], run_id: str) -> None:
        self._clients = clients
        self._run_id = run_id
        self._games: list[str] = []

    def start_round(self, pool: ThreadPoolExecutor, index: int) -> TimedRound:
        """Start one fresh game per client, all at once."""
        self._games = [f"sc-{self._run_id}-{index:02d}-{k}" for k in range(len(self._clients))]

        def start(client: RuntimeManagerClient, game_id: str) -> Callable[[], float]:
            def call() -> float:
                t0 = time.perf_counter()
                record = client.start_runtime(game_id, ENGINE_IMAGE, timeout=CALL_TIMEOUT)
                if record.status is not RuntimeStatus.RUNNING:
                    raise RuntimeError(f"{game_id} is {record.status} after its start")
                return time.perf_counter() - t0

            return call

        return _concurrently(
            pool,
            [start(client, game) for client, game in zip(self._clients, self._games, strict=True)],
        )

    def tear_down(self, pool: ThreadPoolExecutor) -> None:
        """Stop and clean up the round's games (unmeasured)."""

        def remove(client: RuntimeManagerClient, game_id: str) -> None:
            client.stop_runtime(game_id, timeout=CALL_TIMEOUT)
            client.cleanup_runtime(game_id, timeout=CALL_TIMEOUT)

        for future in [
            pool.submit(remove, client, game)
            for client, game in zip(self._clients, self._games, strict=True)
        ]:
            future.result(timeout=CALL_TIMEOUT * 2)


class DockerPyStarts:
    """The same create + start + running with docker-py, one shared client."""

    def __init__(self, client: docker.DockerClient, iso: Isolation, concurrency: int) -> None:
        self._client = client
        self._iso = iso
        self._concurrency = concurrency
        # rtmanager's engine network (RTMANAGER_ENGINE_NETWORK of `server_env`).
        self._network = f"galaxy-{iso.cluster}"
        self._state_root = iso.state_root / "raw"
        self._state_root.mkdir(parents=True, exist_ok=True)
        self._containers: list[str] = []

    def start_round(self, pool: ThreadPoolExecutor, index: int) -> TimedRound:
        """Create and start one container per thread, all at once."""
        names = [f"bench-raw-{self._iso.run_id}-{index:02d}-{k}" for k in range(self._concurrency)]
        ids: list[str] = []
        lock = threading.Lock()

        def start(name: str) -> Callable[[], float]:
            def call() -> float:
                t0 = time.perf_counter()
                state = self._state_root / name
                state.mkdir(exist_ok=True)
                container = create_engine_container(
                    self._client,
                    name=name,
                    state=state,
                    network=self._network,
                    labels={
                        **self._iso.labels,
                        "com.galaxy.owner": "bench-docker-py",
                        CLUSTER_LABEL: self._iso.cluster,
                        "com.galaxy.game_id": name,
                        "com.galaxy.image_ref": ENGINE_IMAGE,
                    },
                )
                container_id = str(container.id)
                with lock:
                    ids.append(container_id)
                self._client.api.start(container_id)
                wait_running(self._client, container_id)
                return time.perf_counter() - t0

            return call

        try:
            return _concurrently(pool, [start(name) for name in names])
        finally:
            self._containers = ids

    def tear_down(self, pool: ThreadPoolExecutor) -> None:
        """Stop and remove the round's containers (unmeasured)."""

        def remove(container_id: str) -> None:
            self._client.api.stop(container_id, timeout=STOP_TIMEOUT_SECONDS)
            self._client.api.remove_container(container_id)

        for future in [pool.submit(remove, cid) for cid in self._containers]:
            future.result(timeout=CALL_TIMEOUT * 2)
        self._containers = []


def run(*, quick: bool = False) -> dict[str, Any]:
    """Alternate concurrent-start rounds of both sides; return rows and raw numbers."""
    params = QUICK if quick else DEFAULT
    samples: dict[str, list[TimedRound]] = {"rtmanager": [], "docker-py": []}
    with isolation(NAME) as iso:
        docker_client = docker.DockerClient(
            base_url=DOCKER_HOST, timeout=int(CALL_TIMEOUT), max_pool_size=params.concurrency
        )
        clients: list[RuntimeManagerClient] = []
        try:
            with (
                rtmanager_server(iso, extra_env=SERVER_ENV) as server,
                ThreadPoolExecutor(params.concurrency, thread_name_prefix="bench") as pool,
            ):
                clients = [
                    RuntimeManagerClient(server.address, timeout=CALL_TIMEOUT)
                    for _ in range(params.concurrency)
                ]
                sides: dict[str, RtmanagerStarts | DockerPyStarts] = {
                    "rtmanager": RtmanagerStarts(clients, iso.run_id),
                    "docker-py": DockerPyStarts(docker_client, iso, params.concurrency),
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
                    for side in order if index % 2 == 0 else list(reversed(order)):
                        try:
                            result = sides[side].start_round(pool, index)
                        finally:
                            sides[side].tear_down(pool)
                        if measured:
                            samples[side].append(result)
                    if measured:
                        log(
                            f"{NAME}: round {index - params.warmup_rounds + 1}/{params.rounds}: "
                            f"rtmanager {samples['rtmanager'][-1].seconds * 1000:.0f} ms, "
                            f"docker-py {samples['docker-py'][-1].seconds * 1000:.0f} ms "
                            f"for {params.concurrency} starts"
                        )
        finally:
            for client in clients:
                client.close()
            docker_client.close()

    def throughput(rounds: list[TimedRound]) -> float:
        seconds = sum(r.seconds for r in rounds)
        return sum(len(r.latencies) for r in rounds) / seconds if seconds else float("nan")

    latency = {
        side: latency_summary([x for r in rounds for x in r.latencies])
        for side, rounds in samples.items()
    }
    case = f"{params.concurrency} concurrent starts"
    rows = [
        Row(
            NAME,
            case,
            "throughput",
            "starts/s",
            throughput(samples["rtmanager"]),
            throughput(samples["docker-py"]),
            notes={"rounds": len(samples["rtmanager"])},
        ),
    ]
    for metric in ("p50_ms", "mean_ms", "max_ms"):
        rows.append(
            Row(
                NAME,
                case,
                f"start latency {metric[:-3]}",
                "ms",
                latency["rtmanager"][metric],
                latency["docker-py"][metric],
            )
        )
    return {
        "params": {**asdict(params), "image": ENGINE_IMAGE, "server_env": SERVER_ENV},
        "rows": [row.to_json() for row in rows],
        "raw": {
            "latency": latency,
            "rounds": {side: [asdict(r) for r in rounds] for side, rounds in samples.items()},
        },
    }
