"""The EngineBackend port against the real daemon and the local test images.

Needs the images of scripts/build-engine-images.sh. Every container and
network carries `com.galaxy.test=<test_id>` (or the test's cluster label), so
the `docker_cleanup` fixture removes them even when a test fails. Nothing
here talks to a container's address or to a real registry.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import unquote

import docker
import docker.errors
import pytest

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.adapters.docker.events import DockerEventStream
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import (
    Conflict,
    ContainerStartFailed,
    EngineNetworkGone,
    ImagePullFailed,
    ServiceUnavailable,
)
from rtmanager.ports import ContainerEvent, ContainerInfo, ContainerSpec, EngineUser, PullPolicy
from tests.conftest import CRASH_IMAGE, DOCKER_HOST, ENGINE_IMAGE, TEST_LABEL
from tests.support.docker_proxy import DockerSocketProxy

pytestmark = pytest.mark.integration

STUB_IMAGE = f"{ENGINE_IMAGE}:1.0.0"
STATE_MOUNT = "/var/lib/galaxy-game"
MEMORY_BYTES = 64 * 1024 * 1024
NANO_CPUS = 500_000_000
PIDS_LIMIT = 64
ENGINE_USER = EngineUser(65534, 65534)
LOG_MAX_BYTES = 2 * 1024 * 1024
LOG_MAX_FILES = 2

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], *, timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def client(docker_client: object) -> docker.DockerClient:
    assert isinstance(docker_client, docker.DockerClient)
    return docker_client


@pytest.fixture(autouse=True)
def _images_built(client: docker.DockerClient) -> None:
    for image in (STUB_IMAGE, CRASH_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{image} is missing: run scripts/build-engine-images.sh")


@pytest.fixture
def engine(docker_cleanup: str, cluster: str) -> Iterator[DockerEngineAdapter]:
    adapter = DockerEngineAdapter(
        base_url=DOCKER_HOST, cluster=cluster, timeout=timedelta(seconds=30)
    )
    yield adapter
    adapter.close()


@pytest.fixture
def network(engine: DockerEngineAdapter, test_id: str) -> str:
    name = f"galaxy-t-{test_id}"
    engine.ensure_network(name, {TEST_LABEL: test_id})
    return name


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    # The engine's own, as the start lifecycle makes it.
    os.chown(path, ENGINE_USER.uid, ENGINE_USER.gid)
    return path


def make_spec(
    *,
    test_id: str,
    cluster: str,
    network: str,
    state_dir: Path,
    game_id: str | None = None,
    image: str = STUB_IMAGE,
    read_only_rootfs: bool = False,
) -> ContainerSpec:
    game_id = game_id or f"g-{test_id}"
    name = f"galaxy-game-{game_id}"
    return ContainerSpec(
        name=name,
        image_ref=image,
        network=network,
        network_alias=name,
        labels=galaxy_labels.engine_labels(
            cluster=cluster, game_id=game_id, image_ref=image, extra={TEST_LABEL: test_id}
        ),
        env={"GALAXY_GAME_ID": game_id, "GALAXY_STATE_DIR": STATE_MOUNT},
        state_host_path=str(state_dir),
        state_mount_path=STATE_MOUNT,
        memory_bytes=MEMORY_BYTES,
        nano_cpus=NANO_CPUS,
        pids_limit=PIDS_LIMIT,
        user=ENGINE_USER,
        log_max_bytes=LOG_MAX_BYTES,
        log_max_files=LOG_MAX_FILES,
        read_only_rootfs=read_only_rootfs,
    )


def wait_running(engine: DockerEngineAdapter, container_id: str) -> ContainerInfo:
    def probe() -> ContainerInfo | None:
        info = engine.inspect(container_id)
        return info if info is not None and info.running else None

    return wait_for(probe, what=f"{container_id[:12]} to run")


def wait_exited(engine: DockerEngineAdapter, container_id: str) -> ContainerInfo:
    def probe() -> ContainerInfo | None:
        info = engine.inspect(container_id)
        return info if info is not None and info.state == "exited" else None

    return wait_for(probe, what=f"{container_id[:12]} to exit")


def raw_container(
    client: docker.DockerClient, test_id: str, name: str, labels: dict[str, str]
) -> str:
    """Create (not start) a container directly with docker-py, outside the adapter."""
    container = client.containers.create(
        STUB_IMAGE,
        name=name,
        labels={**labels, TEST_LABEL: test_id},
        network_mode="none",
    )
    assert container.id is not None
    return container.id


# -- create / start / stop / remove ------------------------------------------


def test_create_and_start_runs_a_hardened_engine_on_the_internal_network_with_its_alias(
    engine: DockerEngineAdapter,
    client: docker.DockerClient,
    network: str,
    state_dir: Path,
    test_id: str,
    cluster: str,
) -> None:
    spec = make_spec(test_id=test_id, cluster=cluster, network=network, state_dir=state_dir)
    container_id = engine.create(spec)
    engine.start(container_id)

    info = wait_running(engine, container_id)
    assert info.id == container_id
    assert info.name == spec.name
    assert info.owned is True
    assert info.game_id == f"g-{test_id}"
    assert info.image_ref == STUB_IMAGE
    assert info.exit_code is None
    assert (info.oom_killed, info.restart_count) == (False, 0)
    assert info.image_id == client.images.get(STUB_IMAGE).id
    assert info.health is None
    assert info.started_at is not None and info.started_at.tzinfo is not None
    assert abs(datetime.now(UTC) - info.started_at) < timedelta(minutes=1)
    assert info.finished_at is None

    started = wait_for((state_dir / "started").exists, what="the engine's file in the state dir")
    assert started
    assert "version=1.0.0" in (state_dir / "started").read_text()
    # Written by the engine's user, through the bind mount.
    written = (state_dir / "started").stat()
    assert (written.st_uid, written.st_gid) == (ENGINE_USER.uid, ENGINE_USER.gid)

    raw = cast(dict[str, Any], client.api.inspect_container(container_id))
    config, host = raw["Config"], raw["HostConfig"]
    assert raw["Name"] == f"/{spec.name}"
    assert config["Hostname"] == spec.name
    assert config["Labels"][galaxy_labels.OWNER] == galaxy_labels.OWNER_VALUE
    assert config["Labels"][galaxy_labels.CLUSTER] == cluster
    assert config["Labels"][galaxy_labels.GAME_ID] == f"g-{test_id}"
    assert config["Labels"][galaxy_labels.IMAGE_REF] == STUB_IMAGE
    assert f"GALAXY_GAME_ID=g-{test_id}" in config["Env"]
    assert f"GALAXY_STATE_DIR={STATE_MOUNT}" in config["Env"]
    mounts = [m for m in raw["Mounts"] if m["Destination"] == STATE_MOUNT]
    assert len(mounts) == 1
    assert mounts[0]["Type"] == "bind"
    assert mounts[0]["Source"] == str(state_dir)
    assert mounts[0]["RW"] is True
    assert config["User"] == "65534:65534"
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges=true" in host["SecurityOpt"]
    # Enforced, not only recorded: the kernel runs the engine's init with no_new_privs.
    status = Path(f"/proc/{raw['State']['Pid']}/status").read_text().splitlines()
    assert "NoNewPrivs:\t1" in status
    assert host["Privileged"] is False
    assert host["PidsLimit"] == PIDS_LIMIT
    assert host["Memory"] == MEMORY_BYTES
    assert host["MemorySwap"] == MEMORY_BYTES  # no swap
    assert host["NanoCpus"] == NANO_CPUS
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": str(LOG_MAX_BYTES), "max-file": str(LOG_MAX_FILES)},
    }
    assert host["ReadonlyRootfs"] is False
    (network_info,) = networks_named(client, network)
    # Attached by the id ensure_network settled on, not by the (ambiguous) name.
    assert host["NetworkMode"] == network_info["Id"]
    endpoints = raw["NetworkSettings"]["Networks"]
    assert list(endpoints) == [network]
    assert endpoints[network]["NetworkID"] == network_info["Id"]
    assert spec.network_alias in endpoints[network]["Aliases"]
    assert cast(dict[str, Any], client.api.inspect_network(network))["Internal"] is True


def test_read_only_rootfs_gets_a_tmpfs_and_the_engine_still_writes_its_state(
    engine: DockerEngineAdapter,
    client: docker.DockerClient,
    network: str,
    state_dir: Path,
    test_id: str,
    cluster: str,
) -> None:
    spec = make_spec(
        test_id=test_id,
        cluster=cluster,
        network=network,
        state_dir=state_dir,
        read_only_rootfs=True,
    )
    container_id = engine.create(spec)
    engine.start(container_id)
    wait_running(engine, container_id)
    wait_for((state_dir / "started").exists, what="the engine's state file")

    raw = cast(dict[str, Any], client.api.inspect_container(container_id))
    assert raw["HostConfig"]["ReadonlyRootfs"] is True
    assert "/tmp" in raw["HostConfig"]["Tmpfs"]


def test_stop_with_timeout_stops_promptly_and_stop_or_remove_of_a_vanished_container_is_a_noop(
    engine: DockerEngineAdapter, network: str, state_dir: Path, test_id: str, cluster: str
) -> None:
    spec = make_spec(test_id=test_id, cluster=cluster, network=network, state_dir=state_dir)
    container_id = engine.create(spec)
    engine.start(container_id)
    wait_running(engine, container_id)

    began = time.monotonic()
    engine.stop(container_id, timedelta(seconds=10))
    assert time.monotonic() - began < 5, "the engine should stop on SIGTERM, not be killed"

    info = engine.inspect(container_id)
    assert info is not None
    assert info.running is False
    assert info.state == "exited"
    assert info.exit_code == 0
    assert info.finished_at is not None

    engine.stop(container_id, timedelta(seconds=1))  # already stopped: 304
    engine.remove(container_id)
    assert engine.inspect(container_id) is None
    engine.stop(container_id, timedelta(seconds=1))
    engine.remove(container_id)
    engine.remove(container_id, force=True)
    assert engine.logs_tail(container_id) == ""


def test_remove_of_a_running_container_needs_force(
    engine: DockerEngineAdapter, network: str, state_dir: Path, test_id: str, cluster: str
) -> None:
    spec = make_spec(test_id=test_id, cluster=cluster, network=network, state_dir=state_dir)
    container_id = engine.create(spec)
    engine.start(container_id)
    wait_running(engine, container_id)

    with pytest.raises(Conflict):
        engine.remove(container_id)
    engine.remove(container_id, force=True)
    assert engine.inspect(container_id) is None


def test_create_with_a_duplicate_name_raises_conflict(
    engine: DockerEngineAdapter, network: str, state_dir: Path, test_id: str, cluster: str
) -> None:
    spec = make_spec(test_id=test_id, cluster=cluster, network=network, state_dir=state_dir)
    first = engine.create(spec)
    with pytest.raises(Conflict, match=spec.name):
        engine.create(spec)
    info = engine.inspect(spec.name)
    assert info is not None and info.id == first


def test_create_with_a_missing_state_dir_is_refused_as_container_start_failed(
    engine: DockerEngineAdapter, network: str, tmp_path: Path, test_id: str, cluster: str
) -> None:
    spec = make_spec(
        test_id=test_id, cluster=cluster, network=network, state_dir=tmp_path / "missing"
    )
    with pytest.raises(ContainerStartFailed):
        engine.create(spec)
    assert not (tmp_path / "missing").exists()


def test_start_of_a_container_docker_cannot_run_raises_container_start_failed(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str
) -> None:
    container = client.containers.create(
        STUB_IMAGE,
        command=["/no/such/engine"],
        name=f"galaxy-game-bad-{test_id}",
        labels={TEST_LABEL: test_id},
        network_mode="none",
    )
    assert container.id is not None
    with pytest.raises(ContainerStartFailed, match="no/such/engine"):
        engine.start(container.id)


def test_crash_image_exits_with_code_3_and_its_logs_tail_has_the_fatal_line(
    engine: DockerEngineAdapter, network: str, state_dir: Path, test_id: str, cluster: str
) -> None:
    spec = make_spec(
        test_id=test_id, cluster=cluster, network=network, state_dir=state_dir, image=CRASH_IMAGE
    )
    container_id = engine.create(spec)
    engine.start(container_id)

    info = wait_exited(engine, container_id)
    assert info.running is False
    assert info.exit_code == 3
    assert info.finished_at is not None
    # (Docker may stamp FinishedAt a hair before StartedAt for a process this
    # short-lived, so their order is not asserted.)
    assert info.started_at is not None
    assert "engine-crash: fatal: refusing to start" in engine.logs_tail(container_id)
    assert engine.logs_tail(container_id, lines=0) == ""


def test_inspect_reports_an_engine_killed_for_memory_and_the_image_it_ran(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str, cluster: str
) -> None:
    game_id = f"oom-{test_id}"
    container = client.containers.create(
        STUB_IMAGE,
        # dd wants 64 MiB in one buffer, under a 16 MiB limit without swap:
        # the kernel kills it. Docker marks a container OOM-killed only when
        # the OOM event reaches it, and that needs containerd's watch of the
        # container's memory cgroup, set up just after the start: so dd runs
        # a second after the start, and the shell lives on for a second after
        # the kill, then exits with dd's status (137).
        command=[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox sleep 1; /bin/busybox dd if=/dev/zero of=/dev/null bs=64M count=1;"
            " status=$?; /bin/busybox sleep 1; exit $status",
        ],
        entrypoint=[],
        name=f"galaxy-game-{game_id}",
        labels={
            **galaxy_labels.engine_labels(cluster=cluster, game_id=game_id, image_ref=STUB_IMAGE),
            TEST_LABEL: test_id,
        },
        mem_limit="16m",
        memswap_limit="16m",
        network_mode="none",
    )
    assert container.id is not None
    container.start()

    info = wait_exited(engine, container.id)
    assert (info.exit_code, info.oom_killed, info.restart_count) == (137, True, 0)
    assert info.image_id == client.images.get(STUB_IMAGE).id
    assert info.image_id.startswith("sha256:")
    (listed,) = [c for c in engine.list_owned() if c.id == container.id]
    assert listed.image_id == info.image_id
    assert (listed.oom_killed, listed.restart_count) == (False, 0)  # not in a listing


def test_inspect_counts_the_restarts_docker_made_and_a_plain_crash_is_no_oom_kill(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str
) -> None:
    # rtmanager never asks Docker to restart an engine; a container someone
    # else started with a restart policy shows what the count means.
    container = client.containers.create(
        CRASH_IMAGE,
        labels={TEST_LABEL: test_id},
        network_mode="none",
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 2},
    )
    assert container.id is not None
    container.start()

    def restarted_twice() -> ContainerInfo | None:
        info = engine.inspect(container.id or "")
        done = info is not None and info.state == "exited" and info.restart_count == 2
        return info if done else None

    info = wait_for(restarted_twice, what="two restarts by Docker")
    assert (info.exit_code, info.oom_killed, info.owned) == (3, False, False)


# -- images -------------------------------------------------------------------


def test_ensure_image_never_on_an_absent_image_raises_image_pull_failed(
    engine: DockerEngineAdapter, test_id: str
) -> None:
    with pytest.raises(ImagePullFailed, match="never"):
        engine.ensure_image(f"galaxy/absent-{test_id}:1.0.0", PullPolicy.NEVER)
    engine.ensure_image(STUB_IMAGE, PullPolicy.NEVER)


def test_ensure_image_if_missing_on_a_present_image_does_not_pull_and_always_does(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str
) -> None:
    # A local tag whose registry cannot be reached: any pull of it fails.
    repository = f"127.0.0.1:1/galaxy/present-{test_id}"
    ref = f"{repository}:1.0.0"
    assert client.images.get(STUB_IMAGE).tag(repository, "1.0.0")
    try:
        engine.ensure_image(ref, PullPolicy.IF_MISSING)
        engine.ensure_image(ref, PullPolicy.NEVER)
        # ALWAYS insists on the registry's copy even when one is present.
        with pytest.raises(ImagePullFailed, match=r"127\.0\.0\.1:1"):
            engine.ensure_image(ref, PullPolicy.ALWAYS)
    finally:
        client.images.remove(ref)


@pytest.mark.parametrize("policy", [PullPolicy.IF_MISSING, PullPolicy.NEVER])
def test_an_image_seen_present_is_not_asked_about_again_until_a_create_finds_it_gone(
    engine: DockerEngineAdapter,
    client: docker.DockerClient,
    network: str,
    state_dir: Path,
    test_id: str,
    cluster: str,
    policy: PullPolicy,
) -> None:
    repository = f"127.0.0.1:1/galaxy/seen-{test_id}"
    ref = f"{repository}:1.0.0"
    assert client.images.get(STUB_IMAGE).tag(repository, "1.0.0")
    try:
        engine.ensure_image(ref, policy)
        requests = count_requests(engine)
        engine.ensure_image(ref, policy)
        assert requests == []

        client.images.remove(ref)  # behind the adapter's back
        spec = make_spec(
            test_id=test_id, cluster=cluster, network=network, state_dir=state_dir, image=ref
        )
        with pytest.raises(ImagePullFailed, match="not present"):
            engine.create(spec)
        # Forgotten: the policy decides again (the registry is unreachable).
        with pytest.raises(
            ImagePullFailed, match="never" if policy is PullPolicy.NEVER else "pull"
        ):
            engine.ensure_image(ref, policy)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(ref)


def test_ensure_image_if_missing_of_an_unreachable_registry_image_fails_fast(
    engine: DockerEngineAdapter,
) -> None:
    began = time.monotonic()
    with pytest.raises(ImagePullFailed, match=r"127\.0\.0\.1:1/galaxy/none"):
        engine.ensure_image("127.0.0.1:1/galaxy/none:1.0.0", PullPolicy.IF_MISSING)
    assert time.monotonic() - began < 10


# -- networks -----------------------------------------------------------------


def networks_named(client: docker.DockerClient, name: str) -> list[dict[str, Any]]:
    found = cast(list[dict[str, Any]], client.api.networks(names=[name]))
    return [n for n in found if n["Name"] == name]


def test_ensure_network_is_idempotent_and_creates_an_internal_bridge_network(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str
) -> None:
    name = f"galaxy-t-{test_id}"
    # Docker's name filter matches substrings: a longer name must not count.
    engine.ensure_network(f"{name}-longer", {TEST_LABEL: test_id})
    engine.ensure_network(name, {TEST_LABEL: test_id, "purpose": "engines"})
    engine.ensure_network(name, {TEST_LABEL: test_id})

    found = networks_named(client, name)
    assert len(found) == 1
    network = found[0]
    assert network["Driver"] == "bridge"
    assert network["Internal"] is True
    assert network["Labels"] == {TEST_LABEL: test_id, "purpose": "engines"}


def test_a_settled_network_is_not_asked_about_again_until_a_start_finds_it_gone(
    engine: DockerEngineAdapter,
    client: docker.DockerClient,
    state_dir: Path,
    test_id: str,
    cluster: str,
) -> None:
    name = f"galaxy-t-{test_id}"
    engine.ensure_network(name, {TEST_LABEL: test_id})
    requests = count_requests(engine)
    engine.ensure_network(name, {TEST_LABEL: test_id})
    assert requests == []

    (gone,) = networks_named(client, name)
    client.api.remove_network(gone["Id"])  # behind the adapter's back
    spec = make_spec(test_id=test_id, cluster=cluster, network=name, state_dir=state_dir)
    stale = engine.create(spec)
    with pytest.raises(EngineNetworkGone):
        engine.start(stale)
    engine.remove(stale, force=True)

    # Forgotten: settled again, on a new network, which the engine joins.
    engine.ensure_network(name, {TEST_LABEL: test_id})
    (again,) = networks_named(client, name)
    assert again["Id"] != gone["Id"]
    container_id = engine.start(engine.create(spec))
    networks = client.api.inspect_container(container_id)["NetworkSettings"]["Networks"]
    assert [n["NetworkID"] for n in networks.values()] == [again["Id"]]


def _replicas_start_engines(
    *, name: str, cluster: str, test_id: str, state_dir: str, game_ids: list[str], at: float
) -> list[str]:
    """One process of replicas (one adapter and thread per game), all starting at `at`.

    Each replica ensures the network and starts one engine on it, as a
    starting rtmanager would; returns the engines' container ids.
    """
    started: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def replica(game_id: str) -> None:
        adapter = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=cluster)
        try:
            adapter.ping()
            time.sleep(max(at - time.time(), 0.0))
            adapter.ensure_network(name, {TEST_LABEL: test_id})
            spec = make_spec(
                test_id=test_id,
                cluster=cluster,
                network=name,
                state_dir=Path(state_dir),
                game_id=game_id,
            )
            container_id = adapter.create(spec)
            adapter.start(container_id)
            with lock:
                started.append(container_id)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            adapter.close()

    threads = [threading.Thread(target=replica, args=(g,)) for g in game_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return started


@pytest.mark.parametrize("round_", range(3))
def test_replicas_starting_together_settle_on_one_network_and_attach_every_engine_to_it(
    client: docker.DockerClient,
    docker_cleanup: str,
    cluster: str,
    test_id: str,
    state_dir: Path,
    round_: int,
) -> None:
    name = f"galaxy-t-{test_id}"
    processes, per_process = 3, 2
    # Separate processes (as replicas are) each with several adapters, all
    # released at one moment so that their listings and creates interleave.
    at = time.time() + 4.0
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=spawn) as pool:
        futures = [
            pool.submit(
                _replicas_start_engines,
                name=name,
                cluster=cluster,
                test_id=test_id,
                state_dir=str(state_dir),
                game_ids=[f"n{p}-{t}-{test_id}" for t in range(per_process)],
                at=at,
            )
            for p in range(processes)
        ]
        engines = [cid for future in futures for cid in future.result(timeout=180)]

    (network,) = networks_named(client, name)
    assert len(engines) == processes * per_process
    for container_id in engines:
        raw = cast(dict[str, Any], client.api.inspect_container(container_id))
        assert raw["State"]["Running"] is True
        assert raw["NetworkSettings"]["Networks"][name]["NetworkID"] == network["Id"]
    attached = cast(dict[str, Any], client.api.inspect_network(network["Id"]))["Containers"]
    assert set(attached) == set(engines)


def test_several_networks_left_behind_resolve_to_the_oldest_and_empty_ones_go(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str
) -> None:
    name = f"galaxy-t-{test_id}"
    labels = {TEST_LABEL: test_id, "purpose": "engines"}
    oldest = client.api.create_network(name, driver="bridge", internal=True, labels=labels)["Id"]
    time.sleep(0.01)
    younger = client.api.create_network(name, driver="bridge", internal=True, labels=labels)["Id"]
    foreign = client.api.create_network(
        name, driver="bridge", internal=True, labels={TEST_LABEL: test_id}
    )["Id"]

    engine.ensure_network(name, labels)

    remaining = {n["Id"] for n in networks_named(client, name)}
    assert oldest in remaining and younger not in remaining
    assert foreign in remaining  # not carrying our labels: never removed
    assert engine._network_ids[name] == oldest


# -- ownership ----------------------------------------------------------------


def test_container_without_owner_label_is_never_listed_and_inspects_as_not_owned(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str, cluster: str
) -> None:
    foreign = raw_container(
        client,
        test_id,
        f"galaxy-game-x{test_id}",
        {galaxy_labels.CLUSTER: cluster, galaxy_labels.GAME_ID: f"x{test_id}"},
    )
    assert foreign not in {c.id for c in engine.list_owned()}
    info = engine.inspect(f"galaxy-game-x{test_id}")
    assert info is not None
    assert info.id == foreign
    assert info.owned is False
    assert info.state == "created"
    assert info.exit_code is None

    default = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=galaxy_labels.DEFAULT_CLUSTER)
    try:
        assert foreign not in {c.id for c in default.list_owned()}
    finally:
        default.close()


def test_container_of_another_cluster_is_listed_only_by_that_cluster(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str, cluster: str
) -> None:
    other_cluster = f"other-{test_id}"
    labels = galaxy_labels.engine_labels(
        cluster=other_cluster, game_id=f"o{test_id}", image_ref=STUB_IMAGE
    )
    theirs = raw_container(client, test_id, f"galaxy-game-o{test_id}", labels)
    ours = raw_container(
        client,
        test_id,
        f"galaxy-game-m{test_id}",
        galaxy_labels.engine_labels(cluster=cluster, game_id=f"m{test_id}", image_ref=STUB_IMAGE),
    )

    listed = {c.id: c for c in engine.list_owned()}
    assert theirs not in listed
    assert ours in listed
    assert listed[ours].owned is True
    assert listed[ours].game_id == f"m{test_id}"
    info = engine.inspect(theirs)
    assert info is not None and info.owned is False

    other = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=other_cluster)
    try:
        other_listed = {c.id for c in other.list_owned()}
    finally:
        other.close()
    assert theirs in other_listed
    assert ours not in other_listed


def test_container_without_cluster_label_is_owned_only_by_the_default_cluster(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str
) -> None:
    legacy = raw_container(
        client,
        test_id,
        f"galaxy-game-l{test_id}",
        {
            galaxy_labels.OWNER: galaxy_labels.OWNER_VALUE,
            galaxy_labels.GAME_ID: f"l{test_id}",
            galaxy_labels.IMAGE_REF: STUB_IMAGE,
        },
    )
    assert legacy not in {c.id for c in engine.list_owned()}
    info = engine.inspect(legacy)
    assert info is not None and info.owned is False

    # A default deployment also sees other tests' default containers: only
    # membership of ours is asserted.
    default = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=galaxy_labels.DEFAULT_CLUSTER)
    try:
        listed = {c.id: c for c in default.list_owned()}
        assert legacy in listed
        assert listed[legacy].owned is True
        assert listed[legacy].game_id == f"l{test_id}"
        default_info = default.inspect(legacy)
        assert default_info is not None and default_info.owned is True
    finally:
        default.close()


def count_requests(engine: DockerEngineAdapter) -> list[str]:
    """Record "METHOD path" of every HTTP request the adapter's client makes from now on."""
    seen: list[str] = []

    def record(response: Any, *args: object, **kwargs: object) -> None:
        request = response.request
        seen.append(f"{request.method} {request.path_url.split('?')[0]}")

    engine._api().hooks["response"].append(record)
    return seen


