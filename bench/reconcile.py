"""Reconcile pass: one pass over 1000 owned containers, against one raw listing.

Set-up (not measured): 1000 containers are created, never started, with raw
docker-py from a few threads. Each carries the labels rtmanager puts on its
engines (`com.galaxy.owner=rtmanager`, the run's cluster, `com.galaxy.game_id`,
`com.galaxy.image_ref`), so the run's deployment owns them, plus the run's
`com.galaxy.test` label, and is named `galaxy-game-{game_id}`. Records are
written through the PostgreSQL adapters. The mix, by the reconciler's rules:

- steady (950): a stopped record bound to its container, which does not
  run. Nothing to do: the usual state of a game between two sessions.
- adopt (25): a container without a record: adopted, recorded stopped.
- mark_stopped (25): a running record whose container does not run: marked
  stopped (its re-check inspects the container for the exit code).
- dispose (25): a running record whose container is gone (there is none):
  marked removed. These add no container to the 1000.

"A stopped record whose container runs again" needs a running container;
none is started, so that rule is not exercised here.

rtmanager: `Reconciler.run_pass()` in this process, on the adapters, lease
lock and recorder composed as the server composes them
(`bench.common.in_process_lifecycles`), so its Docker requests can be
counted on the adapter's client. Two passes per round: the *repair* pass,
which applies the 75 steps (each under its game's lease, with its re-check
and its own transaction), and right after it the *steady* pass, which finds
nothing to do. Before each round the records of the mix are reset.

Floor: the one request a pass cannot do without: raw docker-py listing the
containers with the same label filters (`GET /containers/json?all=1`,
owner and cluster labels), as the adapter sends it.

Rounds alternate which side goes first. Every pass is checked: the repair
pass must apply exactly the mix's steps and the steady pass must find none.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors
import psycopg
from psycopg import sql

from bench.common import (
    CLUSTER_LABEL,
    ENGINE_IMAGE,
    DockerRequests,
    Isolation,
    Row,
    in_process_lifecycles,
    isolation,
    latency_summary,
    log,
)
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.ids import container_name, engine_endpoint
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.reconcile import ActionKind, ReconcileReport
from tests.conftest import DOCKER_HOST, POSTGRES_DSN, TEST_LABEL

NAME = "reconcile"
# The pass duration the reconciler must stay under at 1000 owned containers.
PASS_BOUND_SECONDS = 2.0


@dataclass(frozen=True)
class ReconcileParams:
    """The mix, the rounds and the bounds of the set-up."""

    containers: int
    adopt: int
    mark_stopped: int
    dispose: int
    rounds: int
    create_threads: int = 4
    # Creating and removing the containers must each end within this.
    setup_seconds: float = 150.0

    @property
    def steady(self) -> int:
        """Containers with a stopped record bound to them."""
        return self.containers - self.adopt - self.mark_stopped


DEFAULT = ReconcileParams(containers=1000, adopt=25, mark_stopped=25, dispose=25, rounds=3)
QUICK = ReconcileParams(containers=100, adopt=5, mark_stopped=5, dispose=5, rounds=1)


@dataclass(frozen=True)
class Mix:
    """Game ids by role, and the container of each game that has one."""

    steady: list[str]
    adopt: list[str]
    mark_stopped: list[str]
    dispose: list[str]
    containers: dict[str, str]


# -- containers ----------------------------------------------------------------


def _create_containers(
    iso: Isolation, game_ids: list[str], params: ReconcileParams
) -> dict[str, str]:
    """Create (not start) one owned container per game, from a few threads; game id -> id."""
    created: dict[str, str] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + params.setup_seconds
    local = threading.local()
    clients: list[docker.DockerClient] = []

    def api() -> docker.APIClient:
        if not hasattr(local, "client"):
            local.client = docker.DockerClient(base_url=DOCKER_HOST, timeout=60)
            with lock:
                clients.append(local.client)
        client: docker.DockerClient = local.client
        return client.api

    def create(game_id: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"creating containers took over {params.setup_seconds:.0f} s")
        labels = galaxy_labels.engine_labels(
            cluster=iso.cluster,
            game_id=game_id,
            image_ref=ENGINE_IMAGE,
            extra={TEST_LABEL: iso.label},
        )
        client = api()
        answer = client.create_container(
            ENGINE_IMAGE,
            name=container_name(game_id),
            labels=labels,
            host_config=client.create_host_config(network_mode="none"),
        )
        with lock:
            created[game_id] = str(answer["Id"])
            if len(created) % 250 == 0:
                log(f"{NAME}: {len(created)}/{len(game_ids)} containers created")

    try:
        with ThreadPoolExecutor(params.create_threads, thread_name_prefix="create") as pool:
            for future in [pool.submit(create, game_id) for game_id in game_ids]:
                future.result()
    finally:
        for client in clients:
            client.close()
    return created


def _remove_containers(iso: Isolation, params: ReconcileParams) -> None:
    """Remove every container of the run, from a few threads (what is left, `isolation` removes)."""
    client = docker.DockerClient(base_url=DOCKER_HOST, timeout=60)
    try:
        ids = [
            str(c["Id"])
            for c in client.api.containers(all=True, filters={"label": f"{TEST_LABEL}={iso.label}"})
        ]
        deadline = time.monotonic() + params.setup_seconds

        def remove(container_id: str) -> None:
            if time.monotonic() > deadline:
                return
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(container_id, force=True)

        with ThreadPoolExecutor(params.create_threads, thread_name_prefix="remove") as pool:
            list(pool.map(remove, ids))
        log(f"{NAME}: {len(ids)} containers removed")
    finally:
        client.close()


# -- records -------------------------------------------------------------------


def _record(
    iso: Isolation, game_id: str, status: RuntimeStatus, container_id: str
) -> RuntimeRecord:
    now = datetime.now(UTC)
    started = now - timedelta(hours=1)
    return RuntimeRecord(
        game_id=game_id,
        status=status,
        engine_endpoint=engine_endpoint(game_id, 8080),
        state_path=str(iso.state_root / game_id),
        docker_network=f"galaxy-{iso.cluster}",
        last_op_at=now - timedelta(minutes=1),
        created_at=started,
        current_container_id=container_id,
        current_image_ref=ENGINE_IMAGE,
        started_at=started,
        stopped_at=now - timedelta(minutes=1) if status is RuntimeStatus.STOPPED else None,
    )


class Records:
    """Writes the mix's records, and puts them back as they were before a pass."""

    def __init__(self, iso: Isolation, mix: Mix) -> None:
        self._iso = iso
        self._mix = mix
        self._pool = create_pool(POSTGRES_DSN, iso.schema, max_size=1, timeout=10)
        self._units = PostgresUnitOfWorkFactory(self._pool, default_timeout=timedelta(seconds=60))

    def close(self) -> None:
        """Close the pool."""
        self._pool.close()

    def seed(self) -> None:
        """Every record of the mix (none for the games to adopt)."""
        mix = self._mix
        self._write(
            [_record(self._iso, g, RuntimeStatus.STOPPED, mix.containers[g]) for g in mix.steady]
        )
        self.reset()

    def reset(self) -> None:
        """Undo what a repair pass did: no adopted records, the others running again."""
        mix, iso = self._mix, self._iso
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DELETE FROM {}.runtime_records WHERE game_id = ANY(%s)").format(
                    sql.Identifier(iso.schema)
                ),
                (mix.adopt,),
            )
        running = [
            _record(iso, g, RuntimeStatus.RUNNING, mix.containers[g]) for g in mix.mark_stopped
        ]
        gone = [
            _record(iso, g, RuntimeStatus.RUNNING, uuid.uuid4().hex + uuid.uuid4().hex)
            for g in mix.dispose
        ]
        self._write(running + gone)

    def _write(self, records: list[RuntimeRecord]) -> None:
        with self._units() as uow:
            for record in records:
                uow.records.upsert(record)
            uow.commit()


