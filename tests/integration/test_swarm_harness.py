"""The multi-node swarm harness (tests/support/swarm.py) on real dockerd nodes.

Three private dockerd nodes in network namespaces form one swarm (one
manager, two workers); an attachable internal overlay network and a
3-replica engine-stub service spread one task per node; stopping a worker's
dockerd turns the node `down` and its task's desired state `shutdown` (how
SPEC §10 says node loss is detected); the node comes back with
`start_node`; the teardown leaves no process, mount, namespace or directory
behind. A second test kills the owner of a swarm with SIGKILL and shows
that `cleanup_stale` removes what it left.

Root only (network namespaces); skipped where the tools are missing.
Nothing here sends traffic to a container or leaves the namespaces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.types
import pytest

from tests.conftest import needs_swarm_tools
from tests.support.swarm import (
    DEFAULT_IMAGES,
    SwarmCluster,
    SwarmNode,
    run_leftovers,
    wait_until,
)

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.timeout(240),
    needs_swarm_tools(),
]

REPO = Path(__file__).resolve().parents[2]
STUB_IMAGE = "galaxy/engine-stub:1.0.0"
SERVICE = "galaxy-game-spread"
NETWORK = "galaxy-engines"
STATE_MOUNT = "/var/lib/galaxy-game"


def _tasks(client: docker.DockerClient, **filters: str) -> list[dict[str, Any]]:
    return list(client.api.tasks(filters={"service": SERVICE, **filters}))  # type: ignore[no-untyped-call]


def _host_has_no_trace_of(cluster: SwarmCluster) -> None:
    """Checked while the swarm runs: nothing of it sits in the host's network namespace."""
    addresses = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    for node in cluster.nodes:
        assert f" {node.address}/" not in addresses
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    assert not names & {"br0", *(f"v{node.index}" for node in cluster.nodes)}


def _assert_gone(run_id: str, run_dir: Path, namespaces: list[str]) -> None:
    """Independent of the harness's own bookkeeping: no namespace, process, mount or file."""
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert run_id not in listed, listed
    for name in namespaces:
        assert not Path("/run/netns", name).exists()
    procs = subprocess.run(
        ["pgrep", "-af", str(run_dir)], capture_output=True, text=True, check=False
    ).stdout
    assert procs.strip() == "", procs
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(run_dir) not in mounts
    assert not run_dir.exists()


def _lose_node(
    swarm: SwarmCluster,
    manager: docker.DockerClient,
    tasks: list[dict[str, Any]],
    index: int,
    *,
    kill: bool,
) -> dict[str, Any]:
    """Stop node `index`; wait for it to be down and its task's desired state shutdown."""
    node: SwarmNode = swarm.node(index)
    task_id = next(t["ID"] for t in tasks if t["NodeID"] == node.node_id)
    stopped_at = time.monotonic()
    swarm.stop_node(index, kill=kill)
    assert not node.running
    swarm.wait_node_status(index, "down", timeout=60)
    down_after = time.monotonic() - stopped_at

    def desired_shutdown() -> dict[str, Any] | None:
        task = manager.api.inspect_task(task_id)  # type: ignore[no-untyped-call]
        return task if task["DesiredState"] == "shutdown" else None

    task = wait_until(desired_shutdown, timeout=30, what=f"desired shutdown of task {task_id}")
    # SPEC §10: the reported state may well stay `running`; only the node's
    # status and the task's desired state tell that the engine is gone.
    return {
        "node_down_after_s": round(down_after, 1),
        "task_desired_state": task["DesiredState"],
        "task_reported_state": task["Status"]["State"],
    }


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[SwarmCluster]:
    cluster = SwarmCluster(nodes=3, log_dir=tmp_path / "dockerd")
    with cluster:
        yield cluster
    assert cluster.leftovers() == []
    _assert_gone(cluster.run_id, cluster.run_dir, cluster.netns_names)