def test_a_listing_is_one_request_whatever_the_number_of_containers(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str, cluster: str
) -> None:
    ours = {
        raw_container(
            client,
            test_id,
            f"galaxy-game-{game_id}",
            galaxy_labels.engine_labels(cluster=cluster, game_id=game_id, image_ref=STUB_IMAGE),
        )
        for game_id in (f"a{test_id}", f"b{test_id}", f"c{test_id}")
    }
    requests = count_requests(engine)

    assert {c.id for c in engine.list_owned()} == ours
    assert len(requests) == 1
    assert requests[0].startswith("GET /") and requests[0].endswith("/containers/json")


def test_a_listing_says_what_an_inspect_says_but_the_exit_code_health_and_times(
    engine: DockerEngineAdapter, client: docker.DockerClient, test_id: str, cluster: str
) -> None:
    def engine_container(game_id: str, image: str, *, start: bool) -> str:
        labels = galaxy_labels.engine_labels(cluster=cluster, game_id=game_id, image_ref=image)
        container = client.containers.create(
            image,
            name=f"galaxy-game-{game_id}",
            labels={**labels, TEST_LABEL: test_id},
            network_mode="none",
            init=True,
            environment={"GALAXY_STATE_DIR": "/tmp"},
        )
        assert container.id is not None
        if start:
            container.start()
        return container.id

    created = engine_container(f"c{test_id}", STUB_IMAGE, start=False)
    running = engine_container(f"r{test_id}", STUB_IMAGE, start=True)
    paused = engine_container(f"p{test_id}", STUB_IMAGE, start=True)
    crashed = engine_container(f"x{test_id}", CRASH_IMAGE, start=True)

    def state_of(container_id: str) -> str:
        info = engine.inspect(container_id)
        return info.state if info is not None else ""

    wait_for(lambda: state_of(running) == "running", what="the engine running")
    wait_for(lambda: state_of(paused) == "running", what="the engine running")
    client.api.pause(paused)
    wait_for(lambda: state_of(crashed) == "exited", what="the crash engine exited")

    listed = {c.id: c for c in engine.list_owned()}
    for container_id, state, is_running in (
        (created, "created", False),
        (running, "running", True),
        (paused, "paused", True),
        (crashed, "exited", False),
    ):
        inspected = engine.inspect(container_id)
        assert inspected is not None
        summary = listed[container_id]
        assert (summary.state, summary.running) == (state, is_running)
        assert (summary.state, summary.running) == (inspected.state, inspected.running)
        assert (summary.name, summary.image_ref, summary.game_id, summary.owned) == (
            inspected.name,
            inspected.image_ref,
            inspected.game_id,
            True,
        )
        assert summary.labels == inspected.labels
        assert (summary.exit_code, summary.health, summary.started_at, summary.finished_at) == (
            None,
            None,
            None,
            None,
        )
    crashed_info = engine.inspect(crashed)
    assert crashed_info is not None and crashed_info.exit_code == 3
    client.api.unpause(paused)


