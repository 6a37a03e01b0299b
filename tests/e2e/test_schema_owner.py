"""One cluster per schema: a deployment of another cluster on the same schema is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import docker
import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.operation import OpKind
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import REPO, ServerProcess, eventually, free_port, run_cli

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


def set_owner(schema: str, cluster: str) -> None:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".schema_owner SET cluster = %s', (cluster,))


def test_a_second_cluster_on_the_same_schema_is_refused_and_disposes_nothing(
    server: ServerProcess, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    with RuntimeManagerClient(server.address, timeout=60) as client:
        first = client.start_runtime("staying", STUB)
    schema = server.env["RTMANAGER_POSTGRES_SCHEMA"]
    cluster = server.env["RTMANAGER_CLUSTER"]
    staging = dict(server.env)
    staging.update(
        {
            "RTMANAGER_CLUSTER": f"{cluster}-staging",
            "RTMANAGER_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "RTMANAGER_REDIS_PREFIX": f"{server.env['RTMANAGER_REDIS_PREFIX']}staging:",
            "RTMANAGER_INSTANCE_ID": "staging-replica",
        }
    )

    migrated = run_cli(staging, "migrate")
    assert migrated.returncode == 1
    assert f"belongs to rtmanager cluster {cluster!r}" in migrated.stderr

    refused = subprocess.run(
        [sys.executable, "-m", "rtmanager.cli", "serve"],
        env=staging,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert f"belongs to rtmanager cluster {cluster!r}" in refused.stderr
    assert f"{cluster}-staging" in refused.stderr

    with RuntimeManagerClient(server.address, timeout=60) as client:
        after = client.get_runtime("staying")
        assert after.status is RuntimeStatus.RUNNING
        assert after.current_container_id == first.current_container_id
        kinds = [op.op_kind for op in client.iter_operations(game_id="staying")]
        assert OpKind.RECONCILE_DISPOSE not in kinds
    assert docker_client.containers.get(first.current_container_id).status == "running"
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING

    # Health says so too, should the stamp ever name another cluster.
    set_owner(schema, f"{cluster}-staging")
    try:
        eventually(
            lambda: health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
            within=15,
            every=0.2,
        )
    finally:
        set_owner(schema, cluster)
    eventually(
        lambda: health(server.address) == health_pb2.HealthCheckResponse.SERVING,
        within=15,
        every=0.2,
    )
