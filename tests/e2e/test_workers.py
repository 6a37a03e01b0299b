"""The sidecar workers through a real server: Docker events, the reconciler, TTL cleanup."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.models.containers
import psycopg
import pytest

from rtmanager.client import ConflictError, NotFoundError, RuntimeManagerClient
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import POSTGRES_DSN, TEST_LABEL
from tests.e2e.conftest import ServerProcess, eventually, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[RuntimeManagerClient]:
    with RuntimeManagerClient(server.address, timeout=60) as client:
        yield client


def behind_the_back(
    docker_client: docker.DockerClient,
    game_id: str,
    *,
    cluster: str | None,
    test_id: str,
    owner: bool = True,
) -> docker.models.containers.Container:
    """Run an engine container the service did not create."""
    labels = {TEST_LABEL: test_id, "com.galaxy.game_id": game_id, "com.galaxy.image_ref": STUB}
    if owner:
        labels["com.galaxy.owner"] = "rtmanager"
    if cluster is not None:
        labels["com.galaxy.rtmanager.cluster"] = cluster
    return docker_client.containers.run(
        STUB,
        name=f"galaxy-game-{game_id}",
        labels=labels,
        detach=True,
        init=True,
        network_mode="none",
        environment={"GALAXY_STATE_DIR": "/tmp"},
    )


def test_a_killed_engine_is_recorded_stopped_within_two_seconds(
    client: RuntimeManagerClient, docker_client: docker.DockerClient
) -> None:
    record = client.start_runtime("killed", STUB)
    docker_client.containers.get(record.current_container_id).kill()
    killed_at = time.monotonic()

    stopped = eventually(
        lambda: (r := client.get_runtime("killed")).status is RuntimeStatus.STOPPED and r,
        within=2.0,
    )
    assert time.monotonic() - killed_at <= 2.0
    assert stopped.current_container_id == record.current_container_id
    (row,) = [
        op
        for op in client.iter_operations(game_id="killed")
        if op.op_source is OpSource.AUTO_RECONCILE
    ]
    assert row.op_kind is OpKind.STOP and row.outcome is Outcome.SUCCESS
    assert row.source_ref == "docker-event:die:exit=137"


def test_owned_containers_created_behind_the_back_are_adopted_and_foreign_ones_untouched(
    client: RuntimeManagerClient,
    docker_client: docker.DockerClient,
    cluster: str,
    test_id: str,
) -> None:
    adoptee = behind_the_back(docker_client, "adoptee", cluster=cluster, test_id=test_id)
    foreign = behind_the_back(
        docker_client, "foreign", cluster=cluster, test_id=test_id, owner=False
    )
    other_cluster = behind_the_back(
        docker_client, "neighbour", cluster=f"{cluster}-other", test_id=test_id
    )

    plan = client.reconcile(dry_run=True)
    assert plan.dry_run
    assert [(a.game_id, a.applied) for a in plan.actions] == [("adoptee", False)]
    assert plan.adopted == 1
    assert client.list_runtimes().items == []

    done = client.reconcile()
    assert [(a.game_id, a.applied) for a in done.actions] == [("adoptee", True)]
    adopted = client.get_runtime("adoptee")
    assert adopted.status is RuntimeStatus.RUNNING
    assert adopted.current_container_id == adoptee.id
    assert adopted.current_image_ref == STUB
    (row,) = client.iter_operations(game_id="adoptee")
    assert (row.op_kind, row.op_source) == (OpKind.RECONCILE_ADOPT, OpSource.AUTO_RECONCILE)

    assert client.reconcile().actions == []  # converged
    for container in (foreign, other_cluster):
        container.reload()
        assert container.status == "running"
    assert [r.game_id for r in client.list_runtimes().items] == ["adoptee"]


def test_a_container_removed_while_the_service_was_down_gets_its_record_disposed(
    server: ServerProcess,
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    with RuntimeManagerClient(server.address) as client:
        record = client.start_runtime("vanished", STUB)
    assert server.stop() == 0
    docker_client.containers.get(record.current_container_id).remove(force=True)

    restarted = start_server(server_environment, tmp_path / "again.log")
    try:
        with RuntimeManagerClient(restarted.address) as client:
            # The start-up pass ran before the server reported SERVING.
            disposed = client.get_runtime("vanished")
            assert disposed.status is RuntimeStatus.REMOVED
            assert disposed.current_container_id == ""
            kinds = [op.op_kind for op in client.iter_operations(game_id="vanished")]
            assert kinds[0] is OpKind.RECONCILE_DISPOSE
    finally:
        restarted.stop()


def test_server_killed_mid_restart_converges_after_it_comes_back(
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    cluster: str,
    tmp_path: Path,
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_START_SETTLE"] = "3s"  # widens the window inside the inner start
    env["RTMANAGER_GAME_LEASE_TTL"] = "2s"  # the killed holder's lease expires soon
    first = start_server(env, tmp_path / "first.log")
    with RuntimeManagerClient(first.address) as client:
        client.start_runtime("phoenix", STUB)
    schema = env["RTMANAGER_POSTGRES_SCHEMA"]

    def restart() -> None:
        # The server dies under this call.
        with RuntimeManagerClient(first.address) as doomed, contextlib.suppress(Exception):
            doomed.restart_runtime("phoenix", source_ref="doomed")

    caller = threading.Thread(target=restart)
    caller.start()

    def inner_stop_committed() -> bool:
        with psycopg.connect(POSTGRES_DSN) as conn:
            row = conn.execute(
                f'SELECT 1 FROM "{schema}".operation_log '
                "WHERE source_ref = 'doomed' AND op_kind = 'stop' AND outcome = 'success'"
            ).fetchone()
        return row is not None

    eventually(inner_stop_committed, within=30, every=0.02)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    caller.join(timeout=60)

    second = start_server(env, tmp_path / "second.log")
    try:
        with RuntimeManagerClient(second.address) as client:
            time.sleep(2.2)  # the dead server's lease expires
            after = client.restart_runtime("phoenix", source_ref="retry")
            assert after.status is RuntimeStatus.RUNNING
            ours = docker_client.containers.list(
                all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
            )
            assert [c.id for c in ours] == [after.current_container_id], "orphan container"
            assert ours[0].status == "running"
            assert client.reconcile().actions == []
            rows = list(client.iter_operations(game_id="phoenix"))
            # The audit log explains every step: the interrupted restart's inner
            # stop, whatever the reconciler repaired, and the retried restart.
            assert {(r.op_kind, r.source_ref) for r in rows} >= {
                (OpKind.STOP, "doomed"),
                (OpKind.RESTART, "retry"),
                (OpKind.STOP, "retry"),
                (OpKind.START, "retry"),
            }
    finally:
        second.stop()


def test_ttl_cleanup_removes_exactly_the_expired_stopped_runtimes(
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_CONTAINER_TTL"] = "4s"
    env["RTMANAGER_CLEANUP_INTERVAL"] = "300ms"
    server = start_server(env, tmp_path / "server.log")
    state_root = Path(env["RTMANAGER_STATE_ROOT"])
    try:
        with RuntimeManagerClient(server.address) as client:
            old = client.start_runtime("ttl-old", STUB)
            client.start_runtime("ttl-new", STUB)
            client.start_runtime("ttl-running", STUB)
            client.stop_runtime("ttl-old")
            stopped_old = time.monotonic()
            time.sleep(2.5)
            client.stop_runtime("ttl-new")

            removed = eventually(
                lambda: (r := client.get_runtime("ttl-old")).status is RuntimeStatus.REMOVED and r,
                within=8,
                every=0.1,
            )
            assert time.monotonic() - stopped_old >= 4.0
            assert client.get_runtime("ttl-new").status is RuntimeStatus.STOPPED
            assert client.get_runtime("ttl-running").status is RuntimeStatus.RUNNING
            with pytest.raises(docker.errors.NotFound):
                docker_client.containers.get(old.current_container_id)
            assert (state_root / "ttl-old" / "started").exists()
            cleanup_rows = [
                op
                for op in client.iter_operations(op_kind=OpKind.CLEANUP_CONTAINER)
                if op.outcome is Outcome.SUCCESS
            ]
            assert [(op.game_id, op.op_source) for op in cleanup_rows] == [
                ("ttl-old", OpSource.AUTO_TTL)
            ]
            assert removed.removed_at is not None
    finally:
        server.stop()


def test_strictly_sequential_calls_under_read_load_are_never_turned_away(
    server: ServerProcess, docker_client: docker.DockerClient, cluster: str
) -> None:
    """One Game Master, one game, each call after the previous one returned.

    Every container exit here is caused by the service itself; the events
    listener must leave those to the operation that caused them and never
    hold the game's lease when the next call arrives.
    """
    game = "sequential"
    images = ["galaxy/engine-stub:1.0.0", "galaxy/engine-stub:1.0.1"]
    done = threading.Event()
    reads = [0, 0, 0]
    read_errors: list[BaseException] = []

    def read_load(index: int) -> None:
        with RuntimeManagerClient(server.address, timeout=30) as reader:
            while not done.is_set():
                try:
                    if index % 2:
                        reader.list_runtimes()
                    else:
                        with contextlib.suppress(NotFoundError):
                            reader.get_runtime(game)
                    reads[index] += 1
                except Exception as error:
                    read_errors.append(error)
                    return

    readers = [threading.Thread(target=read_load, args=(i,)) for i in range(3)]
    for reader in readers:
        reader.start()
    calls: list[str] = []
    conflicts: list[str] = []
    current = 0
    try:
        with RuntimeManagerClient(server.address, timeout=60) as client:

            def call(name: str, action: Callable[[], object]) -> None:
                calls.append(name)
                try:
                    action()
                except ConflictError as error:
                    conflicts.append(f"call {len(calls)} {name}: {error}")

            call("start", lambda: client.start_runtime(game, images[current]))
            for _ in range(9):
                image, other = images[current], images[1 - current]
                for _ in range(2):
                    call("stop", lambda: client.stop_runtime(game))
                    call("start", functools.partial(client.start_runtime, game, image))
                call("restart", lambda: client.restart_runtime(game))
                call("patch", functools.partial(client.patch_runtime, game, other))
                current = 1 - current
            final = client.get_runtime(game)
            rows = list(client.iter_operations(game_id=game))
            plan = client.reconcile(dry_run=True)
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=30)

    assert len(calls) == 55
    assert conflicts == []
    assert read_errors == [] and all(reads)
    # The record agrees with Docker: one container of ours, running, the record's.
    assert final.status is RuntimeStatus.RUNNING
    assert final.current_image_ref == images[current]
    ours = docker_client.containers.list(
        all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
    )
    assert [c.id for c in ours] == [final.current_container_id]
    assert ours[0].status == "running"
    assert ours[0].labels["com.galaxy.image_ref"] == images[current]
    assert plan.actions == []
    # Every exit was recorded by the operation that caused it, none by the listener.
    assert [r for r in rows if r.outcome is not Outcome.SUCCESS] == []
    assert [r for r in rows if r.op_source is OpSource.AUTO_RECONCILE] == []