def test_owns_container_asks_docker_only_about_containers_not_yet_seen_owned(
    engine: DockerEngineAdapter,
    client: docker.DockerClient,
    network: str,
    state_dir: Path,
    test_id: str,
    cluster: str,
) -> None:
    created = engine.create(
        make_spec(test_id=test_id, cluster=cluster, network=network, state_dir=state_dir)
    )
    foreign = raw_container(
        client, test_id, f"galaxy-game-f{test_id}", {galaxy_labels.GAME_ID: f"f{test_id}"}
    )
    requests = count_requests(engine)

    assert engine.owns(created) is True
    assert requests == []  # it created the container
    assert engine.owns(foreign) is False
    assert engine.owns("0" * 64) is None
    assert len(requests) == 2 and all(r.endswith("/json") for r in requests)

    engine.remove(created)
    requests.clear()
    assert engine.owns(created) is None  # forgotten once removed
    assert len(requests) == 1

    fresh = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=cluster)
    try:
        seen = raw_container(
            client,
            test_id,
            f"galaxy-game-s{test_id}",
            galaxy_labels.engine_labels(
                cluster=cluster, game_id=f"s{test_id}", image_ref=STUB_IMAGE
            ),
        )
        assert seen in {c.id for c in fresh.list_owned()}
        fresh_requests = count_requests(fresh)
        assert fresh.owns(seen) is True
        assert fresh_requests == []  # a listing showed it owned
    finally:
        fresh.close()


