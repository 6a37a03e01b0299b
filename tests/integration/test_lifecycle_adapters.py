"""Lifecycle services wired to the real adapters in-process (no gRPC in between)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
import psycopg
import pytest
import redis

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.adapters.redis.leases import RedisGameLeases
from rtmanager.deadlines import deadline_scope
from rtmanager.domain import labels
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.cleanup import CleanupRequest, CleanupService
from rtmanager.lifecycle.common import LifecycleDeps, LifecycleSettings
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.lifecycle.restart import RecreateService, RestartRequest, RestartService
from rtmanager.lifecycle.start import StartRequest, StartService
from rtmanager.lifecycle.stop import StopRequest, StopService
from rtmanager.ports import EngineUser, PullPolicy
from rtmanager.telemetry import Telemetry
from tests.conftest import DOCKER_HOST, POSTGRES_DSN, REDIS_URL, TEST_LABEL

pytestmark = pytest.mark.integration

STUB = "galaxy/engine-stub:1.0.0"
ENGINE_MEMORY = 64 * 1024 * 1024


@dataclass
class Wired:
    start: StartService
    stop: StopService
    cleanup: CleanupService
    reconciler: Reconciler
    leases: RedisGameLeases
    schema: str
    settings: LifecycleSettings
    restart: RestartService
    engine: DockerEngineAdapter


# Wires the services again with some settings changed.
Rewire = Callable[..., Wired]


@pytest.fixture
def rewire(
    pg_schema: str,
    redis_prefix: str,
    cluster: str,
    state_root: Path,
    docker_cleanup: str,
) -> Iterator[Rewire]:
    apply_migrations(POSTGRES_DSN, pg_schema, Path("migrations"))
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=4, timeout=timedelta(seconds=5))
    client = redis.Redis.from_url(REDIS_URL)
    engine = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=cluster)
    leases = RedisGameLeases(client, prefix=redis_prefix)
    telemetry = Telemetry()
    deps = LifecycleDeps(
        recorder=OperationRecorder(PostgresUnitOfWorkFactory(pool), telemetry),
        lock=GameLock(leases, timedelta(seconds=10)),
        engine=engine,
        settings=LifecycleSettings(
            cluster=cluster,
            engine_network=f"galaxy-{cluster}",
            engine_port=8080,
            state_root=state_root,
            engine_state_mount=Path("/var/lib/galaxy-game"),
            image_allowlist=("galaxy/",),
            image_pull_policy=PullPolicy.NEVER,
            engine_memory=ENGINE_MEMORY,
            engine_cpus=0.5,
            engine_pids=64,
            engine_user=EngineUser(65534, 65534),
            engine_log_max_size=1024 * 1024,
            engine_log_max_files=2,
            start_timeout=timedelta(seconds=20),
            stop_timeout=timedelta(seconds=5),
            start_settle=timedelta(milliseconds=300),
            container_labels={TEST_LABEL: docker_cleanup},
        ),
    )

    def wire(**changes: Any) -> Wired:
        rewired = replace(deps, settings=replace(deps.settings, **changes))
        start, stop = StartService(rewired), StopService(rewired)
        return Wired(
            start,
            stop,
            CleanupService(rewired, stop=stop),
            Reconciler(rewired, telemetry=telemetry),
            leases,
            pg_schema,
            rewired.settings,
            RestartService(RecreateService(rewired, stop=stop, start=start)),
            engine,
        )

    try:
        yield wire
    finally:
        pool.close()
        client.close()
        engine.close()


@pytest.fixture
def wired(rewire: Rewire) -> Wired:
    return rewire()


def rows(schema: str, game_id: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(POSTGRES_DSN) as conn:
        return [
            (str(kind), str(outcome), str(code or ""))
            for kind, outcome, code in conn.execute(
                f'SELECT op_kind, outcome, error_code FROM "{schema}".operation_log '
                "WHERE game_id = %s ORDER BY id",
                (game_id,),
            ).fetchall()
        ]


def test_start_and_stop_commit_each_record_change_with_its_audit_row(
    wired: Wired, test_id: str
) -> None:
    game_id = f"real-1-{test_id}"  # container names are per engine, shared by every run
    started = wired.start.handle(StartRequest(game_id, STUB, OpSource.GM_REST, "r1"))
    assert started.ok and started.record is not None
    assert started.record.status is RuntimeStatus.RUNNING
    stopped = wired.stop.handle(StopRequest(game_id, OpSource.GM_REST))
    assert stopped.ok and stopped.record is not None
    assert stopped.record.status is RuntimeStatus.STOPPED
    assert rows(wired.schema, game_id) == [("start", "success", ""), ("stop", "success", "")]


def parents_and_events(schema: str, game_id: str) -> list[tuple[object, ...]]:
    """(op_kind, parent_op_kind, parent_operation_id, operation id, event id) by operation id."""
    with psycopg.connect(POSTGRES_DSN) as conn:
        return conn.execute(
            f"SELECT o.op_kind, o.parent_op_kind, o.parent_operation_id, o.id, e.id"
            f' FROM "{schema}".operation_log o'
            f' LEFT JOIN "{schema}".runtime_events e ON e.operation_id = o.id'
            " WHERE o.game_id = %s ORDER BY o.id",
            (game_id,),
        ).fetchall()


@pytest.mark.parametrize("deadline", [None, 5.0], ids=["no-deadline", "caller-deadline"])
def test_a_restart_draws_its_id_before_its_inner_rows_and_publishes_its_end(
    wired: Wired, deadline: float | None, test_id: str
) -> None:
    # A game of its own: both cases may run at once, and container names are global.
    game_id = f"real-r{test_id}"
    assert wired.start.handle(StartRequest(game_id, STUB, OpSource.GM_REST)).ok
    # A caller's deadline gives every unit of work a timeout of its own (a
    # transaction begun with SET LOCAL), drawing the id included.
    with deadline_scope(deadline):
        restarted = wired.restart.handle(RestartRequest(game_id, OpSource.GM_REST, "gm-1"))
    assert restarted.ok, restarted.failure

    start, outer, stop, inner_start = parents_and_events(wired.schema, game_id)
    assert (start[0], start[1]) == ("start", None)
    assert outer[:3] == ("restart", None, None) and outer[3] == restarted.operation_id
    assert stop[:3] == ("stop", "restart", outer[3])
    assert inner_start[:3] == ("start", "restart", outer[3])
    # Every row has its event; the restart's comes last.
    event_ids = [start[4], stop[4], inner_start[4], outer[4]]
    assert None not in event_ids and event_ids == sorted(event_ids)  # type: ignore[type-var]


def test_a_lease_held_by_another_replica_makes_the_start_a_retryable_conflict(
    wired: Wired, docker_client: docker.DockerClient, cluster: str, test_id: str
) -> None:
    game_id = f"real-2-{test_id}"  # container names are per engine, shared by every run
    other = wired.leases.acquire(game_id, timedelta(seconds=30))
    assert other is not None
    busy = wired.start.handle(StartRequest(game_id, STUB, OpSource.LOBBY_STREAM, "1-0"))
    assert busy.failure is not None
    assert (busy.failure.code, busy.failure.race) == (ErrorCode.CONFLICT, True)
    assert (
        docker_client.containers.list(
            all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        == []
    )
    assert wired.leases.release(other)
    assert wired.start.handle(StartRequest(game_id, STUB, OpSource.LOBBY_STREAM, "1-0")).ok
    assert rows(wired.schema, game_id) == [
        ("start", "failure", "conflict"),
        ("start", "success", ""),
    ]


def test_an_observed_exit_marks_only_the_records_current_container_stopped(
    wired: Wired, docker_client: docker.DockerClient, test_id: str
) -> None:
    game_id = f"real-3-{test_id}"  # container names are per engine, shared by every run
    started = wired.start.handle(StartRequest(game_id, STUB, OpSource.GM_REST))
    assert started.record is not None
    container_id = started.record.current_container_id
    assert wired.reconciler.observe_exit(game_id, "some-other-id", event="die", exit_code=1) is None
    docker_client.containers.get(container_id).kill()
    result = wired.reconciler.observe_exit(game_id, container_id, event="die", exit_code=137)
    assert result is not None and result.ok and result.record is not None
    assert result.record.status is RuntimeStatus.STOPPED
    assert rows(wired.schema, game_id)[-1] == (str(OpKind.STOP), "success", "")
    assert wired.reconciler.run_pass().actions == ()


def status_of(schema: str, game_id: str) -> str:
    with psycopg.connect(POSTGRES_DSN) as conn:
        row = conn.execute(
            f'SELECT status FROM "{schema}".runtime_records WHERE game_id = %s', (game_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def wait_for_file(path: Path, timeout: float = 10.0) -> os.stat_result:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)
    return path.stat()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_started_engine_is_hardened_as_configured_and_writes_its_state_as_its_user(
    rewire: Rewire, docker_client: docker.DockerClient, test_id: str, read_only: bool
) -> None:
    wired = rewire(engine_read_only=read_only)
    game = f"hard-{test_id}"  # container names are shared by every test on the host

    started = wired.start.handle(StartRequest(game, STUB, OpSource.GM_REST))

    assert started.ok and started.record is not None, started.failure
    attrs = docker_client.containers.get(started.record.current_container_id).attrs
    config, host = attrs["Config"], attrs["HostConfig"]
    assert config["User"] == "65534:65534"
    assert host["Memory"] == ENGINE_MEMORY
    assert host["MemorySwap"] == ENGINE_MEMORY  # no swap
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": str(1024 * 1024), "max-file": "2"},
    }
    assert host["ReadonlyRootfs"] is read_only
    assert ("/tmp" in (host.get("Tmpfs") or {})) is read_only
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges=true"]
    assert host["Privileged"] is False
    assert host["PidsLimit"] == 64
    assert host["NanoCpus"] == 500_000_000
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "no"
    assert attrs["State"]["Running"] is True
    # The state directory was given to the engine's user, who wrote into it.
    state_dir = wired.settings.state_dir(game)
    assert (state_dir.stat().st_uid, state_dir.stat().st_gid) == (65534, 65534)
    written = wait_for_file(state_dir / "started")
    assert (written.st_uid, written.st_gid) == (65534, 65534)


CHATTR = shutil.which("chattr")


def chattr(flag: str, path: Path) -> bool:
    assert CHATTR is not None
    return (
        subprocess.run([CHATTR, flag, str(path)], capture_output=True, check=False).returncode == 0
    )


@pytest.mark.skipif(CHATTR is None, reason="needs chattr (e2fsprogs)")
def test_cleanup_with_state_removal_names_an_immutable_file_it_could_not_remove(
    rewire: Rewire, docker_client: docker.DockerClient, test_id: str
) -> None:
    # Tests run as root, whom permissions do not stop: an immutable file
    # stops even root.
    wired = rewire(remove_state_on_cleanup=True)
    game = f"keep-{test_id}"
    started = wired.start.handle(StartRequest(game, STUB, OpSource.GM_REST))
    assert started.ok and started.record is not None, started.failure
    assert wired.stop.handle(StopRequest(game, OpSource.GM_REST)).ok
    state_dir = wired.settings.state_dir(game)
    wait_for_file(state_dir / "started")
    (state_dir / "saves").mkdir()
    locked = state_dir / "saves" / "locked.dat"
    locked.write_text("turn 42")
    if not chattr("+i", locked):
        pytest.skip(f"the file system of {state_dir} has no immutable files")
    try:
        result = wired.cleanup.handle(CleanupRequest(game, OpSource.ADMIN_REST))

        assert result.failure is not None
        assert result.failure.code is ErrorCode.INTERNAL
        assert f"{locked}: Operation not permitted" in result.failure.message
        assert "the runtime was removed" in result.failure.message
        assert locked.read_text() == "turn 42"
        assert not (state_dir / "started").exists()
    finally:
        chattr("-i", locked)
    assert status_of(wired.schema, game) == "removed"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(started.record.current_container_id)
    assert rows(wired.schema, game) == [
        ("start", "success", ""),
        ("stop", "success", ""),
        ("cleanup_container", "success", ""),
        ("cleanup_container", "failure", "internal"),
    ]


# --- a start asks Docker only what it does not know ---------------------------------


def docker_requests(engine: DockerEngineAdapter) -> list[str]:
    """Record "METHOD path" of every request the adapter's client sends from now on."""
    seen: list[str] = []

    def record(response: Any, *args: object, **kwargs: object) -> None:
        request = response.request
        path = re.sub(r"^/v[\d.]+/", "/", request.path_url.split("?")[0])
        seen.append(f"{request.method} {re.sub(r'/[0-9a-f]{64}(?=/|$)', '/{id}', path)}")

    engine._api().hooks["response"].append(record)
    return seen


