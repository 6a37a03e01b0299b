"""The real server as a separate process, isolated per test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DOCKER_HOST, POSTGRES_DSN, REDIS_URL

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def eventually(
    probe: Callable[[], T | Literal[False] | None], *, within: float, every: float = 0.05
) -> T:
    """Poll `probe` until it returns something truthy; fail after `within` seconds.

    A probe may return False or None for "not yet" (`ready and value`, `value or None`);
    only a truthy value is returned.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within}s"
        time.sleep(every)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running `rtmanager serve` and how to reach it."""

    process: subprocess.Popen[bytes]
    address: str
    env: dict[str, str]
    log_path: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def server_env(
    *, pg_schema: str, redis_prefix: str, cluster: str, state_root: Path, port: int
) -> dict[str, str]:
    """Environment of a test server: its own schema, prefix, cluster, network and port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTMANAGER_")}
    env.update(
        {
            "RTMANAGER_GRPC_ADDR": f"127.0.0.1:{port}",
            # One replica, one name: a restarted server (same port) takes
            # back its own pending jobs; another replica gets its own.
            "RTMANAGER_INSTANCE_ID": f"rtm-{port}",
            "RTMANAGER_POSTGRES_DSN": POSTGRES_DSN,
            "RTMANAGER_POSTGRES_SCHEMA": pg_schema,
            "RTMANAGER_POSTGRES_POOL_SIZE": "4",
            "RTMANAGER_REDIS_URL": REDIS_URL,
            "RTMANAGER_REDIS_PREFIX": redis_prefix,
            "RTMANAGER_CLUSTER": cluster,
            "RTMANAGER_DOCKER_HOST": DOCKER_HOST,
            "RTMANAGER_ENGINE_NETWORK": f"galaxy-{cluster}",
            "RTMANAGER_STATE_ROOT": str(state_root),
            "RTMANAGER_METRICS_ADDR": "",
            "RTMANAGER_LOG_FORMAT": "json",
            "RTMANAGER_LOG_LEVEL": "info",
            # Engine images are local; never reach for a registry from a test.
            "RTMANAGER_IMAGE_PULL_POLICY": "never",
            "RTMANAGER_SHUTDOWN_GRACE": "10s",
            "RTMANAGER_START_JOBS_STREAM": f"{redis_prefix}start_jobs",
            "RTMANAGER_STOP_JOBS_STREAM": f"{redis_prefix}stop_jobs",
            "RTMANAGER_JOB_RESULTS_STREAM": f"{redis_prefix}job_results",
            "RTMANAGER_DEAD_LETTER_STREAM": f"{redis_prefix}dead_letter",
            "RTMANAGER_CONTAINER_LABELS": f"com.galaxy.test={cluster.removeprefix('test-')}",
        }
    )
    return env


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `rtmanager ARGS` with `env` and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "rtmanager.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until grpc.health.v1 reports SERVING for the whole server."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} did not report SERVING in {timeout}s")


def replica_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of another replica of the same deployment: its own port and name."""
    port = free_port()
    return {
        **env,
        "RTMANAGER_GRPC_ADDR": f"127.0.0.1:{port}",
        "RTMANAGER_INSTANCE_ID": f"rtm-{port}",
    }


def start_server(env: dict[str, str], log_path: Path) -> ServerProcess:
    """Start `rtmanager serve` with `env` and wait until it is SERVING."""
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "rtmanager.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    handle = ServerProcess(process, env["RTMANAGER_GRPC_ADDR"], env, log_path)
    try:
        wait_serving(handle.address, process)
    except Exception:
        handle.stop(5)
        raise RuntimeError(f"server did not come up:\n{handle.log()[-4000:]}") from None
    return handle


@pytest.fixture
def server_environment(
    pg_schema: str, redis_prefix: str, cluster: str, state_root: Path, docker_cleanup: str
) -> dict[str, str]:
    """A migrated schema and the environment of a server of this test's own."""
    env = server_env(
        pg_schema=pg_schema,
        redis_prefix=redis_prefix,
        cluster=cluster,
        state_root=state_root,
        port=free_port(),
    )
    migrated = run_cli(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return env


@pytest.fixture
def server(server_environment: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    """A running server; stopped (SIGTERM) after the test."""
    handle = start_server(server_environment, tmp_path / "server.log")
    try:
        yield handle
    finally:
        code = handle.stop()
        if code not in (0, -signal.SIGTERM):
            sys.stderr.write(handle.log()[-4000:])


GM_TOKEN = "gm-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def auth_server(server_environment: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    """A server that requires the Game Master or admin token."""
    env = dict(server_environment)
    env["RTMANAGER_AUTH_TOKENS"] = f"game_master={GM_TOKEN},admin={ADMIN_TOKEN}"
    handle = start_server(env, tmp_path / "server.log")
    try:
        yield handle
    finally:
        handle.stop()