# -- events -------------------------------------------------------------------


def consume(stream: DockerEventStream | Any) -> tuple[queue.Queue[Any], threading.Thread]:
    """Iterate `stream` on a thread; events, then an end marker, go to the queue."""
    received: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            for event in stream:
                received.put(event)
            received.put("ended")
        except BaseException as exc:
            received.put(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return received, thread


def next_matching(
    received: queue.Queue[Any], match: Callable[[ContainerEvent], bool], timeout: float = 10
) -> ContainerEvent:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail("no matching event in time")
        try:
            item = received.get(timeout=remaining)
        except queue.Empty:
            pytest.fail("no matching event in time")
        if isinstance(item, BaseException):
            raise item
        if item == "ended":
            pytest.fail("the event stream ended early")
        if match(item):
            return cast(ContainerEvent, item)


def test_follow_events_reports_a_killed_engine_as_die_and_close_ends_the_stream(
    engine: DockerEngineAdapter,
    client: docker.DockerClient,
    network: str,
    state_dir: Path,
    test_id: str,
    cluster: str,
) -> None:
    began = datetime.now(UTC)
    stream = engine.follow_events()
    received, consumer = consume(stream)
    # A container without the owner label dies too; it must never show up.
    foreign = raw_container(client, test_id, f"galaxy-game-f{test_id}", {})
    spec = make_spec(test_id=test_id, cluster=cluster, network=network, state_dir=state_dir)
    container_id = engine.create(spec)
    engine.start(container_id)
    wait_running(engine, container_id)
    client.api.start(foreign)
    client.api.kill(foreign)
    client.api.kill(container_id)

    died = next_matching(received, lambda e: e.action == "die" and e.container_id == container_id)
    assert died.game_id == f"g-{test_id}"
    assert died.exit_code is not None and died.exit_code != 0
    assert abs(died.time - datetime.now(UTC)) < timedelta(minutes=1)

    stream.close()
    consumer.join(timeout=5)
    assert not consumer.is_alive(), "close() must end the iteration"
    seen: list[Any] = []
    while not received.empty():
        seen.append(received.get_nowait())
    assert seen[-1] == "ended"
    assert all(isinstance(e, ContainerEvent) for e in seen[:-1])
    assert foreign not in {e.container_id for e in seen[:-1]}

    # A stream opened later replays from `since`.
    replay = engine.follow_events(since=began)
    replayed, replayer = consume(replay)
    try:
        start = next_matching(
            replayed, lambda e: e.action == "start" and e.container_id == container_id
        )
        assert start.exit_code is None
    finally:
        replay.close()
        replayer.join(timeout=5)
    assert not replayer.is_alive()


class _EndedStream:
    """A docker-py stream whose connection was dropped by the daemon."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._events = iter(events)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._events

    def close(self) -> None:
        pass


def test_event_stream_ended_by_the_daemon_raises_service_unavailable() -> None:
    owned = {
        "Type": "container",
        "Action": "die",
        "timeNano": 1_700_000_000_123_456_789,
        "Actor": {
            "ID": "abc",
            "Attributes": {
                galaxy_labels.OWNER: galaxy_labels.OWNER_VALUE,
                galaxy_labels.GAME_ID: "g1",
                "exitCode": "137",
            },
        },
    }
    other = {**owned, "Actor": {"ID": "def", "Attributes": {galaxy_labels.OWNER: "someone"}}}
    exec_event = {**owned, "Action": "exec_start: sh"}
    stream = DockerEventStream(cast(Any, _EndedStream([other, exec_event, owned])), "default")
    events: list[ContainerEvent] = []
    with pytest.raises(ServiceUnavailable):
        events.extend(stream)
    assert events == [
        ContainerEvent(
            action="die",
            container_id="abc",
            game_id="g1",
            time=datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC),
            exit_code=137,
        )
    ]

    closed = DockerEventStream(cast(Any, _EndedStream([owned])), "default")
    closed.close()
    assert list(closed) == []


# -- availability ---------------------------------------------------------------


@pytest.fixture
def daemon_socket_path() -> str:
    if not DOCKER_HOST.startswith("unix://"):
        pytest.skip("needs the daemon on a unix socket")
    return DOCKER_HOST.removeprefix("unix://")


@pytest.fixture
def daemon_proxy(daemon_socket_path: str, test_id: str) -> Iterator[DockerSocketProxy]:
    """A proxy in front of the daemon's socket, closed (held requests given up) afterwards."""
    proxy = DockerSocketProxy(f"/tmp/gx-{test_id}.sock", upstream=daemon_socket_path)
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.close()


def test_daemon_disconnect_while_following_events_raises_service_unavailable(
    daemon_socket_path: str, cluster: str, test_id: str
) -> None:
    proxy = DockerSocketProxy(f"/tmp/gx-{test_id}.sock", upstream=daemon_socket_path)
    adapter = DockerEngineAdapter(base_url=proxy.url, cluster=cluster)
    try:
        stream = adapter.follow_events()
        received, consumer = consume(stream)
        proxy.cut()
        item = received.get(timeout=5)
        assert isinstance(item, ServiceUnavailable), item
        consumer.join(timeout=5)
        assert not consumer.is_alive()
    finally:
        adapter.close()
        proxy.close()


def test_daemon_that_does_not_answer_in_time_is_service_unavailable(test_id: str) -> None:
    proxy = DockerSocketProxy(f"/tmp/gx-{test_id}.sock", upstream=None)
    adapter = DockerEngineAdapter(
        base_url=proxy.url, cluster="default", timeout=timedelta(seconds=1)
    )
    try:
        began = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="timed out"):
            adapter.ping()
        assert time.monotonic() - began < 5
    finally:
        adapter.close()
        proxy.close()