def start_and_remove(wired: Wired, game_id: str, image_ref: str = STUB) -> None:
    started = wired.start.handle(StartRequest(game_id, image_ref, OpSource.GM_REST))
    assert started.ok, started.failure
    assert wired.cleanup.handle(CleanupRequest(game_id, OpSource.GM_REST, force=True)).ok


def test_a_start_after_the_first_sends_docker_a_create_a_start_and_one_inspect(
    rewire: Rewire, test_id: str
) -> None:
    # With settle 0s a start returns at the first inspect that shows it running.
    wired = rewire(start_settle=timedelta(0))
    start_and_remove(wired, f"q{test_id}")  # the image is seen, the network settled
    requests = docker_requests(wired.engine)

    assert wired.start.handle(StartRequest(f"r{test_id}", STUB, OpSource.GM_REST)).ok

    assert requests == [
        "POST /containers/create",
        "POST /containers/{id}/start",
        "GET /containers/{id}/json",
    ]


def tag_stub(client: docker.DockerClient, ref: str) -> None:
    repository, _, tag = ref.rpartition(":")
    assert client.images.get(STUB).tag(repository, tag)


@pytest.mark.parametrize(
    ("policy", "code"),
    [(PullPolicy.NEVER, ErrorCode.IMAGE_PULL_FAILED), (PullPolicy.IF_MISSING, None)],
    ids=["never", "if-missing"],
)
def test_a_start_whose_image_was_removed_since_the_last_start_follows_the_pull_policy(
    rewire: Rewire,
    docker_client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
    test_id: str,
    policy: PullPolicy,
    code: ErrorCode | None,
) -> None:
    wired = rewire(image_pull_policy=policy)
    ref = f"galaxy/remembered-{test_id}:1.0.0"
    tag_stub(docker_client, ref)
    pulls: list[str] = []

    def pull(image_ref: str) -> None:
        # No registry here: a pull puts the image back as a registry would.
        pulls.append(image_ref)
        tag_stub(docker_client, image_ref)

    monkeypatch.setattr(wired.engine, "_pull", pull)
    try:
        start_and_remove(wired, f"a{test_id}", ref)
        docker_client.images.remove(ref)  # behind rtmanager's back

        result = wired.start.handle(StartRequest(f"b{test_id}", ref, OpSource.GM_REST))

        if code is None:
            assert result.ok, result.failure
            assert pulls == [ref]
        else:
            assert result.failure is not None and result.failure.code is code
            assert "never" in result.failure.message
            assert pulls == []
            assert (
                docker_client.containers.list(all=True, filters={"name": f"galaxy-game-b{test_id}"})
                == []
            )
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(ref)