def test_three_nodes_spread_a_service_and_a_stopped_worker_turns_down(
    swarm: SwarmCluster, record_property: Any
) -> None:
    manager = swarm.manager_client()
    try:
        # --- three nodes, one swarm, told apart by id and by host name
        nodes = {n.id: n.attrs for n in manager.nodes.list()}
        assert set(nodes) == {node.node_id for node in swarm.nodes}
        assert all(attrs["Status"]["State"] == "ready" for attrs in nodes.values())
        assert [nodes[node.node_id]["Spec"]["Role"] for node in swarm.nodes] == [
            "manager",
            "worker",
            "worker",
        ]
        assert [nodes[node.node_id]["Description"]["Hostname"] for node in swarm.nodes] == [
            node.hostname for node in swarm.nodes
        ]
        assert len({node.hostname for node in swarm.nodes}) == 3
        for node in swarm.nodes:
            assert node.swarm_info()["NodeAddr"] == node.address
            assert node.url.startswith("unix://")
        _host_has_no_trace_of(swarm)

        # --- the engine images are on every node
        for node in swarm.nodes:
            client = node.client()
            try:
                tags = {tag for image in client.images.list() for tag in image.tags}
            finally:
                client.close()
            assert set(DEFAULT_IMAGES) <= tags, (node.name, tags)

        # --- an attachable, internal overlay network on the manager
        network = manager.networks.create(NETWORK, driver="overlay", attachable=True, internal=True)
        assert network.attrs["Scope"] == "swarm"
        assert network.attrs["Internal"] is True
        assert network.attrs["Attachable"] is True

        # --- three replicas, at most one per node: one task on each node
        manager.services.create(  # type: ignore[no-untyped-call]
            STUB_IMAGE,
            name=SERVICE,
            mode=docker.types.ServiceMode("replicated", replicas=3),
            networks=[NETWORK],
            env=["ENGINE_PORT=8080", f"GALAXY_STATE_DIR={STATE_MOUNT}", "GALAXY_GAME_ID=spread"],
            mounts=[docker.types.Mount(STATE_MOUNT, "galaxy-state-spread", type="volume")],
            restart_policy=docker.types.RestartPolicy(condition="none"),
            maxreplicas=1,
            preferences=[docker.types.PlacementPreference("spread", "node.id")],
            stop_grace_period=5_000_000_000,
        )

        def all_running() -> list[dict[str, Any]] | None:
            tasks = _tasks(manager, **{"desired-state": "running"})
            if len(tasks) == 3 and all(t["Status"]["State"] == "running" for t in tasks):
                return tasks
            return None

        tasks = wait_until(all_running, timeout=60, what="3 running tasks", detail=swarm.log_tails)
        assert {t["NodeID"] for t in tasks} == {node.node_id for node in swarm.nodes}

        # Each node's own daemon runs exactly one container of the service,
        # and the engine wrote its state file into the node's volume.
        for node in swarm.nodes:
            client = node.client()
            try:
                containers = client.containers.list(
                    filters={"label": f"com.docker.swarm.service.name={SERVICE}"}
                )
                assert len(containers) == 1, (node.name, containers)
                result = containers[0].exec_run(["/bin/busybox", "cat", f"{STATE_MOUNT}/started"])
                assert result.exit_code == 0
                assert b"version=1.0.0" in result.output
            finally:
                client.close()

        # --- a worker's dockerd stops (SIGTERM): its node goes down, its task's
        # desired state shutdown; the other two keep running where they are.
        observed = {"sigterm": _lose_node(swarm, manager, tasks, 3, kill=False)}
        running = _tasks(manager, **{"desired-state": "running"})
        assert {t["NodeID"] for t in running if t["Status"]["State"] == "running"} == {
            swarm.node(1).node_id,
            swarm.node(2).node_id,
        }

        # --- the same node comes back (same data, same node id) and is ready again
        swarm.start_node(3)
        assert swarm.node_status(3) == "ready"
        assert swarm.node(3).swarm_info()["NodeID"] == swarm.node(3).node_id

        # --- the other worker loses power (SIGKILL to all its processes): the same
        observed["sigkill"] = _lose_node(swarm, manager, tasks, 2, kill=True)
        record_property("node_loss", json.dumps(observed))
        print("node loss observed:", observed)
    finally:
        manager.close()


def test_cleanup_stale_removes_the_leftovers_of_a_killed_owner(tmp_path: Path) -> None:
    # A swarm owned by another process, which is then killed -9: its
    # dockerd, namespaces and directory stay behind. Under a prefix and root
    # of the test's own, so that no other swarm's start-up cleans them first.
    # (Not under tmp_path: the daemons' socket paths must stay short.)
    prefix, root = "rtmst", Path(tempfile.mkdtemp(prefix="rtmst-"))
    owner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.swarm",
            "up",
            "--nodes",
            "1",
            "--prefix",
            prefix,
            "--root",
            str(root),
            "--images",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "owner.err").open("wb"),
        text=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()  # the JSON description once the swarm is up
        assert line, (tmp_path / "owner.err").read_text()
        run_id = json.loads(line)["run_id"]
    finally:
        owner.kill()
        owner.wait(timeout=10)
    try:
        left = run_leftovers(run_id, prefix, root)
        assert any(item.startswith("processes") for item in left), left
        assert any(item.startswith("network namespaces") for item in left), left
        assert any(item.startswith("directory") for item in left), left

        assert SwarmCluster.cleanup_stale(prefix, root) == [run_id]
        assert run_leftovers(run_id, prefix, root) == []
    finally:
        SwarmCluster.cleanup_stale(prefix, root)
        shutil.rmtree(root, ignore_errors=True)