def test_ping_answers_on_the_local_daemon(engine: DockerEngineAdapter) -> None:
    engine.ping()


def test_ping_passes_whether_or_not_the_engine_network_exists(
    engine: DockerEngineAdapter, network: str, cluster: str, test_id: str
) -> None:
    for engine_network in (network, f"galaxy-absent-{test_id}"):
        adapter = DockerEngineAdapter(
            base_url=DOCKER_HOST, cluster=cluster, engine_network=engine_network
        )
        try:
            adapter.ping()
        finally:
            adapter.close()


def test_ping_fails_within_its_bound_while_the_daemon_answers_no_network_listing(
    daemon_proxy: DockerSocketProxy, cluster: str, test_id: str
) -> None:
    # Docker 20.10's libnetwork deadlock (moby/moby#42545) as clients see it:
    # `/_ping` answered, network listings never.
    engine_network = f"galaxy-t-{test_id}"
    adapter = DockerEngineAdapter(
        base_url=daemon_proxy.url,
        cluster=cluster,
        timeout=timedelta(seconds=30),
        engine_network=engine_network,
        probe_timeout=timedelta(seconds=1),
    )
    # What a bare `/_ping` check sees through the same proxy.
    bare = docker.APIClient(base_url=daemon_proxy.url, timeout=5)
    try:
        adapter.ping()
        daemon_proxy.hold_network_listings()

        began = time.monotonic()
        with pytest.raises(ServiceUnavailable) as caught:
            adapter.ping()
        took = time.monotonic() - began
        assert caught.value.message.startswith(
            "Docker answers /_ping but not a network listing within 1 s: the daemon may be wedged"
        )
        assert "docs/operations.md" in caught.value.message
        assert 0.9 <= took < 3, f"the probe took {took:.1f}s"
        assert bare.ping()
        # One listing, of the engine network by name, is what was held.
        assert len(daemon_proxy.held) == 1
        assert daemon_proxy.held[0].startswith("GET /v")
        assert engine_network in unquote(daemon_proxy.held[0])

        daemon_proxy.release()
        adapter.ping()
        assert bare.ping()
    finally:
        bare.close()
        adapter.close()


