"""The service image: built here from the Dockerfile, run against this host's services.

No registry is reachable, so the base is Debian bookworm made from Debian's
packages (`scripts/build-base-image.sh`: debootstrap, `docker import`) and
the Python packages come from a wheelhouse made on the host (`pip wheel`),
exactly as the Dockerfile's comment tells an offline builder. The container
runs as its non-root user with the host's Docker socket, on the host's
network (dockerd runs here without a bridge), and is called as Game Master
would call it once its HEALTHCHECK says healthy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import DOCKER_HOST, TEST_LABEL
from tests.e2e.conftest import REPO, free_port

pytestmark = pytest.mark.e2e

SERVICE_UID = 10001
BUILD_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "constraints.txt", "README.md")
BUILD_DIRS = ("rtmanager", "migrations")
# The project, what builds it (the image installs it from source), and what
# redis-py needs on bookworm's Python 3.11.2 but not on the host's newer one.
WHEELHOUSE = ("-w", "wheelhouse", ".", "setuptools>=77", "wheel", "async-timeout>=4.0.3")


@pytest.fixture(scope="module")
def base_image() -> str:
    """Debian bookworm with python3, from Debian's packages (built once, then kept)."""
    built = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-base-image.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture
def service_image(
    base_image: str, docker_client: Any, tmp_path: Path, test_id: str
) -> Iterator[str]:
    """The service image built from this checkout's Dockerfile; removed afterwards."""
    context = tmp_path / "context"
    context.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, context / name)
    for name in BUILD_DIRS:
        shutil.copytree(REPO / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-c", "constraints.txt", *WHEELHOUSE],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert wheels.returncode == 0, wheels.stderr[-4000:]
    tag = f"rtmanager-test/service:{test_id}"
    # The build stage ends as an untagged image of its own: removed afterwards too.
    dangling_before = {image.id for image in docker_client.images.list(filters={"dangling": True})}
    try:
        docker_client.images.build(
            path=str(context),
            tag=tag,
            buildargs={
                "BASE": base_image,
                "PIP_INSTALL_ARGS": "--no-index --find-links /wheelhouse",
            },
            network_mode="host",
            rm=True,
            forcerm=True,
            labels={TEST_LABEL: test_id},
            timeout=900,
        )
    except docker.errors.BuildError as error:
        log = "".join(str(chunk.get("stream", chunk)) for chunk in error.build_log)
        pytest.fail(f"image build failed: {error}\n{log[-4000:]}")
    try:
        yield tag
    finally:
        docker_client.images.remove(tag, force=True)
        for image in docker_client.images.list(filters={"dangling": True}):
            if image.id not in dangling_before:
                with contextlib.suppress(docker.errors.APIError):
                    docker_client.images.remove(image.id, force=True)


def container_env(server_environment: dict[str, str], port: int) -> dict[str, str]:
    """The test server's settings, for the containerised service."""
    env = {k: v for k, v in server_environment.items() if k.startswith("RTMANAGER_")}
    env["RTMANAGER_GRPC_ADDR"] = f"127.0.0.1:{port}"
    env["RTMANAGER_METRICS_ADDR"] = ""
    return env


def test_the_image_runs_as_a_non_root_user_turns_healthy_and_serves_game_master(
    service_image: str,
    server_environment: dict[str, str],
    state_root: Path,
    docker_client: Any,
    docker_cleanup: str,
) -> None:
    os.chown(state_root, SERVICE_UID, SERVICE_UID)
    port = free_port()
    socket_path = DOCKER_HOST.removeprefix("unix://")
    container = docker_client.containers.run(
        service_image,
        detach=True,
        name=f"rtmanager-image-{docker_cleanup}",
        labels={TEST_LABEL: docker_cleanup},
        network_mode="host",
        environment=container_env(server_environment, port),
        volumes={
            socket_path: {"bind": "/var/run/docker.sock", "mode": "rw"},
            str(state_root): {"bind": str(state_root), "mode": "rw"},
        },
        group_add=[str(os.stat(socket_path).st_gid)],
        healthcheck={"interval": 1_000_000_000, "timeout": 6_000_000_000, "retries": 3},
    )
    address = f"127.0.0.1:{port}"
    health = wait_for_health(container, timeout=90)
    assert health == "healthy", container.logs(tail=50).decode(errors="replace")

    container.reload()
    assert container.attrs["Config"]["User"] == f"{SERVICE_UID}:{SERVICE_UID}"
    uid = container.exec_run(["id", "-u"]).output.decode().strip()
    assert uid == str(SERVICE_UID)
    probe = container.exec_run(["rtmanager", "health"])
    assert probe.exit_code == 0 and b"SERVING" in probe.output

    with grpc.insecure_channel(address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"galaxy.rtmanager.v1.RuntimeService", "grpc.health.v1.Health"} <= services

    with RuntimeManagerClient(address) as client:
        started = client.start_runtime("imaged", "galaxy/engine-stub:1.0.0")
        assert started.status is RuntimeStatus.RUNNING
        engine = docker_client.containers.get(started.current_container_id)
        assert engine.status == "running"
        # Not root, and able to write the state directory the service made.
        assert engine.attrs["Config"]["User"] == f"{SERVICE_UID}:{SERVICE_UID}"
        assert (state_root / "imaged").stat().st_uid == SERVICE_UID
        assert (state_root / "imaged" / "started").stat().st_uid == SERVICE_UID
        stopped = client.stop_runtime("imaged")
        assert stopped.status is RuntimeStatus.STOPPED


def wait_for_health(container: Any, timeout: float) -> str:
    """The container's health once it is no longer `starting` (or its last word)."""
    deadline = time.monotonic() + timeout
    status = "starting"
    while time.monotonic() < deadline:
        container.reload()
        if container.status != "running":
            return f"exited: {container.status}"
        status = container.attrs["State"].get("Health", {}).get("Status", "none")
        if status not in ("starting", "none"):
            return str(status)
        time.sleep(0.5)
    return status
