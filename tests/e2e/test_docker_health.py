"""Health of a server whose Docker daemon answers `/_ping` but no network listing.

Docker 20.10's libnetwork deadlock (moby/moby#42545, docs/operations.md)
leaves `/_ping` answered while container lifecycle calls and network
listings hang. The server here talks to the real daemon through a proxy
(tests/support/docker_proxy.py) that can hold network listings, which is
how such a daemon looks from rtmanager's side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DOCKER_HOST
from tests.e2e.conftest import ServerProcess, eventually, start_server
from tests.support.docker_proxy import DockerSocketProxy

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A health check every 2 s, a probe that waits 3 s (the defaults): the
# status follows the daemon within about 5 s; this leaves room for a slow
# machine.
FOLLOWS_WITHIN = 12.0


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return int(reply.status)


def unhealthy_docker_problems(server: ServerProcess) -> list[str]:
    """The problems the server logged for its Docker check."""
    problems = []
    for line in server.log().splitlines():
        try:
            fields = json.loads(line)
        except ValueError:
            continue  # not a log record, or one still being written
        if not isinstance(fields, dict):
            continue
        if fields.get("message") == "dependency unhealthy" and fields.get("check") == "docker":
            problems.append(str(fields.get("problem")))
    return problems


@pytest.fixture
def proxy(test_id: str) -> Iterator[DockerSocketProxy]:
    if not DOCKER_HOST.startswith("unix://"):
        pytest.skip("needs the daemon on a unix socket")
    proxy = DockerSocketProxy(
        f"/tmp/gx-{test_id}.sock", upstream=DOCKER_HOST.removeprefix("unix://")
    )
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.close()


def test_a_daemon_that_answers_ping_but_no_network_listing_makes_health_not_serving(
    server_environment: dict[str, str], proxy: DockerSocketProxy, tmp_path: Path
) -> None:
    env = {**server_environment, "RTMANAGER_DOCKER_HOST": proxy.url}
    server = start_server(env, tmp_path / "server.log")
    try:
        assert health(server.address) == SERVING

        proxy.hold_network_listings()
        eventually(lambda: health(server.address) == NOT_SERVING, within=FOLLOWS_WITHIN, every=0.2)
        assert proxy.held
        problems = unhealthy_docker_problems(server)
        assert problems, server.log()[-4000:]
        assert "answers /_ping but not a network listing within 3 s" in problems[-1]
        assert "docs/operations.md" in problems[-1]

        proxy.release()
        eventually(lambda: health(server.address) == SERVING, within=FOLLOWS_WITHIN, every=0.2)
    finally:
        # The listings given up on reached the daemon at the release, on
        # connections the server had closed: nothing of them may hold up the drain.
        began = time.monotonic()
        code = server.stop(timeout=20)
        stopped_in = time.monotonic() - began
    assert code == 0, server.log()[-4000:]
    assert stopped_in < 10, f"shutdown took {stopped_in:.1f}s"
