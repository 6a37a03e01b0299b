"""The swarm backend (SPEC §10) on a three-node harness swarm: lifecycle cost and placement.

Both parts run on one `SwarmCluster(nodes=3)` of `tests/support/swarm.py`
(private dockerd processes in network namespaces; nothing leaves them).

(a) Lifecycle: one start + stop + cleanup cycle of a fresh game through the
real `rtmanager serve` (`RTMANAGER_BACKEND=swarm`, manager's socket),
against the same swarm work done directly with docker-py on the manager:
create the service (1 replica, the options the backend gives an engine
service: restart condition none, the labels on service and container, a
named state volume, init, cap_drop ALL, CPU/memory limits and reservations,
pids limit, json-file log rotation, the overlay network with the game's
alias) and poll its tasks until one runs; scale to 0 and poll until no task
is live; remove the service. The floor polls every 50 ms; the backend polls
every 200 ms (`_POLL_SECONDS`), which is part of the difference.

Phases map one to one: start ~ create+running, stop ~ scale 0+ended,
cleanup ~ remove. Cycles alternate which side goes first; one unmeasured
warm-up cycle per side comes first (it also creates the networks). Both
sides run with `RTMANAGER_START_SETTLE=0s` semantics (the stub has no
health check) and engines of 0.05 CPU / 32 MiB, so the reservations let 24
engines fit on three nodes of a two-core machine.

(b) Placement: 24 games started through the server, one after another;
the records' `node_id` give the games per node. Target (issue 10): spread
over the three nodes, none holding more than 10. The row's floor is the
even share (24 / 3 = 8), so its ratio is the busiest node against it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import docker
import docker.errors
from docker.types import (
    ContainerSpec,
    DriverConfig,
    Mount,
    NetworkAttachmentConfig,
    Resources,
    RestartPolicy,
    ServiceMode,
    TaskTemplate,
)

from bench.common import (
    CLUSTER_LABEL,
    ENGINE_IMAGE,
    Isolation,
    Row,
    isolation,
    latency_summary,
    log,
    rtmanager_server,
)
from bench.lifecycle import (
    ENGINE_LOG_MAX_BYTES,
    ENGINE_LOG_MAX_FILES,
    ENGINE_PIDS,
    ENGINE_PORT,
    ENGINE_UID,
    STATE_MOUNT,
    STOP_TIMEOUT_SECONDS,
    RtmanagerCycle,
)
from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.runtime import RuntimeStatus
from tests.support.swarm import SwarmCluster, missing_requirements

NAME = "swarm"
PHASES = ("start", "stop", "cleanup", "total")
FLOOR_PHASES = {
    "start": "create+task running",
    "stop": "scale 0+task ended",
    "cleanup": "remove service",
    "total": "total",
}
NODES = 3
CALL_TIMEOUT = 90.0
WAIT_SECONDS = 60.0
FLOOR_POLL_SECONDS = 0.05
ENGINE_NANO_CPUS = 50_000_000  # RTMANAGER_ENGINE_CPUS=0.05
ENGINE_MEMORY = 32 * 1024 * 1024  # RTMANAGER_ENGINE_MEMORY=32m
# Task states after which a task never runs again (as the backend counts them).
TERMINAL = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})


@dataclass(frozen=True)
class SwarmParams:
    """Measured lifecycle cycles per side, and the placement check's size."""

    cycles: int
    placement_games: int = 24
    placement_max_per_node: int = 10
    warmup_cycles: int = 1


DEFAULT = SwarmParams(cycles=10)
QUICK = SwarmParams(cycles=3)

Phases = dict[str, float]


def server_extra_env(swarm: SwarmCluster) -> dict[str, str]:
    """The server's overrides: the swarm backend on the harness manager, small engines."""
    return {
        "RTMANAGER_BACKEND": "swarm",
        "RTMANAGER_DOCKER_HOST": swarm.manager_url,
        "RTMANAGER_START_SETTLE": "0s",
        "RTMANAGER_ENGINE_CPUS": "0.05",
        "RTMANAGER_ENGINE_MEMORY": "32m",
    }


