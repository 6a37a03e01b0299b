"""Authentication and authorisation: no token, Game Master token, admin token, for every RPC."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api.errors import error_info_of
from rtmanager.client import (
    ClientCredentials,
    RuntimeManagerClient,
    ServiceUnavailableError,
    UnauthenticatedError,
)
from rtmanager.domain.operation import OpSource
from tests.e2e.conftest import ADMIN_TOKEN, GM_TOKEN, ServerProcess, run_cli

pytestmark = pytest.mark.e2e


# (service, method, request, admin only). Requests name a game that does not
# exist or an image outside the allowlist, so an authorised call fails on its
# merits without touching Docker.
RPCS: list[tuple[str, str, Any, bool]] = [
    ("runtime", "StartRuntime", pb.StartRuntimeRequest(game_id="g", image_ref="evil/x:1"), False),
    ("runtime", "StopRuntime", pb.StopRuntimeRequest(game_id="nope"), False),
    ("runtime", "RestartRuntime", pb.RestartRuntimeRequest(game_id="nope"), False),
    (
        "runtime",
        "PatchRuntime",
        pb.PatchRuntimeRequest(game_id="nope", image_ref="galaxy/engine-stub:1.0.1"),
        False,
    ),
    ("runtime", "GetRuntime", pb.GetRuntimeRequest(game_id="nope"), False),
    ("runtime", "ListRuntimes", pb.ListRuntimesRequest(), False),
    ("runtime", "WatchRuntimes", pb.WatchRuntimesRequest(), False),
    ("admin", "CleanupRuntime", pb.CleanupRuntimeRequest(game_id="nope"), True),
    ("admin", "ListOperations", pb.ListOperationsRequest(), True),
    ("admin", "Reconcile", pb.ReconcileRequest(dry_run=True), True),
    ("admin", "ExplainRuntime", pb.ExplainRuntimeRequest(game_id="nope"), True),
]
AUTH_REASONS = {"unauthenticated", "permission_denied"}


def call(
    channel: grpc.Channel, service: str, method: str, request: Any, token: str | None
) -> grpc.RpcError | None:
    stub: Any = (
        pb_grpc.RuntimeServiceStub(channel)
        if service == "runtime"
        else pb_grpc.RuntimeAdminServiceStub(channel)
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        if method == "WatchRuntimes":
            # An authorised watch just waits for changes: its deadline ends it.
            next(iter(stub.WatchRuntimes(request, timeout=1, metadata=metadata)))
        else:
            getattr(stub, method)(request, timeout=30, metadata=metadata)
    except grpc.RpcError as error:
        return error
    return None


def reason_of(error: grpc.RpcError | None) -> str:
    if error is None:
        return "ok"
    info = error_info_of(error)
    return info.reason if info is not None else error.code().name.lower()


@pytest.mark.parametrize(("service", "method", "request_", "admin_only"), RPCS)
def test_every_rpc_needs_a_token_and_admin_rpcs_need_the_admin_role(
    auth_server: ServerProcess, service: str, method: str, request_: Any, admin_only: bool
) -> None:
    with auth_server.channel() as channel:
        anonymous = call(channel, service, method, request_, None)
        assert anonymous is not None
        assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(anonymous) == "unauthenticated"

        forged = call(channel, service, method, request_, "not-a-token-at-all-really")
        assert forged is not None and forged.code() == grpc.StatusCode.UNAUTHENTICATED

        game_master = call(channel, service, method, request_, GM_TOKEN)
        if admin_only:
            assert game_master is not None
            assert game_master.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(game_master) == "permission_denied"
        else:
            assert reason_of(game_master) not in AUTH_REASONS

        admin = call(channel, service, method, request_, ADMIN_TOKEN)
        assert reason_of(admin) not in AUTH_REASONS


def test_health_and_reflection_need_no_token(auth_server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with auth_server.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_op_source_comes_from_the_authenticated_principal(auth_server: ServerProcess) -> None:
    with RuntimeManagerClient(auth_server.address, token=GM_TOKEN) as game_master:
        with pytest.raises(Exception):
            game_master.stop_runtime("unknown-game")
        with pytest.raises(Exception):
            game_master.start_runtime("src-game", "evil/engine:1.0.0")
    with RuntimeManagerClient(auth_server.address, token=ADMIN_TOKEN) as admin:
        with pytest.raises(Exception):
            admin.start_runtime("src-game", "evil/engine:2.0.0")
        rows = list(admin.iter_operations(game_id="src-game"))
        with pytest.raises(UnauthenticatedError):
            RuntimeManagerClient(auth_server.address).get_runtime("src-game")
    sources = {row.image_ref: row.op_source for row in rows}
    assert sources == {
        "evil/engine:1.0.0": OpSource.GM_REST,
        "evil/engine:2.0.0": OpSource.ADMIN_REST,
    }
    assert all(row.error_code == "image_not_allowed" for row in rows)


def test_binding_beyond_loopback_without_tokens_is_refused(
    server_environment: dict[str, str],
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_GRPC_ADDR"] = "0.0.0.0:0"
    result = run_cli(env, "serve", timeout=30)
    assert result.returncode == 2
    assert "without authentication" in result.stderr


def test_malformed_token_configuration_is_refused(server_environment: dict[str, str]) -> None:
    env = dict(server_environment)
    env["RTMANAGER_AUTH_TOKENS"] = "root=abcdefabcdefabcdef"
    result = run_cli(env, "serve", timeout=30)
    assert result.returncode == 2
    assert "unknown role" in result.stderr


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            f"{name}.crt",
            "-extfile",
            "san.ext",
        )
    return {
        name: directory / name
        for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
    }


def test_mutual_tls_admits_only_clients_with_a_certificate(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    certs = make_certificates(tmp_path)
    env = dict(server_environment)
    env.update(
        {
            "RTMANAGER_TLS_CERT": str(certs["server.crt"]),
            "RTMANAGER_TLS_KEY": str(certs["server.key"]),
            "RTMANAGER_TLS_CLIENT_CA": str(certs["ca.crt"]),
        }
    )
    process = subprocess.Popen(
        [__import__("sys").executable, "-m", "rtmanager.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("wb"),
    )
    try:
        ca = certs["ca.crt"].read_bytes()
        with_cert = ClientCredentials(
            root_certificates=ca,
            private_key=certs["client.key"].read_bytes(),
            certificate_chain=certs["client.crt"].read_bytes(),
        )
        address = env["RTMANAGER_GRPC_ADDR"]
        import time

        deadline = time.monotonic() + 30
        while True:
            try:
                with RuntimeManagerClient(address, tls=with_cert, timeout=5) as client:
                    assert client.list_runtimes().items == []
                break
            except ServiceUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        without_cert = ClientCredentials(root_certificates=ca)
        with (
            RuntimeManagerClient(address, tls=without_cert, timeout=5) as client,
            pytest.raises(ServiceUnavailableError),
        ):
            client.list_runtimes()
    finally:
        process.terminate()
        process.wait(timeout=30)
