"""The swarm engine backend (SPEC §10) against a real one-node swarm of the harness.

One private dockerd in a network namespace (tests/support/swarm.py) is made
a swarm manager; the adapter talks to it through its unix socket. The
checks follow the `EngineBackend` port: network, create (0 replicas),
start (the running task's container), inspect by service id, name and
container id, the container's labels and hardening on the node, logs,
events by polling, stop (scale to 0), remove (service, not volume),
ownership (another cluster's service and an unlabelled one are never
listed as ours), a failing engine and the manager check of `ping`.

Root only; skipped where the harness's tools are missing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import docker
import docker.types
import pytest

from rtmanager.adapters.swarm.engine import LAST_CONTAINER, SwarmEngineAdapter
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import ContainerStartFailed, ImagePullFailed, ServiceUnavailable
from rtmanager.ports import (
    BackendMismatch,
    ContainerEvent,
    ContainerSpec,
    EngineUser,
    PullPolicy,
)
from tests.conftest import needs_swarm_tools
from tests.support.swarm import SwarmCluster

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.timeout(180),
    needs_swarm_tools(),
]

STUB = "galaxy/engine-stub:1.0.0"
CRASH = "galaxy/engine-crash:1.0.0"
NETWORK = "galaxy-engines"
MOUNT = "/var/lib/galaxy-game"
CLUSTER = "swtest"
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], *, timeout: float = 30.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmCluster]:
    log_dir: Path = tmp_path_factory.mktemp("swarm-backend")
    with SwarmCluster(nodes=1, log_dir=log_dir, images=(STUB, CRASH)) as cluster:
        yield cluster


@pytest.fixture
def adapter(swarm: SwarmCluster) -> Iterator[SwarmEngineAdapter]:
    backend = SwarmEngineAdapter(
        base_url=swarm.manager_url,
        cluster=CLUSTER,
        constraints=["node.role==manager"],
        stop_grace=timedelta(seconds=5),
        start_wait=timedelta(seconds=30),
        poll_interval=timedelta(milliseconds=300),
    )
    yield backend
    backend.close()


@pytest.fixture
def manager(swarm: SwarmCluster) -> Iterator[docker.DockerClient]:
    client = swarm.manager_client()
    yield client
    for service in client.services.list():
        service.remove()
    client.close()


def spec(game_id: str, image: str = STUB, *, read_only: bool = True) -> ContainerSpec:
    name = f"galaxy-game-{game_id}"
    return ContainerSpec(
        name=name,
        image_ref=image,
        network=NETWORK,
        network_alias=name,
        labels=galaxy_labels.engine_labels(cluster=CLUSTER, game_id=game_id, image_ref=image),
        env={"GALAXY_GAME_ID": game_id, "GALAXY_STATE_DIR": MOUNT, "ENGINE_PORT": "8080"},
        state_host_path="",
        state_mount_path=MOUNT,
        memory_bytes=64 * 1024 * 1024,
        nano_cpus=100_000_000,
        pids_limit=64,
        user=EngineUser(0, 0),
        log_max_bytes=1024 * 1024,
        log_max_files=2,
        read_only_rootfs=read_only,
    )


def test_the_port_on_a_one_node_swarm(
    swarm: SwarmCluster, adapter: SwarmEngineAdapter, manager: docker.DockerClient
) -> None:
    adapter.ping()
    assert adapter.capabilities.host_state_dirs is False
    adapter.ensure_image(STUB, PullPolicy.NEVER)
    with pytest.raises(ImagePullFailed):
        adapter.ensure_image("galaxy/absent:9.9.9", PullPolicy.NEVER)

    adapter.ensure_network(NETWORK, {galaxy_labels.OWNER: galaxy_labels.OWNER_VALUE})
    adapter.ensure_network(NETWORK, {})
    network = manager.networks.get(NETWORK)
    assert (network.attrs["Driver"], network.attrs["Scope"]) == ("overlay", "swarm")
    assert network.attrs["Internal"] is True and network.attrs["Attachable"] is True

    # Services of another cluster and without labels: never ours.
    for name, labels in (
        (
            "galaxy-game-foreign",
            galaxy_labels.engine_labels(cluster="other", game_id="foreign", image_ref=STUB),
        ),
        ("galaxy-game-bare", {}),
    ):
        manager.services.create(
            STUB,
            name=name,
            labels=labels,
            container_labels=labels,
            mode=docker.types.ServiceMode("replicated", replicas=0),
        )

    service_id = adapter.create(spec("g1"))
    created = adapter.inspect("galaxy-game-g1")
    assert created is not None and created.owned and not created.running
    assert created.id == service_id and created.game_id == "g1"
    attrs = manager.services.get(service_id).attrs["Spec"]
    assert attrs["Mode"]["Replicated"]["Replicas"] == 0
    template = attrs["TaskTemplate"]
    assert template["RestartPolicy"]["Condition"] == "none"
    assert template["Placement"]["Constraints"] == ["node.role==manager"]
    assert template["Resources"]["Limits"]["MemoryBytes"] == 64 * 1024 * 1024
    assert template["Resources"]["Reservations"]["NanoCPUs"] == 100_000_000
    assert template["Networks"][0]["Aliases"] == ["galaxy-game-g1"]
    mount = template["ContainerSpec"]["Mounts"][0]
    assert (mount["Type"], mount["Source"], mount["Target"]) == ("volume", "galaxy-state-g1", MOUNT)

    container_id = adapter.start(service_id)
    assert len(container_id) == 64
    info = adapter.inspect(container_id)
    assert info is not None and info.running and info.owned and info.id == container_id
    assert info.node_id == swarm.node(1).node_id
    assert info.node_hostname == swarm.node(1).hostname
    assert info.started_at is not None and info.exit_code is None
    assert adapter.inspect(service_id) == adapter.inspect("galaxy-game-g1")
    by_service = adapter.inspect(service_id)
    assert by_service is not None and by_service.id == container_id
    assert adapter.owns(container_id) is True

    # The container on the node carries our labels and the hardening.
    node_client = swarm.node(1).client()
    try:
        container = node_client.containers.get(container_id)
        for key, value in spec("g1").labels.items():
            assert container.labels[key] == value
        host = container.attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"]
        assert host["ReadonlyRootfs"] is True
        assert host["Init"] is True
        assert host["PidsLimit"] == 64
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-file": "2", "max-size": "1048576"},
        }
        assert container.attrs["Config"]["User"] == "0:0"
    finally:
        node_client.close()

    listed = {i.game_id: i for i in adapter.list_owned()}
    assert set(listed) == {"g1"}
    assert listed["g1"].id == container_id and listed["g1"].running
    assert listed["g1"].node_id == swarm.node(1).node_id
    foreign = adapter.inspect("galaxy-game-foreign")
    bare = adapter.inspect("galaxy-game-bare")
    assert foreign is not None and not foreign.owned
    assert bare is not None and not bare.owned

    assert "engine-stub" in wait_for(
        lambda: adapter.logs_tail(container_id, 5), what="the engine's output"
    )

    # Events by polling: the stop shows as `die` of that container.
    stream = adapter.follow_events()
    seen: list[ContainerEvent] = []
    reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    reader.start()
    adapter.stop(container_id, timedelta(seconds=5))
    stopped = adapter.inspect(container_id)
    assert stopped is not None and not stopped.running and stopped.id == container_id
    wait_for(
        lambda: any(e.action == "die" and e.container_id == container_id for e in seen),
        what="a die event",
    )
    stream.close()
    reader.join(5)
    assert all(e.game_id == "g1" for e in seen)
    spec_after = manager.services.get(service_id).attrs["Spec"]
    assert spec_after["Mode"]["Replicated"]["Replicas"] == 0
    assert spec_after["Labels"][LAST_CONTAINER] == container_id
    adapter.stop(container_id, timedelta(seconds=5))  # again: fine

    adapter.remove(container_id)
    assert adapter.inspect(container_id) is None
    assert adapter.inspect("galaxy-game-g1") is None
    adapter.remove(container_id)  # gone: fine
    assert "galaxy-state-g1" in swarm.node(1).docker("volume", "ls", "-q").split()

    # Others' services are untouched.
    names = {s.name for s in manager.services.list()}
    assert {"galaxy-game-foreign", "galaxy-game-bare"} <= names


def test_a_crashing_engine_fails_its_start_with_its_output(
    adapter: SwarmEngineAdapter, manager: docker.DockerClient
) -> None:
    adapter.ensure_network(NETWORK, {})
    service_id = adapter.create(spec("crash", CRASH, read_only=False))
    try:
        container_id = adapter.start(service_id)
    except ContainerStartFailed as failure:
        assert "refusing to start" in failure.message or "code 3" in failure.message
    else:
        info = wait_for(
            lambda: (i := adapter.inspect(container_id)) is not None and not i.running and i,
            what="the crash to show",
        )
        assert info.exit_code == 3
    adapter.remove(service_id, force=True)
    assert adapter.inspect(service_id) is None


def test_a_running_engine_is_removed_only_by_force(adapter: SwarmEngineAdapter) -> None:
    from rtmanager.domain.errors import Conflict

    adapter.ensure_network(NETWORK, {})
    container_id = adapter.start(adapter.create(spec("busy")))
    with pytest.raises(Conflict):
        adapter.remove(container_id)
    adapter.remove(container_id, force=True)
    assert adapter.inspect("galaxy-game-busy") is None


def test_ping_needs_a_reachable_swarm_manager(tmp_path: Path) -> None:
    gone = SwarmEngineAdapter(base_url=f"unix://{tmp_path}/none.sock", cluster=CLUSTER)
    with pytest.raises(ServiceUnavailable) as raised:
        gone.ping()
    assert not isinstance(raised.value, BackendMismatch)
    with SwarmCluster(nodes=1, swarm=False, images=(), log_dir=tmp_path / "plain") as plain:
        not_swarm = SwarmEngineAdapter(base_url=plain.manager_url, cluster=CLUSTER)
        try:
            with pytest.raises(BackendMismatch, match="not a swarm manager"):
                not_swarm.ping()
        finally:
            not_swarm.close()
