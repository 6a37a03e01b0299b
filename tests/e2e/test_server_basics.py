"""The server as Game Master and operators see it: health, reflection, reads, errors."""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import REPO, ServerProcess, eventually, free_port, run_cli

pytestmark = pytest.mark.e2e

BUF = REPO / "node_modules" / ".bin" / "buf"


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def seed_records(schema: str, count: int) -> list[str]:
    """Insert `count` records straight into the store; return their game ids."""
    pool = create_pool(POSTGRES_DSN, schema, max_size=2, timeout=timedelta(seconds=5))
    units = PostgresUnitOfWorkFactory(pool)
    now = datetime.now(UTC)
    ids = []
    try:
        with units() as uow:
            for index in range(count):
                game_id = f"game-{index:03d}"
                running = index % 2 == 0
                uow.records.upsert(
                    RuntimeRecord(
                        game_id=game_id,
                        status=RuntimeStatus.RUNNING if running else RuntimeStatus.STOPPED,
                        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
                        state_path=f"/var/lib/galaxy/games/{game_id}",
                        docker_network="galaxy-engines",
                        last_op_at=now,
                        created_at=now,
                        current_container_id=f"c{index}",
                        current_image_ref="galaxy/engine-stub:1.0.0",
                        started_at=now,
                        stopped_at=None if running else now,
                    )
                )
                ids.append(game_id)
            uow.commit()
    finally:
        pool.close()
    return ids


