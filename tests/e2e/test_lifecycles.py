"""Every lifecycle through a real server process and the project's client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from rtmanager.client import (
    ConflictError,
    ContainerStartFailedError,
    NotFoundError,
    RuntimeManagerClient,
    SemverPatchOnlyError,
    ServiceUnavailableError,
)
from rtmanager.domain.operation import OpKind, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from tests.e2e.conftest import ServerProcess, eventually, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[RuntimeManagerClient]:
    with RuntimeManagerClient(server.address, timeout=60) as client:
        yield client


def test_start_creates_a_hardened_labelled_engine_container(
    client: RuntimeManagerClient,
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    cluster: str,
) -> None:
    record = client.start_runtime("alpha", f"{STUB}:1.0.0", source_ref="req-1")

    assert record.status is RuntimeStatus.RUNNING
    assert record.engine_endpoint == "http://galaxy-game-alpha:8080"
    network = server_environment["RTMANAGER_ENGINE_NETWORK"]
    assert record.docker_network == network
    state_dir = Path(server_environment["RTMANAGER_STATE_ROOT"]) / "alpha"
    assert record.state_path == str(state_dir)

    attrs = docker_client.containers.get(record.current_container_id).attrs
    config, host = attrs["Config"], attrs["HostConfig"]
    assert attrs["Name"] == "/galaxy-game-alpha"
    assert config["Hostname"] == "galaxy-game-alpha"
    assert attrs["State"]["Running"] is True
    assert config["Labels"]["com.galaxy.owner"] == "rtmanager"
    assert config["Labels"]["com.galaxy.rtmanager.cluster"] == cluster
    assert config["Labels"]["com.galaxy.game_id"] == "alpha"
    assert config["Labels"]["com.galaxy.image_ref"] == f"{STUB}:1.0.0"
    assert "GALAXY_GAME_ID=alpha" in config["Env"]
    assert "GALAXY_STATE_DIR=/var/lib/galaxy-game" in config["Env"]
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/var/lib/galaxy-game"]["Source"] == str(state_dir)
    assert mounts["/var/lib/galaxy-game"]["RW"] is True
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["CapDrop"] == ["ALL"]
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
    assert host["Privileged"] is False
    assert host["PidsLimit"] > 0 and host["Memory"] > 0 and host["NanoCpus"] > 0
    # On by default: an unprivileged user, no swap, rotated logs.
    assert config["User"] == "65534:65534"
    assert host["MemorySwap"] == host["Memory"]
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": str(10 * 1024 * 1024), "max-file": "3"},
    }
    assert host["ReadonlyRootfs"] is False
    endpoint = attrs["NetworkSettings"]["Networks"][network]
    assert "galaxy-game-alpha" in endpoint["Aliases"]
    assert docker_client.networks.get(network).attrs["Internal"] is True
    # The engine wrote into its state directory through the bind mount, as its user.
    written = (state_dir / "started").stat()
    assert (written.st_uid, written.st_gid) == (65534, 65534)


def test_start_replay_is_idempotent_and_stop_stops(
    client: RuntimeManagerClient, docker_client: docker.DockerClient
) -> None:
    first = client.start_runtime("beta", f"{STUB}:1.0.0")
    again = client.start_runtime("beta", f"{STUB}:1.0.0")
    assert again.current_container_id == first.current_container_id
    with pytest.raises(ConflictError):
        client.start_runtime("beta", f"{STUB}:1.0.1")

    stopped = client.stop_runtime("beta")
    assert stopped.status is RuntimeStatus.STOPPED
    assert stopped.stopped_at is not None
    container = docker_client.containers.get(first.current_container_id)
    assert container.attrs["State"]["Running"] is False
    assert client.stop_runtime("beta").status is RuntimeStatus.STOPPED  # idempotent

    ops = list(client.iter_operations(game_id="beta"))
    assert [(op.op_kind, op.outcome) for op in reversed(ops)] == [
        (OpKind.START, Outcome.SUCCESS),
        (OpKind.START, Outcome.SUCCESS),
        (OpKind.START, Outcome.FAILURE),
        (OpKind.STOP, Outcome.SUCCESS),
        (OpKind.STOP, Outcome.SUCCESS),
    ]
    assert ops[2].error_code == "conflict"


def test_restart_changes_the_container_but_not_the_endpoint(
    client: RuntimeManagerClient, docker_client: docker.DockerClient
) -> None:
    before = client.start_runtime("gamma", f"{STUB}:1.0.0")
    after = client.restart_runtime("gamma", source_ref="gm-req-9")

    assert after.status is RuntimeStatus.RUNNING
    assert after.current_container_id != before.current_container_id
    assert after.engine_endpoint == before.engine_endpoint
    assert after.created_at == before.created_at
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(before.current_container_id)
    assert docker_client.containers.get(after.current_container_id).status == "running"

    restart_ops = [
        op for op in client.iter_operations(game_id="gamma") if op.source_ref == "gm-req-9"
    ]
    assert sorted(op.op_kind for op in restart_ops) == sorted(
        [OpKind.RESTART, OpKind.STOP, OpKind.START]
    )


def test_patch_accepts_a_patch_version_and_refuses_a_minor_one(
    client: RuntimeManagerClient, docker_client: docker.DockerClient
) -> None:
    client.start_runtime("delta", f"{STUB}:1.0.0")
    patched = client.patch_runtime("delta", f"{STUB}:1.0.1")
    assert patched.current_image_ref == f"{STUB}:1.0.1"
    env = docker_client.containers.get(patched.current_container_id).attrs["Config"]["Env"]
    assert "ENGINE_VERSION=1.0.1" in env

    with pytest.raises(SemverPatchOnlyError) as caught:
        client.patch_runtime("delta", f"{STUB}:1.1.0")
    assert caught.value.code == "semver_patch_only"
    unchanged = client.get_runtime("delta")
    assert unchanged.current_container_id == patched.current_container_id
    assert unchanged.current_image_ref == f"{STUB}:1.0.1"


def test_start_of_a_crashing_engine_fails_and_leaves_no_container(
    client: RuntimeManagerClient, docker_client: docker.DockerClient, cluster: str
) -> None:
    with pytest.raises(ContainerStartFailedError) as caught:
        client.start_runtime("epsilon", "galaxy/engine-crash:1.0.0")
    assert caught.value.code == "container_start_failed"
    assert "refusing to start" in caught.value.message
    leftovers = docker_client.containers.list(
        all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
    )
    assert [c.name for c in leftovers] == []
    with pytest.raises(NotFoundError):
        client.get_runtime("epsilon")


def test_cleanup_keeps_the_record_as_removed_and_the_state_on_disk(
    client: RuntimeManagerClient,
    docker_client: docker.DockerClient,
    server_environment: dict[str, str],
) -> None:
    started = client.start_runtime("zeta", f"{STUB}:1.0.0")
    with pytest.raises(ConflictError):
        client.cleanup_runtime("zeta")  # running, no force
    removed = client.cleanup_runtime("zeta", force=True)

    assert removed.status is RuntimeStatus.REMOVED
    assert removed.removed_at is not None
    assert removed.current_container_id == ""
    assert client.get_runtime("zeta").status is RuntimeStatus.REMOVED
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(started.current_container_id)
    state_dir = Path(server_environment["RTMANAGER_STATE_ROOT"]) / "zeta"
    assert (state_dir / "started").exists()
    assert client.cleanup_runtime("zeta").status is RuntimeStatus.REMOVED  # idempotent
    with pytest.raises(ConflictError):
        client.start_runtime("zeta", f"{STUB}:1.0.0")


def test_concurrent_restarts_serialize_and_leave_an_exact_audit_trail(
    client: RuntimeManagerClient, docker_client: docker.DockerClient, cluster: str
) -> None:
    client.start_runtime("eta", f"{STUB}:1.0.0")
    barrier = threading.Barrier(20)
    outcomes: list[str] = []
    lock = threading.Lock()

    def restart(index: int) -> None:
        barrier.wait()
        try:
            client.restart_runtime("eta", source_ref=f"attempt-{index}")
            outcome = "ok"
        except ConflictError as error:
            assert error.retryable, error.message  # a busy game is ABORTED
            outcome = "conflict"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=restart, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(outcomes) == 20
    assert outcomes.count("ok") >= 1
    final = client.get_runtime("eta")
    assert final.status is RuntimeStatus.RUNNING
    ours = docker_client.containers.list(
        all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
    )
    assert [c.id for c in ours] == [final.current_container_id]
    assert ours[0].status == "running"

    restart_rows = list(client.iter_operations(game_id="eta", op_kind=OpKind.RESTART))
    assert len(restart_rows) == 20
    assert sorted(row.source_ref for row in restart_rows) == sorted(
        f"attempt-{i}" for i in range(20)
    )
    succeeded = [row for row in restart_rows if row.outcome is Outcome.SUCCESS]
    assert len(succeeded) == outcomes.count("ok")
    assert all(row.error_code == "conflict" for row in restart_rows if row not in succeeded)
    # Each successful restart left exactly one inner stop and one inner start.
    for row in succeeded:
        inner = [
            op.op_kind
            for op in client.iter_operations(game_id="eta")
            if op.source_ref == row.source_ref and op.op_kind is not OpKind.RESTART
        ]
        assert sorted(inner) == sorted([OpKind.STOP, OpKind.START])


def test_a_start_whose_caller_gives_up_stops_early_and_leaves_nothing_behind(
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    cluster: str,
    tmp_path: Path,
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_START_SETTLE"] = "5s"  # longer than the caller waits
    server = start_server(env, tmp_path / "server.log")
    try:
        with RuntimeManagerClient(server.address) as client:
            with pytest.raises(ServiceUnavailableError):  # DEADLINE_EXCEEDED on the client
                client.start_runtime("hasty", f"{STUB}:1.0.0", timeout=1.0)
            row = eventually(
                lambda: next(iter(client.iter_operations(game_id="hasty")), None), within=10
            )
            assert (row.op_kind, row.error_code) == (OpKind.START, "service_unavailable")
            assert "deadline" in row.error_message
            with pytest.raises(NotFoundError):
                client.get_runtime("hasty")
        ours = docker_client.containers.list(
            all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        assert ours == []
    finally:
        server.stop()
