"""The swarm engine backend (SPEC §10) against the local engine as a one-node swarm.

The local engine (DOCKER_HOST) is made a one-node swarm manager for the run
(the `local_swarm` fixture, tests/support/local_swarm.py); single-host
tests may run on it at the same time. Each test has its own cluster,
network, game ids (so service names) and labels, and its services,
network and volumes are removed afterwards. The checks follow the
`EngineBackend` port: network, create (0 replicas), start (the running
task's container), inspect by service id, name and container id, the
container's labels and hardening, logs, events by polling, stop (scale to
0), remove (service, not volume), ownership (another cluster's service and
an unlabelled one are never listed as ours), a failing engine and the
manager check of `ping` (its refusal needs an engine outside any swarm: a
plain dockerd of the harness, root only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Literal, TypeVar

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
from tests.conftest import TEST_LABEL, needs_swarm_tools
from tests.support.docker_proxy import DockerSocketProxy
from tests.support.local_swarm import LocalSwarm
from tests.support.swarm import SwarmCluster

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.timeout(180),
]

STUB = "galaxy/engine-stub:1.0.0"
CRASH = "galaxy/engine-crash:1.0.0"
MOUNT = "/var/lib/galaxy-game"
T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | Literal[False] | None], *, timeout: float = 30.0, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def adapter(local_swarm: LocalSwarm, cluster: str) -> Iterator[SwarmEngineAdapter]:
    backend = SwarmEngineAdapter(
        base_url=local_swarm.docker_host,
        cluster=cluster,
        constraints=["node.role==manager"],
        stop_grace=timedelta(seconds=5),
        start_wait=timedelta(seconds=30),
        poll_interval=timedelta(milliseconds=300),
    )
    yield backend
    backend.close()


@pytest.fixture
def manager(
    local_swarm: LocalSwarm, docker_client: docker.DockerClient, docker_cleanup: str
) -> docker.DockerClient:
    """docker-py on the local manager; the test's services, network and volumes go afterwards."""
    return docker_client


@pytest.fixture
def network(cluster: str, test_id: str) -> tuple[str, dict[str, str]]:
    """The test's engine network and the labels it is created with (for the cleanup)."""
    return f"galaxy-{cluster}", {galaxy_labels.CLUSTER: cluster, TEST_LABEL: test_id}


def spec(
    game_id: str,
    cluster: str,
    network: str,
    image: str = STUB,
    *,
    read_only: bool = True,
) -> ContainerSpec:
    name = f"galaxy-game-{game_id}"
    return ContainerSpec(
        name=name,
        image_ref=image,
        network=network,
        network_alias=name,
        labels=galaxy_labels.engine_labels(cluster=cluster, game_id=game_id, image_ref=image),
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
    local_swarm: LocalSwarm,
    adapter: SwarmEngineAdapter,
    manager: docker.DockerClient,
    network: tuple[str, dict[str, str]],
    cluster: str,
    test_id: str,
) -> None:
    net, net_labels = network
    game = f"g1-{test_id}"
    adapter.ping()
    assert adapter.capabilities.host_state_dirs is False
    adapter.ensure_image(STUB, PullPolicy.NEVER)
    with pytest.raises(ImagePullFailed):
        adapter.ensure_image("galaxy/absent:9.9.9", PullPolicy.NEVER)

    adapter.ensure_network(net, {galaxy_labels.OWNER: galaxy_labels.OWNER_VALUE, **net_labels})
    adapter.ensure_network(net, {})
    # The manager's allocator fills in the driver asynchronously (seen taking
    # a moment on a swarm initialised a second before).
    created_net = wait_for(
        lambda: (n := manager.networks.get(net)).attrs["Driver"] and n, what="the allocation"
    )
    assert (created_net.attrs["Driver"], created_net.attrs["Scope"]) == ("overlay", "swarm")
    assert created_net.attrs["Internal"] is True and created_net.attrs["Attachable"] is True

    # Services of another cluster and without our labels: never ours.
    foreign, bare = f"galaxy-game-foreign-{test_id}", f"galaxy-game-bare-{test_id}"
    for name, labels in (
        (
            foreign,
            galaxy_labels.engine_labels(
                cluster=f"other-{test_id}", game_id=f"foreign-{test_id}", image_ref=STUB
            ),
        ),
        (bare, {}),
    ):
        manager.services.create(  # type: ignore[no-untyped-call]
            STUB,
            name=name,
            labels={**labels, TEST_LABEL: test_id},
            container_labels={**labels, TEST_LABEL: test_id},
            mode=docker.types.ServiceMode("replicated", replicas=0),
        )

    service_id = adapter.create(spec(game, cluster, net))
    created = adapter.inspect(f"galaxy-game-{game}")
    assert created is not None and created.owned and not created.running
    assert created.id == service_id and created.game_id == game
    attrs = manager.services.get(service_id).attrs["Spec"]  # type: ignore[no-untyped-call]
    assert attrs["Mode"]["Replicated"]["Replicas"] == 0
    template = attrs["TaskTemplate"]
    assert template["RestartPolicy"]["Condition"] == "none"
    assert template["Placement"]["Constraints"] == ["node.role==manager"]
    assert template["Resources"]["Limits"]["MemoryBytes"] == 64 * 1024 * 1024
    assert template["Resources"]["Reservations"]["NanoCPUs"] == 100_000_000
    assert template["Networks"][0]["Aliases"] == [f"galaxy-game-{game}"]
    mount = template["ContainerSpec"]["Mounts"][0]
    assert (mount["Type"], mount["Source"], mount["Target"]) == (
        "volume",
        f"galaxy-state-{game}",
        MOUNT,
    )

    container_id = adapter.start(service_id)
    assert len(container_id) == 64
    info = adapter.inspect(container_id)
    assert info is not None and info.running and info.owned and info.id == container_id
    assert info.node_id == local_swarm.node_id
    assert info.node_hostname == local_swarm.hostname
    assert info.started_at is not None and info.exit_code is None
    assert adapter.inspect(service_id) == adapter.inspect(f"galaxy-game-{game}")
    by_service = adapter.inspect(service_id)
    assert by_service is not None and by_service.id == container_id
    assert adapter.owns(container_id) is True

    # The task's container on the engine carries our labels and the hardening.
    container = manager.containers.get(container_id)
    for key, value in spec(game, cluster, net).labels.items():
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

    listed = {i.game_id: i for i in adapter.list_owned()}
    assert set(listed) == {game}
    assert listed[game].id == container_id and listed[game].running
    assert listed[game].node_id == local_swarm.node_id
    foreign_info = adapter.inspect(foreign)
    bare_info = adapter.inspect(bare)
    assert foreign_info is not None and not foreign_info.owned
    assert bare_info is not None and not bare_info.owned

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
    assert all(e.game_id == game for e in seen)
    spec_after = manager.services.get(service_id).attrs["Spec"]  # type: ignore[no-untyped-call]
    assert spec_after["Mode"]["Replicated"]["Replicas"] == 0
    assert spec_after["Labels"][LAST_CONTAINER] == container_id
    adapter.stop(container_id, timedelta(seconds=5))  # again: fine

    adapter.remove(container_id)
    assert adapter.inspect(container_id) is None
    assert adapter.inspect(f"galaxy-game-{game}") is None
    adapter.remove(container_id)  # gone: fine
    assert manager.volumes.get(f"galaxy-state-{game}").attrs["Labels"][galaxy_labels.CLUSTER] == (
        cluster
    )

    # Others' services are untouched.
    names = {s.name for s in manager.services.list(filters={"label": f"{TEST_LABEL}={test_id}"})}
    assert names == {foreign, bare}


