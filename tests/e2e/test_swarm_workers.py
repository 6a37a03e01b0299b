"""The real server's workers on the local engine as a one-node swarm (SPEC §10, §4).

The local engine is a one-node swarm manager for the run (`local_swarm`);
every test has its own server, schema, Redis prefix, cluster and game ids,
and its services, network and volumes are removed after it (even when it
fails). Covered, as Lobby and Game Master use them: Lobby's start and stop
jobs through the streams, `WatchRuntimes` (a start with its node, a
restart's inner steps and the restart's own event), the `Reconcile` RPC
adopting a service made behind rtmanager's back and disposing of a running
game whose service vanished (planned first by a dry run), and a task
killed on the engine turning the record `stopped` with the reason in the
operation log, seen by the task poll or, while another replica holds the
game's lease, by a reconcile.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.types
import pytest
import redis

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.client import RuntimeManagerClient
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import REDIS_URL, TEST_LABEL
from tests.e2e.conftest import ServerProcess, eventually, start_server
from tests.e2e.test_watch import Watcher
from tests.support import redis_replies as replies
from tests.support.local_swarm import LocalSwarm

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.swarm,
    pytest.mark.timeout(120),
]

STUB = "galaxy/engine-stub:1.0.0"


@pytest.fixture
def server(
    local_swarm: LocalSwarm, server_environment: dict[str, str], tmp_path: Path
) -> Iterator[ServerProcess]:
    """A server with the swarm backend on the local engine.

    Stopped before `docker_cleanup` (behind `server_environment`) removes
    the test's services, network and volumes.
    """
    env = {
        **server_environment,
        "RTMANAGER_BACKEND": "swarm",
        "RTMANAGER_DOCKER_HOST": local_swarm.docker_host,
        "RTMANAGER_ENGINE_CPUS": "0.05",
        "RTMANAGER_ENGINE_MEMORY": "32m",
    }
    handle = start_server(env, tmp_path / "server.log")
    try:
        yield handle
    finally:
        code = handle.stop()
        if code not in (0, -signal.SIGTERM):
            sys.stderr.write(handle.log()[-4000:])


@pytest.fixture
def manager(local_swarm: LocalSwarm, docker_client: docker.DockerClient) -> docker.DockerClient:
    """docker-py on the local engine, the swarm's manager and only node."""
    return docker_client


@pytest.fixture
def streams() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        watcher.close()


def _service(manager: docker.DockerClient, name: str) -> dict[str, Any] | None:
    found = [s for s in manager.services.list(filters={"name": name}) if s.name == name]
    return found[0].attrs if found else None


def _replicas(manager: docker.DockerClient, name: str) -> int | None:
    service = _service(manager, name)
    return None if service is None else int(service["Spec"]["Mode"]["Replicated"]["Replicas"])


def _running_container(manager: docker.DockerClient, name: str) -> str:
    """The container id of the service's running task ("" while there is none)."""
    for task in manager.api.tasks(filters={"service": name, "desired-state": "running"}):  # type: ignore[no-untyped-call]
        status = task.get("Status") or {}
        if status.get("State") == "running":
            return str((status.get("ContainerStatus") or {}).get("ContainerID") or "")
    return ""


def test_lobby_start_and_stop_jobs_on_a_swarm(
    server: ServerProcess,
    streams: redis.Redis,
    manager: docker.DockerClient,
    local_swarm: LocalSwarm,
    test_id: str,
) -> None:
    env = server.env
    results = env["RTMANAGER_JOB_RESULTS_STREAM"]
    game = f"lobby-{test_id}"
    name = f"galaxy-game-{game}"

    def answer(job_id: str) -> dict[str, str] | None:
        return next(
            (f for _id, f in replies.entries(streams.xrange(results)) if f["job_id"] == job_id),
            None,
        )

    start_id = replies.text(
        streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": game, "image_ref": STUB})
    )
    started = eventually(lambda: answer(start_id), within=60, every=0.2)
    assert started["outcome"] == "success", started
    record = json.loads(started["record"])
    assert record["status"] == "running"
    assert _running_container(manager, name) == record["current_container_id"]
    assert _replicas(manager, name) == 1

    stop_id = replies.text(
        streams.xadd(
            env["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": game, "reason": "game_finished"}
        )
    )
    stopped = eventually(lambda: answer(stop_id), within=60, every=0.2)
    assert stopped["outcome"] == "success", stopped
    assert json.loads(stopped["record"])["status"] == "stopped"
    assert _replicas(manager, name) == 0
    assert _running_container(manager, name) == ""

    with RuntimeManagerClient(server.address) as client:
        final = client.get_runtime(game)
        assert final.status is RuntimeStatus.STOPPED
        assert final.node_id == local_swarm.node_id
        rows = list(client.iter_operations(game_id=game))
    assert {(r.op_kind, r.op_source, r.source_ref, r.outcome) for r in rows} == {
        (OpKind.START, OpSource.LOBBY_STREAM, start_id, Outcome.SUCCESS),
        (OpKind.STOP, OpSource.LOBBY_STREAM, stop_id, Outcome.SUCCESS),
    }


