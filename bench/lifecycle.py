"""Lifecycle path: one start + stop + cleanup cycle, rtmanager against docker-py.

rtmanager: `RuntimeManagerClient.start_runtime`, `stop_runtime`, then
`cleanup_runtime` of a fresh game id, through the real `rtmanager serve`
process. The server runs with `RTMANAGER_START_SETTLE=0s`: the stub engine
has no health check, so by default a start waits a full second to see the
engine stay up, and that fixed wait would swamp everything else. With 0s a
start returns at the first inspect that shows the container running.

Floor: the same Docker work done directly with docker-py — create with the
options rtmanager uses (init, cap_drop ALL, no-new-privileges, memory, CPU
and pids limits, a bind-mounted state directory, an internal bridge network
with the container's name as alias, restart policy "no"), start, inspect
until running, stop (SIGTERM, 10 s grace — the stub exits at once), remove.

Phases map one to one: start ~ create+start+running, stop ~ stop,
cleanup ~ remove. Cycles alternate which side goes first (A B, B A, ...),
one unmeasured warm-up cycle each comes first (it also creates the network).

Docker calls: after the timed cycles (and the server) are done, one more
cycle per side counts the HTTP requests each phase sends to the daemon. The
rtmanager side runs the same use cases in this process, composed as the
server composes them (`bench.common.in_process_lifecycles`), because a
count needs the adapter's client; the floor counts its own client's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import docker
import docker.errors
from docker.types import LogConfig, Mount

from bench.common import (
    CLUSTER_LABEL,
    ENGINE_IMAGE,
    DockerRequests,
    InProcess,
    Isolation,
    Row,
    in_process_lifecycles,
    isolation,
    latency_summary,
    log,
    rtmanager_server,
)
from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.operation import OpSource
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.cleanup import CleanupRequest
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from tests.conftest import DOCKER_HOST

if TYPE_CHECKING:
    from docker.api.container import _RestartPolicy

NAME = "lifecycle"
PHASES = ("start", "stop", "cleanup", "total")
FLOOR_PHASES = {
    "start": "create+start+running",
    "stop": "stop",
    "cleanup": "remove",
    "total": "total",
}
CALL_TIMEOUT = 60.0
STOP_TIMEOUT_SECONDS = 10  # RTMANAGER_STOP_TIMEOUT default
# RTMANAGER_ENGINE_MEMORY / _CPUS / _PIDS / _USER / _LOG_MAX_SIZE / _LOG_MAX_FILES defaults.
ENGINE_MEMORY = 512 * 1024 * 1024
ENGINE_NANO_CPUS = 1_000_000_000
ENGINE_PIDS = 256
ENGINE_UID = ENGINE_GID = 65534
ENGINE_LOG_MAX_BYTES = 10 * 1024 * 1024
ENGINE_LOG_MAX_FILES = 3
ENGINE_PORT = 8080
STATE_MOUNT = "/var/lib/galaxy-game"


@dataclass(frozen=True)
class LifecycleParams:
    """How many measured cycles each side runs."""

    cycles: int
    warmup_cycles: int = 1


DEFAULT = LifecycleParams(cycles=30)
QUICK = LifecycleParams(cycles=3)

Phases = dict[str, float]
# Docker requests of each phase, by kind (see `DockerRequests`).
PhaseRequests = dict[str, dict[str, int]]
SERVER_ENV = {"RTMANAGER_START_SETTLE": "0s"}


class RtmanagerCycle:
    """start + stop + cleanup of a fresh game through the server."""

    def __init__(
        self,
        client: RuntimeManagerClient,
        run_id: str,
        *,
        prefix: str = "lc",
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._prefix = prefix  # game ids `{prefix}-{run_id}-{index}`
        self._timeout = call_timeout

    def __call__(self, index: int) -> Phases:
        game_id = f"{self._prefix}-{self._run_id}-{index:03d}"
        clock = time.perf_counter
        t0 = clock()
        started = self._client.start_runtime(game_id, ENGINE_IMAGE, timeout=self._timeout)
        t1 = clock()
        stopped = self._client.stop_runtime(game_id, timeout=self._timeout)
        t2 = clock()
        removed = self._client.cleanup_runtime(game_id, timeout=self._timeout)
        t3 = clock()
        statuses = (started.status, stopped.status, removed.status)
        if statuses != (RuntimeStatus.RUNNING, RuntimeStatus.STOPPED, RuntimeStatus.REMOVED):
            raise RuntimeError(f"unexpected statuses for {game_id}: {statuses}")
        return {"start": t1 - t0, "stop": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}


class InProcessCycle:
    """start + stop + cleanup through the use cases in this process, counting Docker requests."""

    def __init__(self, lifecycles: InProcess, run_id: str) -> None:
        self._lifecycles = lifecycles
        self._run_id = run_id

    def __call__(self, index: int) -> PhaseRequests:
        game_id = f"lc-{self._run_id}-{index:03d}"
        source = OpSource.ADMIN_REST
        lc = self._lifecycles
        steps: dict[str, Callable[[], OperationResult]] = {
            "start": lambda: lc.start.handle(StartRequest(game_id, ENGINE_IMAGE, source)),
            "stop": lambda: lc.stop.handle(StopRequest(game_id, source)),
            "cleanup": lambda: lc.cleanup.handle(CleanupRequest(game_id, source)),
        }
        counts: PhaseRequests = {}
        lc.requests.take()
        for phase, step in steps.items():
            result = step()
            if not result.ok:
                raise RuntimeError(f"in-process {phase} of {game_id} failed: {result.failure}")
            counts[phase] = lc.requests.take()
        return counts


class DockerPyCycle:
    """The same container work with docker-py directly."""

    def __init__(
        self,
        client: docker.DockerClient,
        iso: Isolation,
        requests: DockerRequests | None = None,
    ) -> None:
        self._client = client
        self._iso = iso
        # When given, it counts `client`'s requests; each cycle's are in `last_requests`.
        self._requests = requests
        self.last_requests: PhaseRequests = {}
        self.network = f"bench-raw-{iso.run_id}"
        self._state_root = iso.state_root / "raw"
        self._state_root.mkdir(parents=True, exist_ok=True)

    def ensure_network(self) -> None:
        """The internal bridge network of the raw containers (created once)."""
        if not self._client.api.networks(names=[self.network]):
            self._client.api.create_network(
                self.network,
                driver="bridge",
                internal=True,
                labels={**self._iso.labels, CLUSTER_LABEL: self._iso.cluster},
                check_duplicate=True,
            )

    def __call__(self, index: int) -> Phases:
        name = f"bench-raw-{self._iso.run_id}-{index:03d}"
        state = self._state_root / name
        api = self._client.api
        clock = time.perf_counter
        counted = self._requests.take if self._requests is not None else dict
        counted()
        t0 = clock()
        state.mkdir(exist_ok=True)
        container = self._create(name, state)
        container_id = str(container.id)
        api.start(container_id)
        self._wait_running(container_id)
        t1 = clock()
        started = counted()
        api.stop(container_id, timeout=STOP_TIMEOUT_SECONDS)
        t2 = clock()
        stopped = counted()
        api.remove_container(container_id)
        t3 = clock()
        self.last_requests = {"start": started, "stop": stopped, "cleanup": counted()}
        return {"start": t1 - t0, "stop": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}

    def _create(self, name: str, state: Path) -> Any:
        return create_engine_container(
            self._client,
            name=name,
            state=state,
            network=self.network,
            labels={
                **self._iso.labels,
                "com.galaxy.bench": "docker-py",
                "com.galaxy.game_id": name,
                "com.galaxy.image_ref": ENGINE_IMAGE,
            },
        )

    def _wait_running(self, container_id: str) -> None:
        wait_running(self._client, container_id)


def create_engine_container(
    client: docker.DockerClient, *, name: str, state: Path, network: str, labels: dict[str, str]
) -> Any:
    """`containers.create` with the options rtmanager gives an engine container.

    Like rtmanager's start, it first gives the state directory to the engine's user.
    """
    os.chown(state, ENGINE_UID, ENGINE_GID)
    endpoint = client.api.create_endpoint_config(aliases=[name])
    return client.containers.create(
        ENGINE_IMAGE,
        name=name,
        hostname=name,
        labels=labels,
        environment={
            "GALAXY_GAME_ID": name,
            "GALAXY_STATE_DIR": STATE_MOUNT,
            "ENGINE_PORT": str(ENGINE_PORT),
        },
        init=True,
        restart_policy=cast("_RestartPolicy", {"Name": "no"}),
        user=f"{ENGINE_UID}:{ENGINE_GID}",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges=true"],
        privileged=False,
        pids_limit=ENGINE_PIDS,
        mem_limit=ENGINE_MEMORY,
        memswap_limit=ENGINE_MEMORY,
        nano_cpus=ENGINE_NANO_CPUS,
        log_config=LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": str(ENGINE_LOG_MAX_BYTES), "max-file": str(ENGINE_LOG_MAX_FILES)},
        ),
        mounts=[Mount(target=STATE_MOUNT, source=str(state), type="bind", read_only=False)],
        network=network,
        networking_config={network: endpoint},
    )


def wait_running(client: docker.DockerClient, container_id: str, timeout: float = 30.0) -> None:
    """Inspect every 10 ms until the container runs (as rtmanager's start waits)."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.api.inspect_container(container_id)["State"]
        if state.get("Running"):
            return
        if state.get("Status") not in ("created", "restarting"):
            raise RuntimeError(f"container {container_id} did not start: {state}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"container {container_id} not running after {timeout}s")
        time.sleep(0.01)


def run(*, quick: bool = False) -> dict[str, Any]:
    """Alternate rtmanager and docker-py cycles; return rows and raw numbers."""
    params = QUICK if quick else DEFAULT
    samples: dict[str, list[Phases]] = {"rtmanager": [], "docker-py": []}
    calls: dict[str, PhaseRequests] = {}
    with isolation(NAME) as iso:
        docker_client = docker.DockerClient(base_url=DOCKER_HOST, timeout=60)
        try:
            with (
                rtmanager_server(iso, extra_env=SERVER_ENV) as server,
                RuntimeManagerClient(server.address, timeout=CALL_TIMEOUT) as client,
            ):
                floor = DockerPyCycle(docker_client, iso)
                floor.ensure_network()
                sides: dict[str, Callable[[int], Phases]] = {
                    "rtmanager": RtmanagerCycle(client, iso.run_id),
                    "docker-py": floor,
                }
                order = list(sides)
                total = params.warmup_cycles + params.cycles
                for index in range(total):
                    measured = index >= params.warmup_cycles
                    for side in order if index % 2 == 0 else list(reversed(order)):
                        phases = sides[side](index)
                        if measured:
                            samples[side].append(phases)
                    if measured:
                        log(
                            f"{NAME}: cycle {index - params.warmup_cycles + 1}/{params.cycles}: "
                            f"rtmanager {samples['rtmanager'][-1]['total'] * 1000:.0f} ms, "
                            f"docker-py {samples['docker-py'][-1]['total'] * 1000:.0f} ms"
                        )
            calls = count_docker_calls(iso, docker_client, first_index=total)
        finally:
            docker_client.close()

    summaries = {
        side: {phase: latency_summary([s[phase] for s in runs]) for phase in PHASES}
        for side, runs in samples.items()
    }
    rows: list[Row] = []
    for phase in PHASES:
        ours, floor_summary = summaries["rtmanager"][phase], summaries["docker-py"][phase]
        case = f"{phase} (floor: {FLOOR_PHASES[phase]})"
        for metric in ("p50_ms", "mean_ms", "max_ms"):
            rows.append(
                Row(NAME, case, f"latency {metric[:-3]}", "ms", ours[metric], floor_summary[metric])
            )
    for phase in PHASES[:-1]:
        ours_calls, floor_calls = calls["rtmanager"][phase], calls["docker-py"][phase]
        rows.append(
            Row(
                NAME,
                f"{phase} (floor: {FLOOR_PHASES[phase]})",
                "docker calls",
                "requests",
                sum(ours_calls.values()),
                sum(floor_calls.values()),
                notes={"rtmanager": ours_calls, "floor": floor_calls},
            )
        )
    return {
        "params": {**asdict(params), "image": ENGINE_IMAGE, "server_env": SERVER_ENV},
        "rows": [row.to_json() for row in rows],
        "raw": {"summary": summaries, "cycles_seconds": samples, "docker_requests": calls},
    }


def count_docker_calls(
    iso: Isolation, docker_client: docker.DockerClient, *, first_index: int
) -> dict[str, PhaseRequests]:
    """Docker requests per phase of one more cycle per side, after a warm-up one.

    The warm-up lets the in-process adapter settle on the engine network the
    server created (a network it did not create is used once it has been
    seen alone for a while, see `DockerEngineAdapter.ensure_network`).
    """
    with in_process_lifecycles(iso, extra_env=SERVER_ENV) as lifecycles:
        ours = InProcessCycle(lifecycles, iso.run_id)
        ours(first_index)
        rtmanager_calls = ours(first_index + 1)
    requests = DockerRequests()
    requests.attach(docker_client.api)
    floor = DockerPyCycle(docker_client, iso, requests)
    floor(first_index + 1)
    log(f"{NAME}: docker calls per phase: rtmanager {rtmanager_calls}")
    log(f"{NAME}: docker calls per phase: docker-py {floor.last_requests}")
    return {"rtmanager": rtmanager_calls, "docker-py": floor.last_requests}