def test_a_start_after_the_engine_network_was_removed_creates_it_again(
    wired: Wired, docker_client: docker.DockerClient, test_id: str
) -> None:
    network = wired.settings.engine_network
    start_and_remove(wired, f"a{test_id}")
    before = docker_client.networks.get(network)
    before.remove()  # behind rtmanager's back

    started = wired.start.handle(StartRequest(f"b{test_id}", STUB, OpSource.GM_REST))

    assert started.ok, started.failure
    assert started.record is not None
    (after,) = docker_client.networks.list(names=[network])
    assert after.id != before.id
    container = docker_client.containers.get(started.record.current_container_id)
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [network]
    assert container.attrs["NetworkSettings"]["Networks"][network]["NetworkID"] == after.id


def test_a_start_whose_name_is_held_by_a_container_of_no_rtmanager_is_conflict(
    wired: Wired, docker_client: docker.DockerClient, test_id: str
) -> None:
    start_and_remove(wired, f"a{test_id}")  # the image is seen, the network settled
    game_id = f"b{test_id}"
    foreign = docker_client.containers.create(
        STUB, name=f"galaxy-game-{game_id}", labels={TEST_LABEL: test_id}, network_mode="none"
    )

    result = wired.start.handle(StartRequest(game_id, STUB, OpSource.GM_REST))

    assert result.failure is not None
    assert (result.failure.code, result.failure.race) == (ErrorCode.CONFLICT, False)
    assert "does not own is in the way" in result.failure.message
    foreign.reload()
    assert foreign.status == "created"  # untouched
    assert rows(wired.schema, game_id) == [("start", "failure", "conflict")]


def test_a_start_whose_name_is_held_by_an_orphan_of_ours_removes_it_and_starts(
    wired: Wired, docker_client: docker.DockerClient, test_id: str, cluster: str
) -> None:
    game_id = f"b{test_id}"
    # Left behind by an operation interrupted before it could record it.
    orphan = docker_client.containers.create(
        STUB,
        name=f"galaxy-game-{game_id}",
        labels={
            **labels.engine_labels(cluster=cluster, game_id=game_id, image_ref=STUB),
            TEST_LABEL: test_id,
        },
        network_mode="none",
    )
    assert orphan.id is not None

    started = wired.start.handle(StartRequest(game_id, STUB, OpSource.GM_REST))

    assert started.ok, started.failure
    assert started.record is not None and started.record.current_container_id != orphan.id
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(orphan.id)