def test_watchers_see_a_start_with_its_node_and_a_restart_with_its_inner_steps(
    server: ServerProcess, local_swarm: LocalSwarm, watchers: list[Watcher], test_id: str
) -> None:
    node = local_swarm
    game = f"watched-{test_id}"
    watcher = Watcher(server.address, pb.WatchRuntimesRequest(initial_snapshot=True))
    watchers.append(watcher)
    watcher.next("snapshot_complete")
    with RuntimeManagerClient(server.address, timeout=90) as client:
        record = client.start_runtime(game, STUB)
        (start,) = watcher.events(1, within=60)
        assert (start.op_kind, start.outcome) == (pb.OP_KIND_START, pb.OUTCOME_SUCCESS)
        assert start.runtime.game_id == game
        assert start.runtime.status == pb.RUNTIME_STATUS_RUNNING
        assert start.runtime.current_container_id == record.current_container_id
        assert (start.runtime.node_id, start.runtime.node_hostname) == (
            node.node_id,
            node.hostname,
        )
        assert start.parent_operation_id == 0

        restarted = client.restart_runtime(game, source_ref="gm-restart-1")
    stop, inner_start, restart = watcher.events(3, within=60)
    assert (stop.op_kind, stop.runtime.status) == (pb.OP_KIND_STOP, pb.RUNTIME_STATUS_STOPPED)
    assert stop.runtime.current_container_id == record.current_container_id
    assert (inner_start.op_kind, inner_start.runtime.status) == (
        pb.OP_KIND_START,
        pb.RUNTIME_STATUS_RUNNING,
    )
    assert inner_start.runtime.current_container_id == restarted.current_container_id
    assert inner_start.runtime.node_id == node.node_id
    assert (restart.op_kind, restart.outcome) == (pb.OP_KIND_RESTART, pb.OUTCOME_SUCCESS)
    assert restart.runtime.current_container_id == restarted.current_container_id
    assert restart.runtime.node_hostname == node.hostname
    for inner in (stop, inner_start):
        assert inner.parent_op_kind == pb.OP_KIND_RESTART
        assert inner.parent_operation_id == restart.operation_id
        assert inner.source_ref == "gm-restart-1"
    assert restart.source_ref == "gm-restart-1"
    assert restart.parent_operation_id == 0
    assert int(start.cursor) < int(stop.cursor) < int(inner_start.cursor) < int(restart.cursor)


def _hold_lease(streams: redis.Redis, env: dict[str, str], game_id: str) -> str:
    """Take a game's lease as another replica would (60 s); return its key."""
    key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:{game_id}"
    assert streams.set(key, "another-replica/held-by-the-test", nx=True, px=60_000)
    return key


