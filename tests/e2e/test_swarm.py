"""The real server on Docker Swarm (SPEC §10), through the project's client.

`RTMANAGER_BACKEND=swarm`. On the local engine as a one-node swarm (the
`local_swarm` fixture): every lifecycle RPC gives the same records and
audit rows as on one host, plus the node; services of another cluster and
unlabelled ones are never touched. On harness swarms (tests/support/swarm.py,
root only): an engine that is no swarm manager stops the server at
start-up; on three nodes games spread, and a worker whose dockerd stops
turns exactly its games' records `stopped`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import docker.types
import pytest

from rtmanager.client import (
    ConflictError,
    ContainerStartFailedError,
    NotFoundError,
    RuntimeManagerClient,
)
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import TEST_LABEL, needs_swarm_tools
from tests.e2e.conftest import REPO, ServerProcess, eventually, start_server
from tests.support.local_swarm import LocalSwarm
from tests.support.swarm import SwarmCluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.swarm,
    pytest.mark.timeout(240),
]

STUB = "galaxy/engine-stub"
CRASH = "galaxy/engine-crash:1.0.0"


def swarm_env(env: dict[str, str], docker_host: str, **extra: str) -> dict[str, str]:
    return {
        **env,
        "RTMANAGER_BACKEND": "swarm",
        "RTMANAGER_DOCKER_HOST": docker_host,
        # Scheduling reserves the engine's CPUs on a node: keep many games possible.
        "RTMANAGER_ENGINE_CPUS": "0.05",
        "RTMANAGER_ENGINE_MEMORY": "32m",
        **extra,
    }


def _service(manager: docker.DockerClient, name: str) -> dict[str, Any] | None:
    found = [s for s in manager.services.list(filters={"name": name}) if s.name == name]
    return found[0].attrs if found else None


def test_lifecycles_on_the_local_one_node_swarm(
    local_swarm: LocalSwarm,
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    tmp_path: Path,
    cluster: str,
    test_id: str,
) -> None:
    manager = docker_client
    # Someone else's engine services: another deployment's, and one without
    # rtmanager's labels holding a game's name. Neither may be adopted,
    # stopped or removed. (The test label only lets the cleanup find them.)
    foreign, bare = f"foreign-{test_id}", f"bare-{test_id}"
    manager.services.create(  # type: ignore[no-untyped-call]
        f"{STUB}:1.0.0",
        name=f"galaxy-game-{foreign}",
        labels={
            "com.galaxy.owner": "rtmanager",
            "com.galaxy.rtmanager.cluster": f"someone-else-{test_id}",
            "com.galaxy.game_id": foreign,
            TEST_LABEL: test_id,
        },
        mode=docker.types.ServiceMode("replicated", replicas=1),
    )
    manager.services.create(  # type: ignore[no-untyped-call]
        f"{STUB}:1.0.0",
        name=f"galaxy-game-{bare}",
        labels={TEST_LABEL: test_id},
        mode=docker.types.ServiceMode("replicated", replicas=1),
    )
    others = {
        name: (svc := _service(manager, name)) and svc["Version"]["Index"]
        for name in (f"galaxy-game-{foreign}", f"galaxy-game-{bare}")
    }
    env = swarm_env(server_environment, local_swarm.docker_host)
    server = start_server(env, tmp_path / "server.log")
    try:
        with RuntimeManagerClient(server.address, timeout=90) as client:
            _run_lifecycles(client, manager, local_swarm, cluster, test_id, bare)
            # A pass of the reconciler sees the others' services and leaves them.
            report = client.reconcile()
            assert all(a.game_id not in (foreign, bare) for a in report.actions)
            with pytest.raises(NotFoundError):
                client.get_runtime(foreign)
        for name, version in others.items():
            current = _service(manager, name)
            assert current is not None, f"{name} was removed"
            assert current["Version"]["Index"] == version, f"{name} was changed"
    finally:
        _stop(server)


def _run_lifecycles(
    client: RuntimeManagerClient,
    manager: docker.DockerClient,
    swarm: LocalSwarm,
    cluster: str,
    test_id: str,
    stranger: str,
) -> None:
    alpha, epsilon = f"alpha-{test_id}", f"epsilon-{test_id}"
    name = f"galaxy-game-{alpha}"
    # --- start: a service with one running task, on the node, recorded with it
    record = client.start_runtime(alpha, f"{STUB}:1.0.0", source_ref="req-1")
    assert record.status is RuntimeStatus.RUNNING
    assert record.engine_endpoint == f"http://{name}:8080"
    assert (record.node_id, record.node_hostname) == (swarm.node_id, swarm.hostname)
    service = _service(manager, name)
    assert service is not None
    assert service["Spec"]["Labels"]["com.galaxy.rtmanager.cluster"] == cluster
    assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
    tasks = manager.api.tasks(filters={"service": name})  # type: ignore[no-untyped-call]
    assert [t["Status"]["ContainerStatus"]["ContainerID"] for t in tasks] == [
        record.current_container_id
    ]
    again = client.start_runtime(alpha, f"{STUB}:1.0.0")
    assert again.current_container_id == record.current_container_id
    with pytest.raises(ConflictError):
        client.start_runtime(alpha, f"{STUB}:1.0.1")
    with pytest.raises(ConflictError):
        client.start_runtime(stranger, f"{STUB}:1.0.0")  # its name is taken by a stranger

    # --- stop: scaled to 0, recorded stopped; again is fine
    stopped = client.stop_runtime(alpha)
    assert stopped.status is RuntimeStatus.STOPPED and stopped.stopped_at is not None
    service = _service(manager, name)
    assert service is not None and service["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    assert client.stop_runtime(alpha).status is RuntimeStatus.STOPPED
    ops = list(client.iter_operations(game_id=alpha))
    assert [(op.op_kind, op.outcome) for op in reversed(ops)] == [
        (OpKind.START, Outcome.SUCCESS),
        (OpKind.START, Outcome.SUCCESS),
        (OpKind.START, Outcome.FAILURE),
        (OpKind.STOP, Outcome.SUCCESS),
        (OpKind.STOP, Outcome.SUCCESS),
    ]

    # --- restart of a stopped game, then of a running one: a new container each time
    restarted = client.restart_runtime(alpha, source_ref="gm-req-9")
    assert restarted.status is RuntimeStatus.RUNNING
    assert restarted.current_container_id != record.current_container_id
    assert restarted.engine_endpoint == record.engine_endpoint
    assert restarted.created_at == record.created_at
    assert restarted.node_id == swarm.node_id
    rows = [op for op in client.iter_operations(game_id=alpha) if op.source_ref == "gm-req-9"]
    assert sorted(op.op_kind for op in rows) == sorted([OpKind.RESTART, OpKind.STOP, OpKind.START])
    assert all(op.outcome is Outcome.SUCCESS for op in rows)
    running_again = client.restart_runtime(alpha, source_ref="gm-req-10")
    assert running_again.status is RuntimeStatus.RUNNING
    assert running_again.current_container_id != restarted.current_container_id

    # --- patch: the same service name with the new image
    patched = client.patch_runtime(alpha, f"{STUB}:1.0.1")
    assert patched.current_image_ref == f"{STUB}:1.0.1"
    assert patched.current_container_id != running_again.current_container_id
    service = _service(manager, name)
    assert service is not None
    assert service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].startswith(f"{STUB}:1.0.1")
    assert [s.name for s in manager.services.list(filters={"name": name})] == [name]

    # --- get, list and explain: the record as the last lifecycle left it, with the node
    got = client.get_runtime(alpha)
    assert got.current_container_id == patched.current_container_id
    assert (got.node_id, got.node_hostname) == (swarm.node_id, swarm.hostname)
    assert [r.game_id for r in client.list_runtimes().items] == [alpha]
    explained = client.explain_runtime(alpha)
    assert explained.record is not None and explained.record.node_id == swarm.node_id
    assert explained.container is not None
    assert (explained.container.id, explained.container.running, explained.container.owned) == (
        got.current_container_id,
        True,
        True,
    )

    # --- a crashing engine: start fails with its output, nothing is left behind
    with pytest.raises(ContainerStartFailedError) as caught:
        client.start_runtime(epsilon, CRASH)
    assert "refusing to start" in caught.value.message
    assert _service(manager, f"galaxy-game-{epsilon}") is None
    with pytest.raises(NotFoundError):
        client.get_runtime(epsilon)

    # --- cleanup: the service goes, the game's volume stays on its node
    with pytest.raises(ConflictError):
        client.cleanup_runtime(alpha)
    removed = client.cleanup_runtime(alpha, force=True)
    assert removed.status is RuntimeStatus.REMOVED and removed.current_container_id == ""
    assert _service(manager, name) is None
    volume = manager.volumes.get(f"galaxy-state-{alpha}")
    assert volume.attrs["Labels"]["com.galaxy.rtmanager.cluster"] == cluster
    cleanup = next(client.iter_operations(game_id=alpha, op_kind=OpKind.CLEANUP_CONTAINER))
    assert cleanup.outcome is Outcome.SUCCESS
    inner = next(client.iter_operations(game_id=alpha, op_kind=OpKind.STOP))
    assert (inner.parent_op_kind, inner.parent_operation_id) == (
        OpKind.CLEANUP_CONTAINER,
        cleanup.id,
    )


def _stop(server: ServerProcess) -> None:
    code = server.stop()
    if code not in (0, -signal.SIGTERM):
        sys.stderr.write(server.log()[-4000:])


@needs_swarm_tools()
def test_serve_refuses_an_engine_that_is_no_swarm_manager(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    with SwarmCluster(nodes=1, swarm=False, images=(), log_dir=tmp_path / "plain") as plain:
        env = swarm_env(server_environment, plain.manager_url)
        done = subprocess.run(
            [sys.executable, "-m", "rtmanager.cli", "serve"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "is not a swarm manager" in done.stderr
    assert "RTMANAGER_BACKEND=swarm" in done.stderr


@needs_swarm_tools()
def test_games_spread_over_three_nodes_and_a_lost_worker_stops_exactly_its_games(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    games = [f"g{i}" for i in range(6)]
    with SwarmCluster(nodes=3, images=(f"{STUB}:1.0.0",), log_dir=tmp_path / "swarm") as swarm:
        env = swarm_env(server_environment, swarm.manager_url, RTMANAGER_RECONCILE_INTERVAL="2s")
        server = start_server(env, tmp_path / "server.log")
        try:
            with RuntimeManagerClient(server.address, timeout=90) as client:
                records = {g: client.start_runtime(g, f"{STUB}:1.0.0") for g in games}
                placed = {g: r.node_id for g, r in records.items()}
                node_ids = {n.node_id for n in swarm.nodes}
                assert set(placed.values()) <= node_ids
                assert len(set(placed.values())) > 1, placed
                by_host = {r.node_hostname for r in records.values()}
                assert by_host <= {n.hostname for n in swarm.nodes}

                # Lose the worker running the most games (never the manager).
                lost = max(
                    (swarm.node(i) for i in (2, 3)),
                    key=lambda n: sum(1 for nid in placed.values() if nid == n.node_id),
                )
                on_lost = {g for g, nid in placed.items() if nid == lost.node_id}
                assert on_lost, placed
                swarm.stop_node(lost.index)
                swarm.wait_node_status(lost.index, "down", timeout=60)

                def settled() -> dict[str, RuntimeStatus] | None:
                    statuses = {g: client.get_runtime(g).status for g in games}
                    stopped = {g for g, s in statuses.items() if s is RuntimeStatus.STOPPED}
                    return statuses if stopped == on_lost else None

                statuses = eventually(settled, within=60, every=0.5)
                assert statuses is not None
                for game in games:
                    expected = RuntimeStatus.STOPPED if game in on_lost else RuntimeStatus.RUNNING
                    assert statuses[game] is expected, (game, statuses)
                for game in on_lost:
                    latest = next(iter(client.iter_operations(game_id=game)))
                    assert (latest.op_kind, latest.outcome) == (OpKind.STOP, Outcome.SUCCESS)
                    assert latest.op_source is OpSource.AUTO_RECONCILE
                    assert latest.container_id == records[game].current_container_id
                    # The reason: the engine's node was lost (by the reconciler
                    # or the task poll, whichever saw it first).
                    assert latest.source_ref.endswith(":exit=unknown:state=node-down"), latest
                    assert client.get_runtime(game).node_id == lost.node_id
                for game in set(games) - on_lost:
                    kinds = [op.op_kind for op in client.iter_operations(game_id=game)]
                    assert kinds == [OpKind.START], (game, kinds)
        finally:
            _stop(server)
