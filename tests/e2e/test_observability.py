"""Metrics on the Prometheus endpoint and structured logs, as an operator sees them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from rtmanager.client import RuntimeManagerClient
from tests.e2e.conftest import free_port, start_server

pytestmark = pytest.mark.e2e


def test_operations_are_counted_timed_and_logged(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    port = free_port()
    env["RTMANAGER_METRICS_ADDR"] = f"127.0.0.1:{port}"
    server = start_server(env, tmp_path / "server.log")
    try:
        with RuntimeManagerClient(server.address) as client:
            client.start_runtime("observed", "galaxy/engine-stub:1.0.0")
            with pytest.raises(Exception):
                client.start_runtime("observed", "evil/engine:1.0.0")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
    finally:
        server.stop()
    counted = [line for line in metrics.splitlines() if line.startswith("rtmanager_operations")]
    assert any(
        'op_kind="start"' in line
        and 'outcome="success"' in line
        and 'op_source="admin_rest"' in line
        for line in counted
    ), counted
    assert any('error_code="image_not_allowed"' in line for line in counted), counted
    assert "rtmanager_operation_duration_seconds_bucket" in metrics
    assert "rtmanager_lease_acquire_seconds_bucket" in metrics
    assert any(
        "rtmanager_docker_call_seconds_bucket" in line and 'call="create_container"' in line
        for line in metrics.splitlines()
    )
    assert any(
        "rtmanager_runtimes" in line and 'status="running"' in line for line in metrics.splitlines()
    )

    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    done = [
        line
        for line in lines
        if line.get("message") == "operation succeeded" and line.get("game_id") == "observed"
    ]
    assert done and done[0]["op_kind"] == "start" and done[0]["duration_ms"] > 0