def test_reconcile_adopts_a_service_made_behind_its_back_and_disposes_a_vanished_one(
    server: ServerProcess,
    manager: docker.DockerClient,
    local_swarm: LocalSwarm,
    streams: redis.Redis,
    cluster: str,
    test_id: str,
) -> None:
    env = server.env
    node = local_swarm
    doomed_id, adoptee_id = f"doomed-{test_id}", f"adoptee-{test_id}"
    with RuntimeManagerClient(server.address, timeout=90) as client:
        doomed = client.start_runtime(doomed_id, STUB)
        assert doomed.status is RuntimeStatus.RUNNING
        stock = _service(manager, f"galaxy-game-{doomed_id}")
        assert stock is not None

        # A service of this deployment made behind rtmanager's back, labelled
        # as the backend labels its own (service and container).
        labels = {
            **stock["Spec"]["Labels"],
            galaxy_labels.GAME_ID: adoptee_id,
            TEST_LABEL: test_id,
        }
        labels.pop("com.galaxy.rtmanager.last_container", None)
        assert labels[galaxy_labels.CLUSTER] == cluster
        manager.services.create(  # type: ignore[no-untyped-call]
            STUB,
            name=f"galaxy-game-{adoptee_id}",
            labels=labels,
            container_labels=labels,
            networks=[
                docker.types.NetworkAttachmentConfig(
                    f"galaxy-{cluster}", aliases=[f"galaxy-game-{adoptee_id}"]
                )
            ],
            mode=docker.types.ServiceMode("replicated", replicas=1),
            restart_policy=docker.types.RestartPolicy(condition="none"),
        )
        adoptee = eventually(
            lambda: _running_container(manager, f"galaxy-game-{adoptee_id}"), within=60, every=0.2
        )

        # The doomed game's service goes while another replica holds its lease:
        # the events listener cannot record the exit, so the record stays running.
        lease = _hold_lease(streams, env, doomed_id)
        manager.services.get(f"galaxy-game-{doomed_id}").remove()  # type: ignore[no-untyped-call]
        eventually(
            lambda: "engine exit left to the next reconcile pass: game busy" in server.log(),
            within=30,
            every=0.2,
        )
        assert client.get_runtime(doomed_id).status is RuntimeStatus.RUNNING

        plan = client.reconcile(dry_run=True)
        assert plan.dry_run
        assert sorted((a.kind, a.game_id, a.applied) for a in plan.actions) == [
            (pb.RECONCILE_ACTION_KIND_ADOPT, adoptee_id, False),
            (pb.RECONCILE_ACTION_KIND_DISPOSE, doomed_id, False),
        ]
        assert (plan.adopted, plan.disposed) == (1, 1)
        assert [r.game_id for r in client.list_runtimes().items] == [doomed_id]
        assert client.get_runtime(doomed_id).status is RuntimeStatus.RUNNING

        streams.delete(lease)
        done = client.reconcile()
        assert sorted((a.kind, a.game_id, a.applied) for a in done.actions) == [
            (pb.RECONCILE_ACTION_KIND_ADOPT, adoptee_id, True),
            (pb.RECONCILE_ACTION_KIND_DISPOSE, doomed_id, True),
        ]

        adopted = client.get_runtime(adoptee_id)
        assert adopted.status is RuntimeStatus.RUNNING
        assert adopted.current_container_id == adoptee
        assert adopted.current_image_ref == STUB
        assert (adopted.node_id, adopted.node_hostname) == (node.node_id, node.hostname)
        (row,) = client.iter_operations(game_id=adoptee_id)
        assert (row.op_kind, row.op_source, row.outcome) == (
            OpKind.RECONCILE_ADOPT,
            OpSource.AUTO_RECONCILE,
            Outcome.SUCCESS,
        )

        disposed = client.get_runtime(doomed_id)
        assert disposed.status is RuntimeStatus.REMOVED
        assert disposed.current_container_id == ""
        latest = next(iter(client.iter_operations(game_id=doomed_id)))
        assert (latest.op_kind, latest.op_source, latest.outcome) == (
            OpKind.RECONCILE_DISPOSE,
            OpSource.AUTO_RECONCILE,
            Outcome.SUCCESS,
        )
        assert latest.container_id == doomed.current_container_id

        assert client.reconcile().actions == []  # converged
        # The adopted game is rtmanager's now: it stops it like its own.
        assert client.stop_runtime(adoptee_id).status is RuntimeStatus.STOPPED
    assert _replicas(manager, f"galaxy-game-{adoptee_id}") == 0


@pytest.mark.parametrize("seen_by", ["events", "reconcile"])
def test_a_task_killed_on_its_node_makes_the_record_stopped_with_the_reason(
    server: ServerProcess,
    manager: docker.DockerClient,
    streams: redis.Redis,
    seen_by: str,
    test_id: str,
) -> None:
    game = f"killed-{test_id}"
    with RuntimeManagerClient(server.address, timeout=90) as client:
        record = client.start_runtime(game, STUB)
        # With another replica holding the game's lease, the task poll's exit
        # is left to a reconcile pass (the periodic one is a minute away).
        lease = _hold_lease(streams, server.env, game) if seen_by == "reconcile" else ""
        # Kill the engine behind rtmanager's back, as an OOM killer or an operator would.
        manager.containers.get(record.current_container_id).kill()

        if seen_by == "reconcile":
            eventually(
                lambda: "engine exit left to the next reconcile pass: game busy" in server.log(),
                within=30,
                every=0.2,
            )
            assert client.get_runtime(game).status is RuntimeStatus.RUNNING
            streams.delete(lease)
            done = client.reconcile()
            assert [(a.kind, a.game_id, a.applied) for a in done.actions] == [
                (pb.RECONCILE_ACTION_KIND_MARK_STOPPED, game, True)
            ]
        stopped = eventually(
            lambda: (r := client.get_runtime(game)).status is RuntimeStatus.STOPPED and r,
            within=30,
            every=0.2,
        )
        assert stopped.current_container_id == record.current_container_id
        latest = next(iter(client.iter_operations(game_id=game)))
        assert (latest.op_kind, latest.op_source, latest.outcome) == (
            OpKind.STOP,
            OpSource.AUTO_RECONCILE,
            Outcome.SUCCESS,
        )
        assert latest.container_id == record.current_container_id
        # The reason: the engine's exit by SIGKILL, as the task reported it.
        expected = "docker-event:die:exit=137" if seen_by == "events" else "reconcile:exit=137"
        assert latest.source_ref == expected
        assert client.reconcile().actions == []
