"""Metrics on the Prometheus endpoint and structured logs, as an operator sees them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.client import RuntimeManagerClient
from tests.conftest import REDIS_URL
from tests.e2e.conftest import ServerProcess, eventually, free_port, start_server

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


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_log_lines_of_a_call_and_of_a_lobby_job_carry_their_span_ids(
    server: ServerProcess, server_environment: dict[str, str]
) -> None:
    stub = pb_grpc.RuntimeServiceStub(server.channel())
    stub.StartRuntime(
        pb.StartRuntimeRequest(game_id="traced-call", image_ref="galaxy/engine-stub:1.0.0"),
        metadata=(("traceparent", f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"),),
        timeout=60,
    )
    streams = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        entry_id = streams.xadd(
            server_environment["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": "traced-call"}
        )
    finally:
        streams.close()

    def finished(op_kind: str) -> dict[str, Any] | None:
        lines: list[dict[str, Any]] = [
            json.loads(line) for line in server.log().splitlines() if line.startswith("{")
        ]
        for line in lines:
            if line.get("message") == "operation succeeded" and line.get("op_kind") == op_kind:
                return line
        return None

    called = eventually(lambda: finished("start"), within=30)
    job = eventually(lambda: finished("stop"), within=60)

    # The call's lines continue the caller's trace, in a span of the server's own.
    assert called["trace_id"] == CALLER_TRACE
    assert len(called["span_id"]) == 16 and called["span_id"] != "00f067aa0ba902b7"
    # The job's lines name its entry and a trace of their own.
    assert job["job_id"] == entry_id and job["stream"].endswith("stop_jobs")
    assert len(job["trace_id"]) == 32 and job["trace_id"] != CALLER_TRACE
    assert len(job["span_id"]) == 16