def test_a_crashing_engine_fails_its_start_with_its_output(
    adapter: SwarmEngineAdapter,
    manager: docker.DockerClient,
    network: tuple[str, dict[str, str]],
    cluster: str,
    test_id: str,
) -> None:
    net, net_labels = network
    adapter.ensure_network(net, net_labels)
    service_id = adapter.create(spec(f"crash-{test_id}", cluster, net, CRASH, read_only=False))
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


def test_a_running_engine_is_removed_only_by_force(
    adapter: SwarmEngineAdapter,
    manager: docker.DockerClient,
    network: tuple[str, dict[str, str]],
    cluster: str,
    test_id: str,
) -> None:
    from rtmanager.domain.errors import Conflict

    net, net_labels = network
    adapter.ensure_network(net, net_labels)
    container_id = adapter.start(adapter.create(spec(f"busy-{test_id}", cluster, net)))
    with pytest.raises(Conflict):
        adapter.remove(container_id)
    adapter.remove(container_id, force=True)
    assert adapter.inspect(f"galaxy-game-busy-{test_id}") is None


def test_ping_of_a_manager_that_does_not_answer_gives_up_within_the_probe_timeout(
    test_id: str, cluster: str
) -> None:
    # A health check must not wait for as long as a lifecycle call may.
    proxy = DockerSocketProxy(f"/tmp/gx-{test_id}.sock", upstream=None)  # answers nothing
    silent = SwarmEngineAdapter(
        base_url=proxy.url,
        cluster=cluster,
        timeout=timedelta(seconds=30),
        probe_timeout=timedelta(seconds=1),
    )
    try:
        began = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="timed out"):
            silent.ping()
        assert time.monotonic() - began < 5
    finally:
        silent.close()
        proxy.close()


@needs_swarm_tools()
def test_ping_needs_a_reachable_swarm_manager(tmp_path: Path, cluster: str) -> None:
    gone = SwarmEngineAdapter(base_url=f"unix://{tmp_path}/none.sock", cluster=cluster)
    with pytest.raises(ServiceUnavailable) as raised:
        gone.ping()
    assert not isinstance(raised.value, BackendMismatch)
    # An engine outside any swarm: a plain dockerd of the harness (the local
    # engine is a manager for this run).
    with SwarmCluster(nodes=1, swarm=False, images=(), log_dir=tmp_path / "plain") as plain:
        not_swarm = SwarmEngineAdapter(base_url=plain.manager_url, cluster=cluster)
        try:
            with pytest.raises(BackendMismatch, match="not a swarm manager"):
                not_swarm.ping()
        finally:
            not_swarm.close()