class DockerPyServiceCycle:
    """The floor: the same swarm work with docker-py's low-level API on the manager."""

    def __init__(self, client: docker.DockerClient, iso: Isolation) -> None:
        self._api = client.api
        self._iso = iso
        self.network = f"bench-raw-{iso.run_id}"

    def ensure_network(self) -> None:
        """The attachable, internal overlay network of the raw services (created once)."""
        if not self._api.networks(names=[self.network]):
            self._api.create_network(
                self.network,
                driver="overlay",
                attachable=True,
                internal=True,
                scope="swarm",
                labels={**self._iso.labels, CLUSTER_LABEL: self._iso.cluster},
                check_duplicate=True,
            )

    def __call__(self, index: int) -> Phases:
        name = f"bench-raw-{self._iso.run_id}-{index:03d}"
        clock = time.perf_counter
        t0 = clock()
        service_id = str(self._create(name)["ID"])
        self._wait(service_id, running=True)
        t1 = clock()
        self._scale_to_zero(service_id)
        self._wait(service_id, running=False)
        t2 = clock()
        self._api.remove_service(service_id)  # type: ignore[no-untyped-call]
        t3 = clock()
        return {"start": t1 - t0, "stop": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}

    def _create(self, name: str) -> dict[str, Any]:
        labels = {
            **self._iso.labels,
            "com.galaxy.bench": "docker-py",
            "com.galaxy.game_id": name,
            "com.galaxy.image_ref": ENGINE_IMAGE,
        }
        container = ContainerSpec(
            ENGINE_IMAGE,
            hostname=name,
            env=[
                f"GALAXY_GAME_ID={name}",
                f"GALAXY_STATE_DIR={STATE_MOUNT}",
                f"ENGINE_PORT={ENGINE_PORT}",
            ],
            user=f"{ENGINE_UID}:{ENGINE_UID}",
            labels=labels,
            mounts=[
                Mount(
                    target=STATE_MOUNT,
                    source=f"bench-raw-state-{name}",
                    type="volume",
                    labels=dict(self._iso.labels),
                    driver_config=DriverConfig("local"),
                )
            ],
            stop_grace_period=STOP_TIMEOUT_SECONDS * 1_000_000_000,
            init=True,
            cap_drop=["ALL"],
        )
        container["Privileges"] = {"NoNewPrivileges": True}
        resources = Resources(
            cpu_limit=ENGINE_NANO_CPUS,
            mem_limit=ENGINE_MEMORY,
            cpu_reservation=ENGINE_NANO_CPUS,
            mem_reservation=ENGINE_MEMORY,
        )
        resources.setdefault("Limits", {})["Pids"] = ENGINE_PIDS
        template = TaskTemplate(
            container_spec=container,
            resources=resources,
            restart_policy=RestartPolicy(condition="none"),
            log_driver=DriverConfig(
                "json-file",
                {"max-size": str(ENGINE_LOG_MAX_BYTES), "max-file": str(ENGINE_LOG_MAX_FILES)},
            ),
            networks=[NetworkAttachmentConfig(target=self.network, aliases=[name])],
        )
        return dict(
            self._api.create_service(  # type: ignore[no-untyped-call]
                template,
                name=name,
                labels=labels,
                mode=ServiceMode("replicated", replicas=1),
            )
        )

    def _scale_to_zero(self, service_id: str) -> None:
        service = self._api.inspect_service(service_id)  # type: ignore[no-untyped-call]
        spec = service["Spec"]
        self._api.update_service(
            service_id,
            version=int(service["Version"]["Index"]),
            task_template=spec.get("TaskTemplate"),
            name=spec.get("Name"),
            labels=spec.get("Labels"),
            mode=ServiceMode("replicated", replicas=0),
            networks=spec.get("TaskTemplate", {}).get("Networks"),
            endpoint_spec=spec.get("EndpointSpec"),
        )

    def _wait(self, service_id: str, *, running: bool) -> None:
        """Poll the service's tasks until one runs (`running`) or none is live."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            tasks = self._api.tasks(filters={"service": service_id})  # type: ignore[no-untyped-call]
            states = [(t.get("Status") or {}).get("State") for t in tasks]
            if running:
                if any(
                    s == "running" and t.get("DesiredState") == "running"
                    for s, t in zip(states, tasks, strict=True)
                ):
                    return
                failed = [t for s, t in zip(states, tasks, strict=True) if s in TERMINAL]
                if failed:
                    raise RuntimeError(f"raw service {service_id} failed: {failed[0]['Status']}")
            elif all(s in TERMINAL for s in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw service {service_id}: tasks {states} at the deadline")
            time.sleep(FLOOR_POLL_SECONDS)


def placement(
    client: RuntimeManagerClient, swarm: SwarmCluster, run_id: str, games: int
) -> tuple[dict[str, int], float]:
    """Start `games` games; return games per node hostname (every node listed) and the seconds."""
    began = time.perf_counter()
    records = [
        client.start_runtime(f"pl-{run_id}-{i:03d}", ENGINE_IMAGE, timeout=CALL_TIMEOUT)
        for i in range(games)
    ]
    seconds = time.perf_counter() - began
    by_id = Counter(r.node_id for r in records)
    unknown = set(by_id) - {n.node_id for n in swarm.nodes}
    if unknown or any(r.status is not RuntimeStatus.RUNNING for r in records):
        raise RuntimeError(f"placement: unexpected records (unknown nodes {unknown})")
    return {n.hostname: by_id.get(n.node_id, 0) for n in swarm.nodes}, seconds


def run(*, quick: bool = False) -> dict[str, Any]:
    """Alternate rtmanager and docker-py cycles, then place games; return rows and raw numbers."""
    params = QUICK if quick else DEFAULT
    missing = missing_requirements()
    if missing:
        raise RuntimeError(f"the swarm harness cannot run here: {'; '.join(missing)}")
    samples: dict[str, list[Phases]] = {"rtmanager": [], "docker-py": []}
    with isolation(NAME) as iso:
        log(f"{NAME}: starting a {NODES}-node harness swarm")
        with SwarmCluster(
            nodes=NODES, images=(ENGINE_IMAGE,), log_dir=iso.workdir / "swarm"
        ) as swarm:
            env = server_extra_env(swarm)
            manager = swarm.manager_client(timeout=60)
            try:
                with (
                    rtmanager_server(iso, extra_env=env) as server,
                    RuntimeManagerClient(server.address, timeout=CALL_TIMEOUT) as client,
                ):
                    floor = DockerPyServiceCycle(manager, iso)
                    floor.ensure_network()
                    sides: dict[str, Callable[[int], Phases]] = {
                        "rtmanager": RtmanagerCycle(
                            client, iso.run_id, prefix="sw", call_timeout=CALL_TIMEOUT
                        ),
                        "docker-py": floor,
                    }
                    order = list(sides)
                    for index in range(params.warmup_cycles + params.cycles):
                        measured = index >= params.warmup_cycles
                        for side in order if index % 2 == 0 else list(reversed(order)):
                            phases = sides[side](index)
                            if measured:
                                samples[side].append(phases)
                        if measured:
                            log(
                                f"{NAME}: cycle {index - params.warmup_cycles + 1}/"
                                f"{params.cycles}: rtmanager "
                                f"{samples['rtmanager'][-1]['total'] * 1000:.0f} ms, "
                                f"docker-py {samples['docker-py'][-1]['total'] * 1000:.0f} ms"
                            )
                    per_node, placing = placement(client, swarm, iso.run_id, params.placement_games)
                    log(f"{NAME}: {params.placement_games} games per node: {per_node}")
            finally:
                manager.close()

    summaries = {
        side: {phase: latency_summary([s[phase] for s in runs]) for phase in PHASES}
        for side, runs in samples.items()
    }
    rows: list[Row] = []
    for phase in PHASES:
        ours, floor_summary = summaries["rtmanager"][phase], summaries["docker-py"][phase]
        case = f"{phase} (floor: {FLOOR_PHASES[phase]})"
        for metric in ("p50_ms", "max_ms"):
            rows.append(
                Row(NAME, case, f"latency {metric[:-3]}", "ms", ours[metric], floor_summary[metric])
            )
    busiest = max(per_node.values())
    holds = len([c for c in per_node.values() if c]) == NODES and (
        busiest <= params.placement_max_per_node
    )
    rows.append(
        Row(
            NAME,
            f"placement of {params.placement_games} games on {NODES} nodes "
            f"(floor: even share; target max <= {params.placement_max_per_node})",
            "games on the busiest node",
            "games",
            busiest,
            params.placement_games / NODES,
            notes={"per_node": per_node, "target_holds": holds, "seconds": round(placing, 2)},
        )
    )
    return {
        "params": {**asdict(params), "image": ENGINE_IMAGE, "nodes": NODES},
        "rows": [row.to_json() for row in rows],
        "raw": {
            "summary": summaries,
            "cycles_seconds": samples,
            "placement": {"per_node": per_node, "target_holds": holds, "seconds": placing},
        },
    }