# -- measuring -------------------------------------------------------------------


def _expect(report: ReconcileReport, expected: dict[ActionKind, int], what: str) -> None:
    applied = {kind: report.count(kind) for kind in ActionKind}
    want = {kind: expected.get(kind, 0) for kind in ActionKind}
    if applied != want or report.skipped:
        raise RuntimeError(
            f"{what}: applied {applied} with {report.skipped} skipped, expected {want}: "
            f"{[a for a in report.actions if not a.applied][:5]}"
        )


def _mix(run_id: str, params: ReconcileParams) -> list[list[str]]:
    ids = iter(f"rc-{run_id}-{index:04d}" for index in range(params.containers + params.dispose))
    return [
        [next(ids) for _ in range(count)]
        for count in (params.steady, params.adopt, params.mark_stopped, params.dispose)
    ]


def _timed(
    action: Callable[[], Any], requests: DockerRequests
) -> tuple[Any, float, dict[str, int]]:
    requests.take()
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    return result, seconds, requests.take()


def run(*, quick: bool = False) -> dict[str, Any]:
    """Create the containers and records, time passes against the floor listing, clean up."""
    params = QUICK if quick else DEFAULT
    samples: dict[str, list[float]] = {"repair": [], "steady": [], "floor": []}
    calls: dict[str, dict[str, int]] = {}
    began = time.monotonic()
    with isolation(NAME) as iso:
        steady, adopt, mark_stopped, dispose = _mix(iso.run_id, params)
        try:
            log(
                f"{NAME}: creating {params.containers} containers ({params.create_threads} threads)"
            )
            created = _create_containers(iso, steady + adopt + mark_stopped, params)
            set_up = time.monotonic() - began
            log(f"{NAME}: containers created in {set_up:.0f} s")
            mix = Mix(steady, adopt, mark_stopped, dispose, created)
            with in_process_lifecycles(iso) as lifecycles:
                records = Records(iso, mix)
                floor_client = docker.DockerClient(base_url=DOCKER_HOST, timeout=60)
                try:
                    records.seed()
                    floor_requests = DockerRequests()
                    floor_requests.attach(floor_client.api)
                    owner = f"{galaxy_labels.OWNER}={galaxy_labels.OWNER_VALUE}"
                    selectors = [owner, f"{CLUSTER_LABEL}={iso.cluster}"]
                    reconciler = lifecycles.reconciler
                    expected = {
                        ActionKind.ADOPT: params.adopt,
                        ActionKind.MARK_STOPPED: params.mark_stopped,
                        ActionKind.DISPOSE: params.dispose,
                    }

                    def floor() -> None:
                        _, seconds, counted = _timed(
                            lambda: floor_client.api.containers(
                                all=True, filters={"label": selectors}
                            ),
                            floor_requests,
                        )
                        samples["floor"].append(seconds)
                        calls["floor"] = counted

                    def passes() -> None:
                        report, seconds, counted = _timed(reconciler.run_pass, lifecycles.requests)
                        _expect(report, expected, "repair pass")
                        samples["repair"].append(seconds)
                        calls["repair"] = counted
                        report, seconds, counted = _timed(reconciler.run_pass, lifecycles.requests)
                        _expect(report, {}, "steady pass")
                        samples["steady"].append(seconds)
                        calls["steady"] = counted

                    # Unmeasured: the first listing of each client warms its connection.
                    floor_client.api.containers(all=True, filters={"label": selectors})
                    for index in range(params.rounds):
                        turns = [passes, floor] if index % 2 == 0 else [floor, passes]
                        for turn in turns:
                            turn()
                        records.reset()
                        log(
                            f"{NAME}: round {index + 1}/{params.rounds}: "
                            f"repair {samples['repair'][-1] * 1000:.0f} ms "
                            f"({sum(calls['repair'].values())} docker requests), "
                            f"steady {samples['steady'][-1] * 1000:.0f} ms, "
                            f"floor {samples['floor'][-1] * 1000:.1f} ms"
                        )
                finally:
                    floor_client.close()
                    records.close()
        finally:
            _remove_containers(iso, params)
    wall = time.monotonic() - began

    summaries = {side: latency_summary(values) for side, values in samples.items()}
    floor_summary = summaries["floor"]
    steps = params.adopt + params.mark_stopped + params.dispose
    cases = {
        "repair": f"pass: {params.containers} owned, {steps} steps (floor: one listing)",
        "steady": f"pass: {params.containers} owned, nothing to do (floor: one listing)",
    }
    rows: list[Row] = []
    for side, case in cases.items():
        ours = summaries[side]
        rows.append(
            Row(
                NAME,
                case,
                "duration p50",
                "ms",
                ours["p50_ms"],
                floor_summary["p50_ms"],
                notes={
                    "max_ms": ours["max_ms"],
                    "bound_ms": PASS_BOUND_SECONDS * 1000,
                    "within_bound": ours["max_ms"] < PASS_BOUND_SECONDS * 1000,
                },
            )
        )
        rows.append(
            Row(
                NAME,
                case,
                "docker calls",
                "requests",
                sum(calls[side].values()),
                sum(calls["floor"].values()),
                notes={"rtmanager": calls[side], "floor": calls["floor"]},
            )
        )
    return {
        "params": {**asdict(params), "image": ENGINE_IMAGE, "set_up_seconds": round(set_up, 1)},
        "rows": [row.to_json() for row in rows],
        "raw": {
            "summary": summaries,
            "seconds": samples,
            "docker_requests": calls,
            "wall_seconds": round(wall, 1),
        },
    }