def test_health_reports_serving_for_both_services(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in (
            "",
            "galaxy.rtmanager.v1.RuntimeService",
            "galaxy.rtmanager.v1.RuntimeAdminService",
        ):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_get_unknown_runtime_is_not_found_with_error_info(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = pb_grpc.RuntimeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRuntime(pb.GetRuntimeRequest(game_id="no-such-game"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "not_found"
    assert info.domain == "rtmanager.galaxy"
    assert info.metadata["game_id"] == "no-such-game"


@pytest.mark.parametrize("rpc", ["GetRuntime", "ListRuntimes"])
def test_a_read_whose_caller_gives_up_is_cancelled_in_postgresql_and_the_server_serves_on(
    server: ServerProcess, server_environment: dict[str, str], rpc: str
) -> None:
    # A read stuck behind a lock (a migration, a long transaction) must not
    # outlive its caller in PostgreSQL: the server cancels the statement at
    # the caller's deadline instead of leaving it to the session's 10 s
    # statement_timeout, and its pooled connection serves the next read.
    schema = server_environment["RTMANAGER_POSTGRES_SCHEMA"]
    seed_records(schema, 1)
    table = f'"{schema}".runtime_records'
    requests = {
        "GetRuntime": pb.GetRuntimeRequest(game_id="game-000"),
        "ListRuntimes": pb.ListRuntimesRequest(page_size=10),
    }

    def call(stub: pb_grpc.RuntimeServiceStub, timeout: float) -> object:
        return getattr(stub, rpc)(requests[rpc], timeout=timeout)

    with psycopg.connect(POSTGRES_DSN) as locker, server.channel() as channel:
        stub = pb_grpc.RuntimeServiceStub(channel)
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

        def waiting_for_the_table() -> int:
            cur = locker.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted",
                (table,),
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0

        with pytest.raises(grpc.RpcError) as caught:
            call(stub, timeout=1.0)
        # The caller's deadline, or the server's answer at that deadline.
        assert caught.value.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAVAILABLE,
        )
        # Still locked, yet nothing waits for the table any more: cancelled
        # in PostgreSQL well before the session's statement_timeout would.
        eventually(lambda: waiting_for_the_table() == 0, within=5)
        locker.rollback()

        assert call(stub, timeout=5)  # the same server, the same read pool


@pytest.mark.parametrize("game_id", ["../etc", "", "UPPER", "a b", "x" * 1024, "-lead"])
def test_get_with_malformed_game_id_is_invalid_argument(
    server: ServerProcess, game_id: str
) -> None:
    with server.channel() as channel:
        stub = pb_grpc.RuntimeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRuntime(pb.GetRuntimeRequest(game_id=game_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "invalid_request"


def test_get_and_list_runtimes_read_the_store(
    server: ServerProcess, server_environment: dict[str, str]
) -> None:
    ids = seed_records(server_environment["RTMANAGER_POSTGRES_SCHEMA"], 7)
    with server.channel() as channel:
        stub = pb_grpc.RuntimeServiceStub(channel)
        got = stub.GetRuntime(pb.GetRuntimeRequest(game_id="game-002"), timeout=5).runtime
        assert got.status == pb.RUNTIME_STATUS_RUNNING
        assert got.engine_endpoint == "http://galaxy-game-game-002:8080"
        assert got.HasField("started_at") and not got.HasField("stopped_at")

        seen, token = [], ""
        while True:
            page = stub.ListRuntimes(
                pb.ListRuntimesRequest(page_size=3, page_token=token), timeout=5
            )
            assert len(page.runtimes) <= 3
            seen += [record.game_id for record in page.runtimes]
            token = page.next_page_token
            if not token:
                break
        assert seen == ids

        stopped = stub.ListRuntimes(
            pb.ListRuntimesRequest(status=pb.RUNTIME_STATUS_STOPPED), timeout=5
        )
        assert [r.game_id for r in stopped.runtimes] == ids[1::2]
        assert not stopped.next_page_token

        with pytest.raises(grpc.RpcError) as caught:
            stub.ListRuntimes(pb.ListRuntimesRequest(page_token="garbage!"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListRuntimes(pb.ListRuntimesRequest(status=42), timeout=5)  # type: ignore[arg-type]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_buf_curl_lists_services_and_calls_get_runtime_through_reflection(
    server: ServerProcess,
) -> None:
    base = f"http://{server.address}"
    common = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    listed = subprocess.run(
        [*common, "--list-services", base], capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "galaxy.rtmanager.v1.RuntimeService",
        "galaxy.rtmanager.v1.RuntimeAdminService",
        "grpc.health.v1.Health",
    } <= services

    called = subprocess.run(
        [
            *common,
            "--data",
            json.dumps({"game_id": "../etc"}),
            f"{base}/galaxy.rtmanager.v1.RuntimeService/GetRuntime",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert called.returncode != 0
    reply = json.loads(called.stderr)
    assert reply["code"] == "invalid_argument"
    (detail,) = reply["details"]
    assert detail["type"] == "google.rpc.ErrorInfo"
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "=="))
    assert info.reason == "invalid_request"
    assert info.domain == "rtmanager.galaxy"


def test_server_refuses_a_schema_newer_than_it_knows(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    schema = server_environment["RTMANAGER_POSTGRES_SCHEMA"]
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".schema_migrations (version, name, applied_at) '
            "VALUES (9999, 'from_the_future', now())"
        )
    result = run_cli(server_environment, "serve", timeout=60)
    assert result.returncode != 0
    assert "schema" in result.stderr.lower()
    assert "9999" in result.stderr or "newer" in result.stderr.lower()


def test_bad_configuration_is_reported_per_variable(server_environment: dict[str, str]) -> None:
    env = dict(server_environment)
    env["RTMANAGER_GAME_LEASE_TTL"] = "forever"
    env["RTMANAGER_ENGINE_PORT"] = "99999"
    result = run_cli(env, "serve", timeout=30)
    assert result.returncode == 2
    assert "RTMANAGER_GAME_LEASE_TTL='forever'" in result.stderr
    assert "RTMANAGER_ENGINE_PORT='99999'" in result.stderr


def test_a_misspelt_variable_stops_serve_and_migrate_with_the_name_meant(
    server_environment: dict[str, str],
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_STOP_TIMOUT"] = "5s"
    for command in ("serve", "migrate"):
        result = run_cli(env, command, timeout=30)
        assert result.returncode == 2, result.stderr
        assert (
            "RTMANAGER_STOP_TIMOUT: unknown variable; did you mean RTMANAGER_STOP_TIMEOUT?"
            in result.stderr
        )


def test_variables_of_the_test_scripts_and_the_client_do_not_stop_the_server(
    server_environment: dict[str, str],
) -> None:
    env = {
        **server_environment,
        "RTMANAGER_TEST_WORKERS": "3",
        "RTMANAGER_SOAK_SECONDS": "0",
        "RTMANAGER_CTL_TOKEN": "a-token",
    }
    result = run_cli(env, "migrate", timeout=60)
    assert result.returncode == 0, result.stderr


def test_sigterm_drains_and_exits_cleanly(server: ServerProcess) -> None:
    assert server.stop() == 0
    assert '"message": "stopped"' in server.log()


def test_buf_curl_starts_and_stops_a_runtime_through_reflection(server: ServerProcess) -> None:
    base = f"http://{server.address}/galaxy.rtmanager.v1.RuntimeService"
    common = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]

    def curl(method: str, body: dict[str, str]) -> dict[str, object]:
        done = subprocess.run(
            [*common, "--data", json.dumps(body), f"{base}/{method}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        reply: dict[str, object] = json.loads(done.stdout)
        return reply

    started = curl("StartRuntime", {"gameId": "curl", "imageRef": "galaxy/engine-stub:1.0.0"})
    assert started["runtime"]["status"] == "RUNTIME_STATUS_RUNNING"  # type: ignore[index]
    stopped = curl("StopRuntime", {"gameId": "curl", "reason": "STOP_REASON_GAME_FINISHED"})
    assert stopped["runtime"]["status"] == "RUNTIME_STATUS_STOPPED"  # type: ignore[index]


def test_the_health_command_exits_by_what_the_server_answers(
    server: ServerProcess, server_environment: dict[str, str]
) -> None:
    serving = run_cli(server_environment, "health")
    unknown = run_cli(server_environment, "health", "--service", "no.such.Service")
    unreachable = run_cli(
        server_environment, "health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "1"
    )

    assert (serving.returncode, serving.stdout.strip()) == (0, f"{server.address}: SERVING")
    assert unknown.returncode == 1 and "unknown service" in unknown.stdout
    assert unreachable.returncode == 7 and "unreachable: UNAVAILABLE" in unreachable.stdout