def test_a_held_listing_outlasting_the_probe_does_not_stall_the_next_probe(
    daemon_proxy: DockerSocketProxy, cluster: str
) -> None:
    adapter = DockerEngineAdapter(
        base_url=daemon_proxy.url, cluster=cluster, probe_timeout=timedelta(seconds=1)
    )
    try:
        daemon_proxy.hold_network_listings()
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="not a network listing"):
                adapter.ping()
            assert time.monotonic() - began < 3
        assert len(daemon_proxy.held) == 2
        daemon_proxy.release()
        # The listings the probes gave up on reach the daemon only now, on
        # connections their client has closed; the next probe uses a new one.
        adapter.ping()
        wait_for(lambda: daemon_proxy.waiting == 0, timeout=5, what="held listings forwarded")
    finally:
        adapter.close()


def test_adapter_on_a_missing_socket_reports_service_unavailable(test_id: str) -> None:
    adapter = DockerEngineAdapter(
        base_url=f"unix:///tmp/nonexistent-{test_id}.sock",
        cluster="default",
        timeout=timedelta(seconds=2),
    )
    try:
        with pytest.raises(ServiceUnavailable):
            adapter.ping()
        with pytest.raises(ServiceUnavailable):
            adapter.list_owned()
        with pytest.raises(ServiceUnavailable):
            adapter.inspect("galaxy-game-x")
        with pytest.raises(ServiceUnavailable):
            adapter.ensure_image(STUB_IMAGE, PullPolicy.IF_MISSING)
        with pytest.raises(ServiceUnavailable):
            adapter.follow_events()
    finally:
        adapter.close()
