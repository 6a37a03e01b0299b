"""`rtmanager ctl` without a server: parsing, output shapes and exit codes."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from rtmanager import cli, ctl
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api import convert
from rtmanager.api.errors import rich_status
from rtmanager.client import (
    ConflictError,
    ContainerStartFailedError,
    ImageNotAllowedError,
    ImagePullFailedError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RuntimeManagerClient,
    RuntimeManagerClientError,
    SemverPatchOnlyError,
    ServiceUnavailableError,
    UnauthenticatedError,
    UnimplementedError,
    watch_request,
)
from rtmanager.ctl.commands import parse_timestamp
from rtmanager.ctl.connection import Connection
from rtmanager.ctl.errors import EXIT_UNAVAILABLE, exit_code_for
from rtmanager.domain.explanation import RuntimeExplanation
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import Page
from tests.unit.test_explain_wire import full_explanation

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
CONTAINER = "0123456789abcdef" * 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def record(game_id: str = "g1", status: RuntimeStatus = RuntimeStatus.RUNNING) -> RuntimeRecord:
    return RuntimeRecord(
        game_id=game_id,
        status=status,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/games/{game_id}",
        docker_network="galaxy-engines",
        last_op_at=T0 + timedelta(minutes=5),
        created_at=T0,
        current_container_id=CONTAINER,
        current_image_ref="galaxy/engine-stub:1.0.0",
        started_at=T0,
    )


def entry(entry_id: int, kind: OpKind = OpKind.START) -> OperationEntry:
    return OperationEntry(
        id=entry_id,
        game_id="g1",
        op_kind=kind,
        op_source=OpSource.ADMIN_REST,
        outcome=Outcome.FAILURE if kind is OpKind.PATCH else Outcome.SUCCESS,
        started_at=T0 + timedelta(seconds=entry_id),
        finished_at=T0 + timedelta(seconds=entry_id + 1),
        source_ref="req-1",
        image_ref="galaxy/engine-stub:1.0.0",
        container_id=CONTAINER,
        error_code="semver_patch_only" if kind is OpKind.PATCH else "",
    )


class StubSession(RuntimeManagerClient):
    """The client with every RPC answered here: records each call; raises `fail` when set.

    What the client builds on its RPCs (paging through `iter_runtimes`, the
    watch request) is the client's own.
    """

    def __init__(
        self,
        *,
        fail: BaseException | None = None,
        pages: list[Page[RuntimeRecord]] | None = None,
        watch: list[pb.WatchRuntimesResponse] | None = None,
        explanation: RuntimeExplanation | None = None,
    ) -> None:
        # No channel: nothing here goes over the wire.
        self.fail = fail
        self.pages = pages or [Page([record("g1"), record("g2", RuntimeStatus.STOPPED)], "")]
        self.watch = watch or []
        self.explanation = explanation or full_explanation()
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.closed = False
        self.connection: Connection | None = None

    def _called(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def start_runtime(
        self, game_id: str, image_ref: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        self._called("start", game_id, image_ref, source_ref=source_ref)
        return record(game_id)

    def stop_runtime(
        self,
        game_id: str,
        *,
        reason: StopReason = StopReason.ADMIN_REQUEST,
        source_ref: str = "",
        timeout: float | None = None,
    ) -> RuntimeRecord:
        self._called("stop", game_id, reason=reason, source_ref=source_ref)
        return record(game_id, RuntimeStatus.STOPPED)

    def restart_runtime(
        self, game_id: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        self._called("restart", game_id, source_ref=source_ref)
        return record(game_id)

    def patch_runtime(
        self, game_id: str, image_ref: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        self._called("patch", game_id, image_ref, source_ref=source_ref)
        return record(game_id)

    def get_runtime(self, game_id: str, *, timeout: float | None = None) -> RuntimeRecord:
        self._called("get", game_id)
        return record(game_id)

    def list_runtimes(
        self,
        *,
        status: RuntimeStatus | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> Page[RuntimeRecord]:
        self._called("list", status=status, page_size=page_size, page_token=page_token)
        index = int(page_token or 0)
        return self.pages[index]

    def cleanup_runtime(
        self,
        game_id: str,
        *,
        force: bool = False,
        source_ref: str = "",
        timeout: float | None = None,
    ) -> RuntimeRecord:
        self._called("cleanup", game_id, force=force, source_ref=source_ref)
        return record(game_id, RuntimeStatus.STOPPED)

    def list_operations(self, **filters: Any) -> Page[OperationEntry]:
        self._called("ops", **filters)
        return Page([entry(2, OpKind.PATCH), entry(1)], "tok-2")

    def reconcile(
        self, *, dry_run: bool = False, timeout: float | None = None
    ) -> pb.ReconcileResponse:
        self._called("reconcile", dry_run=dry_run)
        return pb.ReconcileResponse(
            dry_run=dry_run,
            adopted=1,
            actions=[
                pb.ReconcileAction(
                    kind=pb.RECONCILE_ACTION_KIND_ADOPT,
                    game_id="g9",
                    container_id=CONTAINER,
                    image_ref="galaxy/engine-stub:1.0.0",
                )
            ],
        )

    def explain_runtime(
        self, game_id: str, *, operations: int = 0, timeout: float | None = None
    ) -> RuntimeExplanation:
        self._called("explain", game_id, operations=operations)
        return self.explanation

    def watch_runtimes(
        self,
        request: pb.WatchRuntimesRequest | None = None,
        *,
        timeout: float | None = None,
        **filters: Any,
    ) -> Iterator[pb.WatchRuntimesResponse]:
        self._called("watch", request or watch_request(**filters))
        yield from self.watch

    def close(self) -> None:
        self.closed = True


def run(argv: list[str], session: StubSession | None = None) -> tuple[int, str, StubSession]:
    stub = session or StubSession()

    def connect(connection: Connection) -> StubSession:
        stub.connection = connection
        return stub

    out = io.StringIO()
    code = ctl.main(argv, connect=connect, stdout=out)
    return code, out.getvalue(), stub


# --- exit codes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError, 2),
        (NotFoundError, 3),
        (ConflictError, 4),
        (SemverPatchOnlyError, 5),
        (ImageNotAllowedError, 5),
        (ImagePullFailedError, 5),
        (ContainerStartFailedError, 5),
        (UnauthenticatedError, 6),
        (PermissionDeniedError, 6),
        (ServiceUnavailableError, 7),
        (InternalServerError, 1),
        (UnimplementedError, 1),
        (RuntimeManagerClientError, 1),
    ],
)
def test_each_error_class_has_its_exit_code_and_message(
    error: type[RuntimeManagerClientError], code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    failure = error("it went wrong", status=grpc.StatusCode.UNKNOWN)
    exit_code, out, stub = run(["get", "g1"], StubSession(fail=failure))
    assert exit_code == code
    assert out == ""
    label = error.error_code or "unknown"
    assert capsys.readouterr().err == f"rtmanager ctl: {label}: it went wrong\n"
    assert stub.closed


def test_deadline_exceeded_counts_as_service_unavailable() -> None:
    failure = ServiceUnavailableError("Deadline Exceeded", status=grpc.StatusCode.DEADLINE_EXCEEDED)
    assert exit_code_for(failure) == EXIT_UNAVAILABLE


def test_unreachable_server_exits_7_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    began = time.monotonic()
    code = ctl.main(["--addr", f"127.0.0.1:{free_port()}", "--timeout", "3", "get", "g1"])
    assert code == 7
    assert time.monotonic() - began < 10
    assert capsys.readouterr().err.startswith("rtmanager ctl: service_unavailable: ")


def test_cli_runs_ctl_without_server_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A broken server setting must not matter to the client.
    monkeypatch.setenv("RTMANAGER_ENGINE_PORT", "99999")
    monkeypatch.setenv("RTMANAGER_CTL_ADDR", f"127.0.0.1:{free_port()}")
    code = cli.main(["ctl", "--timeout", "3", "--json", "list"])
    assert code == 7
    assert "service_unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["rtmanager", "rtmanager.cli", "rtmanager.ctl"])
def test_each_module_entry_point_answers_help(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: rtmanager")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["get"],
        ["start", "g1"],
        ["frobnicate"],
        ["stop", "g1", "--reason", "boredom"],
        ["list", "--status", "dead"],
        ["list", "--page-size", "-1"],
        ["ops", "--since", "yesterday"],
        ["ops", "--kind", "explode"],
        ["--timeout", "0", "get", "g1"],
        ["--timeout", "soon", "get", "g1"],
        ["--tls-cert", "/nonexistent.pem", "get", "g1"],
        ["--tls-ca", "/nonexistent/ca.pem", "get", "g1"],
        ["ops", "--since", "2024-05-02", "--until", "2024-05-01"],
        ["explain"],
        ["explain", "g1", "--limit", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, stub = run(argv)
    assert code == 2
    assert out == ""
    assert capsys.readouterr().err
    assert stub.calls == []


def test_help_exits_0_and_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["--help"])
    assert code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for line in ("3  not_found", "4  conflict", "6  unauthenticated, permission_denied"):
        assert line in text
    assert "service_unavailable" in (ctl.__doc__ or "")


# --- connection -----------------------------------------------------------


def test_address_defaults_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTMANAGER_CTL_ADDR", raising=False)
    monkeypatch.delenv("RTMANAGER_GRPC_ADDR", raising=False)
    monkeypatch.delenv("RTMANAGER_CTL_TOKEN", raising=False)
    _, _, stub = run(["get", "g1"])
    assert stub.connection == Connection("127.0.0.1:50051", None, None, 60.0)

    monkeypatch.setenv("RTMANAGER_GRPC_ADDR", "0.0.0.0:7000")
    monkeypatch.setenv("RTMANAGER_CTL_TOKEN", "secret-token")
    _, _, stub = run(["get", "g1"])
    assert stub.connection == Connection("127.0.0.1:7000", "secret-token", None, 60.0)

    monkeypatch.setenv("RTMANAGER_CTL_ADDR", "rtm.example:9000")
    _, _, stub = run(["--timeout", "2.5", "get", "g1"])
    assert stub.connection is not None
    assert stub.connection.address == "rtm.example:9000"
    assert stub.connection.timeout == 2.5

    _, _, stub = run(["--addr", "h:1", "--token", "t", "get", "g1"])
    assert stub.connection == Connection("h:1", "t", None, 60.0)


def test_tls_files_are_read(tmp_path: Any) -> None:
    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    _, _, stub = run(["--tls-ca", str(tmp_path / "ca.pem"), "get", "g1"])
    assert stub.connection is not None and stub.connection.tls is not None
    assert stub.connection.tls.root_certificates == b"CA"
    assert stub.connection.tls.private_key is None
    argv = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    _, _, stub = run([*argv, "get", "g1"])
    assert stub.connection is not None and stub.connection.tls is not None
    assert stub.connection.tls.root_certificates is None
    assert (stub.connection.tls.certificate_chain, stub.connection.tls.private_key) == (
        b"CERT",
        b"KEY",
    )


def test_global_options_are_accepted_after_the_subcommand() -> None:
    code, out, stub = run(["get", "g1", "--json", "--addr", "h:2"])
    assert code == 0
    assert json.loads(out)["game_id"] == "g1"
    assert stub.connection is not None and stub.connection.address == "h:2"
    # ... and given before it they are not reset by the subcommand's defaults.
    code, out, stub = run(["--json", "--addr", "h:3", "get", "g1"])
    assert json.loads(out)["game_id"] == "g1"
    assert stub.connection is not None and stub.connection.address == "h:3"


# --- requests -------------------------------------------------------------


def test_subcommands_call_the_client_with_their_arguments() -> None:
    cases: list[tuple[list[str], tuple[str, tuple[Any, ...], dict[str, Any]]]] = [
        (
            ["start", "g1", "galaxy/engine-stub:1.0.0", "--source-ref", "r1"],
            ("start", ("g1", "galaxy/engine-stub:1.0.0"), {"source_ref": "r1"}),
        ),
        (
            ["stop", "g1", "--reason", "game_finished"],
            ("stop", ("g1",), {"reason": StopReason.GAME_FINISHED, "source_ref": ""}),
        ),
        (["stop", "g1"], ("stop", ("g1",), {"reason": StopReason.ADMIN_REQUEST, "source_ref": ""})),
        (["restart", "g1", "--source-ref", "x"], ("restart", ("g1",), {"source_ref": "x"})),
        (
            ["patch", "g1", "galaxy/engine-stub:1.0.1"],
            ("patch", ("g1", "galaxy/engine-stub:1.0.1"), {"source_ref": ""}),
        ),
        (["get", "g1"], ("get", ("g1",), {})),
        (
            ["cleanup", "g1", "--force"],
            ("cleanup", ("g1",), {"force": True, "source_ref": ""}),
        ),
        (["reconcile", "--dry-run"], ("reconcile", (), {"dry_run": True})),
        (["explain", "g1", "--limit", "5"], ("explain", ("g1",), {"operations": 5})),
        (["explain", "g1"], ("explain", ("g1",), {"operations": 0})),
        (
            ["list", "--status", "stopped", "--page-size", "5", "--page-token", "0"],
            ("list", (), {"status": RuntimeStatus.STOPPED, "page_size": 5, "page_token": "0"}),
        ),
    ]
    for argv, expected in cases:
        code, _, stub = run(argv)
        assert code == 0, argv
        assert stub.calls == [expected], argv
        assert stub.closed


def test_ops_filters_are_parsed() -> None:
    argv = [
        "ops",
        "--game",
        "g1",
        "--kind",
        "cleanup_container",
        "--source",
        "gm_rest",
        "--outcome",
        "failure",
        "--since",
        "2024-05-01T12:00:00Z",
        "--until",
        "2024-05-01T16:00:00+02:00",
        "--limit",
        "7",
        "--page-token",
        "abc",
    ]
    code, _, stub = run(argv)
    assert code == 0
    assert stub.calls == [
        (
            "ops",
            (),
            {
                "game_id": "g1",
                "op_kind": OpKind.CLEANUP_CONTAINER,
                "op_source": OpSource.GM_REST,
                "outcome": Outcome.FAILURE,
                "since": T0,
                "until": T0 + timedelta(hours=2),
                "page_size": 7,
                "page_token": "abc",
            },
        )
    ]
    # A timestamp without an offset is UTC.
    assert parse_timestamp("2024-05-01T12:00") == T0


def test_list_all_follows_page_tokens() -> None:
    pages = [
        Page([record("g1")], "1"),
        Page([record("g2")], "2"),
        Page([record("g3", RuntimeStatus.REMOVED)], ""),
    ]
    code, out, stub = run(["--json", "list", "--all", "--page-size", "1"], StubSession(pages=pages))
    assert code == 0
    assert [call[2]["page_token"] for call in stub.calls] == ["", "1", "2"]
    listing = json.loads(out)
    assert [item["game_id"] for item in listing["runtimes"]] == ["g1", "g2", "g3"]
    assert listing["next_page_token"] == ""


def test_list_all_continues_from_a_page_token() -> None:
    pages = [
        Page([record("g1")], "1"),
        Page([record("g2")], "2"),
        Page([record("g3")], ""),
    ]
    argv = ["--json", "list", "--all", "--page-token", "1"]
    code, out, stub = run(argv, StubSession(pages=pages))
    assert code == 0
    assert [call[2]["page_token"] for call in stub.calls] == ["1", "2"]
    assert [item["game_id"] for item in json.loads(out)["runtimes"]] == ["g2", "g3"]


# --- output ---------------------------------------------------------------


def test_record_json_has_iso_timestamps_and_lower_case_enums() -> None:
    code, out, _ = run(["--json", "start", "g1", "galaxy/engine-stub:1.0.0"])
    assert code == 0
    assert json.loads(out) == {
        "game_id": "g1",
        "status": "running",
        "engine_endpoint": "http://galaxy-game-g1:8080",
        "state_path": "/var/lib/galaxy/games/g1",
        "docker_network": "galaxy-engines",
        "last_op_at": "2024-05-01T12:05:00Z",
        "created_at": "2024-05-01T12:00:00Z",
        "current_container_id": CONTAINER,
        "current_image_ref": "galaxy/engine-stub:1.0.0",
        "started_at": "2024-05-01T12:00:00Z",
        "stopped_at": None,
        "removed_at": None,
        "node_id": "",
        "node_hostname": "",
    }


def test_list_json_is_an_array_with_the_next_page_token() -> None:
    session = StubSession(pages=[Page([record("g1"), record("g2")], "more")])
    code, out, _ = run(["--json", "list"], session)
    assert code == 0
    listing = json.loads(out)
    assert set(listing) == {"runtimes", "next_page_token"}
    assert [item["status"] for item in listing["runtimes"]] == ["running", "running"]
    assert listing["next_page_token"] == "more"


def test_ops_json_entries() -> None:
    code, out, _ = run(["--json", "ops"])
    assert code == 0
    listing = json.loads(out)
    assert listing["next_page_token"] == "tok-2"
    newest, oldest = listing["operations"]
    assert newest == {
        "id": 2,
        "game_id": "g1",
        "op_kind": "patch",
        "op_source": "admin_rest",
        "outcome": "failure",
        "started_at": "2024-05-01T12:00:02Z",
        "finished_at": "2024-05-01T12:00:03Z",
        "source_ref": "req-1",
        "image_ref": "galaxy/engine-stub:1.0.0",
        "container_id": CONTAINER,
        "error_code": "semver_patch_only",
        "error_message": "",
        "parent_op_kind": None,
        "parent_operation_id": 0,
    }
    assert oldest["op_kind"] == "start" and oldest["outcome"] == "success"


def test_record_table_shortens_the_container_id() -> None:
    code, out, _ = run(["list"])
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == [
        "GAME",
        "ID",
        "STATUS",
        "IMAGE",
        "CONTAINER",
        "NODE",
        "ENDPOINT",
        "LAST",
        "OP",
    ]
    assert first.split() == [
        "g1",
        "running",
        "galaxy/engine-stub:1.0.0",
        CONTAINER[:12],
        "-",
        "http://galaxy-game-g1:8080",
        "2024-05-01T12:05:00Z",
    ]
    assert second.split()[:2] == ["g2", "stopped"]
    assert CONTAINER[:13] not in out


NODE_ID = "n7x2k9q4w1e5r8t3y6u0i2o4p"


def on_node(runtime: RuntimeRecord) -> RuntimeRecord:
    return replace(runtime, node_id=NODE_ID, node_hostname="worker-2")


class NodeSession(StubSession):
    """Answers `get` with a record placed on a cluster node."""

    def get_runtime(self, game_id: str, *, timeout: float | None = None) -> RuntimeRecord:
        self._called("get", game_id)
        return on_node(record(game_id))


def test_a_record_on_a_node_shows_it_in_the_list_table_and_json() -> None:
    session = StubSession(pages=[Page([on_node(record("g1")), record("g2")], "")])
    _, out, _ = run(["list"], session)
    _, first, second = out.splitlines()
    assert first.split()[3:5] == [CONTAINER[:12], NODE_ID[:12]]
    assert second.split()[3:5] == [CONTAINER[:12], "-"]

    session = StubSession(pages=[Page([on_node(record("g1")), record("g2")], "")])
    _, out, _ = run(["--json", "list"], session)
    listed = json.loads(out)["runtimes"]
    assert [(r["node_id"], r["node_hostname"]) for r in listed] == [
        (NODE_ID, "worker-2"),
        ("", ""),
    ]


def test_get_shows_the_node_by_hostname_and_id() -> None:
    _, out, _ = run(["get", "g1"], NodeSession())
    assert f"node:       worker-2 ({NODE_ID})" in out.splitlines()
    _, out, _ = run(["--json", "get", "g1"], NodeSession())
    assert (json.loads(out)["node_id"], json.loads(out)["node_hostname"]) == (NODE_ID, "worker-2")
    _, out, _ = run(["get", "g1"])
    assert "node:       -" in out.splitlines()


def test_explain_shows_the_node_of_the_record_and_of_the_container() -> None:
    explanation = full_explanation()
    assert explanation.record is not None and explanation.container is not None
    explanation = replace(
        explanation,
        record=on_node(explanation.record),
        container=replace(explanation.container, node_id=NODE_ID, node_hostname="worker-2"),
    )
    _, out, _ = run(["explain", "g1"], StubSession(explanation=explanation))
    record_section, container_section = out.split("\n\n")[:2]
    assert f"node:       worker-2 ({NODE_ID})" in record_section.splitlines()
    assert f"node:          worker-2 ({NODE_ID})" in container_section.splitlines()
    _, out, _ = run(["--json", "explain", "g1"], StubSession(explanation=explanation))
    explained = json.loads(out)
    assert explained["record"]["node_id"] == explained["container"]["node_id"] == NODE_ID
    assert explained["container"]["node_hostname"] == "worker-2"


def test_watch_shows_the_node_an_event_s_engine_is_on() -> None:
    placed = pb.WatchRuntimesResponse(
        event=pb.RuntimeEvent(
            cursor="c4",
            op_kind=pb.OP_KIND_START,
            op_source=pb.OP_SOURCE_ADMIN,
            outcome=pb.OUTCOME_SUCCESS,
            runtime=convert.record_to_pb(on_node(record("g1"))),
            operation_id=13,
            committed_at=convert.timestamp_to_pb(T0),
        )
    )
    snapshot = pb.WatchRuntimesResponse(snapshot=convert.record_to_pb(on_node(record("g2"))))
    code, out, _ = run(["watch"], StubSession(watch=[snapshot, placed]))
    assert code == 0
    first, second = out.splitlines()
    assert first.split()[4:6] == [CONTAINER[:12], NODE_ID[:12]]
    assert second.endswith(f"node={NODE_ID[:12]}  op=13  cursor=c4")

    code, out, _ = run(["--json", "watch"], StubSession(watch=[placed]))
    runtime = json.loads(out)["event"]["runtime"]
    assert (runtime["node_id"], runtime["node_hostname"]) == (NODE_ID, "worker-2")


def test_list_table_shows_how_to_continue() -> None:
    session = StubSession(pages=[Page([record("g1")], "next-one")])
    _, out, _ = run(["list"], session)
    assert out.splitlines()[-1] == "next page: --page-token next-one"


def test_get_table_shows_every_field() -> None:
    code, out, _ = run(["get", "g1"])
    assert code == 0
    assert "state path:" in out and "/var/lib/galaxy/games/g1" in out
    assert "stopped at:" in out
    assert CONTAINER in out


def test_ops_table_columns() -> None:
    code, out, _ = run(["ops"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "TIME",
        "GAME",
        "KIND",
        "SOURCE",
        "OUTCOME",
        "ERROR",
        "SOURCE",
        "REF",
    ]
    assert lines[1].split() == [
        "2",
        "2024-05-01T12:00:02Z",
        "g1",
        "patch",
        "admin_rest",
        "failure",
        "semver_patch_only",
        "req-1",
    ]
    assert lines[2].split()[5:7] == ["success", "-"]
    assert lines[-1] == "next page: --page-token tok-2"


def test_reconcile_output() -> None:
    code, out, _ = run(["--json", "reconcile", "--dry-run"])
    assert code == 0
    reply = json.loads(out)
    assert reply["dry_run"] is True
    assert reply["adopted"] == 1 and reply["disposed"] == 0
    assert reply["actions"][0]["kind"] == "RECONCILE_ACTION_KIND_ADOPT"
    assert reply["actions"][0]["game_id"] == "g9"

    code, out, _ = run(["reconcile"])
    assert code == 0
    assert out.startswith("applied: adopted 1, disposed 0")
    assert "adopt" in out and CONTAINER[:12] in out


def test_explain_json_has_every_part_with_iso_times_and_durations_in_seconds() -> None:
    code, out, _ = run(["--json", "explain", "g1"])
    assert code == 0
    explained = json.loads(out)
    assert list(explained) == [
        "game_id",
        "record",
        "container",
        "operations",
        "pending_jobs",
        "pending_jobs_truncated",
        "lease",
    ]
    assert explained["record"]["status"] == "stopped"
    assert explained["record"]["stopped_at"] == "2024-05-01T12:02:00Z"
    container = explained["container"]
    assert (container["status"], container["exit_code"], container["oom_killed"]) == (
        "exited",
        0,
        True,
    )
    assert (container["restart_count"], container["health"]) == (2, "unhealthy")
    assert container["finished_at"] == "2024-05-01T12:01:00.000005Z"
    (operation,) = explained["operations"]
    assert next(iter(operation)) == "id"
    assert (operation["op_kind"], operation["op_source"]) == ("stop", "auto_reconcile")
    delivered, waiting = explained["pending_jobs"]
    assert delivered == {
        "job": {"kind": "start", "stream": "runtime:start_jobs", "entry_id": "1714564800000-0"},
        "fields": {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0.1"},
        "consumer": "rtm-1",
        "deliveries": 2,
        "idle": 3.25,
    }
    assert (waiting["consumer"], waiting["deliveries"], waiting["idle"]) == ("", 0, None)
    assert explained["pending_jobs_truncated"] is True
    assert explained["lease"] == {"instance_id": "rtm-2", "ttl": 29.5}

    code, out, _ = run(
        ["--json", "explain", "g1"], StubSession(explanation=RuntimeExplanation("g1"))
    )
    assert json.loads(out) == {
        "game_id": "g1",
        "record": None,
        "container": None,
        "operations": [],
        "pending_jobs": [],
        "pending_jobs_truncated": False,
        "lease": None,
    }


def test_explain_table_shows_one_section_per_source() -> None:
    code, out, _ = run(["explain", "g1"])
    assert code == 0
    sections = out.rstrip("\n").split("\n\n")
    assert [section.splitlines()[0].split(":")[0] for section in sections] == [
        "runtime record",
        "container",
        "lease",
        "unanswered lobby jobs",
        "latest operations",
    ]
    record, container, lease, jobs, operations = sections
    assert "stopped at:" in record and CONTAINER in record
    assert "exit code:     0" in container
    assert "oom killed:    yes" in container
    assert "restart count: 2" in container
    assert lease == "lease: held by rtm-2, expires in 29.5s unless renewed"
    header, delivered, waiting, truncated = jobs.splitlines()[1:]
    assert header.split() == ["KIND", "ENTRY", "ID", "FIELDS", "CONSUMER", "DELIVERIES", "IDLE"]
    assert delivered.split() == [
        "start",
        "1714564800000-0",
        "image_ref=galaxy/engine-stub:1.0.1",
        "rtm-1",
        "2",
        "3.2s",
    ]
    assert waiting.split() == ["stop", "1714564800001-0", "-", "(not", "delivered)", "0", "-"]
    assert "there may be more" in truncated
    assert operations.splitlines()[2].split()[:4] == ["7", "2024-05-01T12:02:00Z", "g1", "stop"]

    code, out, _ = run(["explain", "g1"], StubSession(explanation=RuntimeExplanation("g1")))
    assert out.splitlines() == [
        "runtime record: none",
        "",
        "container: none",
        "",
        "lease: free",
        "",
        "unanswered lobby jobs: none",
        "",
        "latest operations: none",
    ]


def _watch_messages() -> list[pb.WatchRuntimesResponse]:
    runtime = convert.record_to_pb(record("g1"))
    return [
        pb.WatchRuntimesResponse(snapshot=runtime),
        pb.WatchRuntimesResponse(snapshot_complete=pb.SnapshotComplete(cursor="c1")),
        pb.WatchRuntimesResponse(bookmark=pb.Bookmark(cursor="c1")),
        pb.WatchRuntimesResponse(
            event=pb.RuntimeEvent(
                cursor="c2",
                op_kind=pb.OP_KIND_STOP,
                op_source=pb.OP_SOURCE_ADMIN,
                outcome=pb.OUTCOME_SUCCESS,
                runtime=convert.record_to_pb(record("g1", RuntimeStatus.STOPPED)),
                operation_id=9,
                committed_at=convert.timestamp_to_pb(T0),
            )
        ),
    ]


def test_watch_prints_the_stream() -> None:
    session = StubSession(watch=_watch_messages())
    argv = ["watch", "--game", "g1", "--status", "stopped", "--since", "c0", "--snapshot"]
    code, out, stub = run(argv, session)
    assert code == 0
    request = stub.calls[0][1][0]
    assert list(request.game_ids) == ["g1"]
    assert list(request.statuses) == [pb.RUNTIME_STATUS_STOPPED]
    assert (request.since, request.initial_snapshot) == ("c0", True)
    lines = out.splitlines()
    assert len(lines) == 3  # bookmarks are not shown in the table form
    assert lines[0].split()[:3] == ["snapshot", "g1", "running"]
    assert lines[1] == "snapshot complete  cursor=c1"
    assert lines[2].split()[:6] == [
        "2024-05-01T12:00:00Z",
        "stop",
        "admin_rest",
        "success",
        "g1",
        "stopped",
    ]
    assert lines[2].endswith("op=9  cursor=c2")

    code, out, _ = run(["--json", "watch"], StubSession(watch=_watch_messages()))
    assert code == 0
    messages = [json.loads(line) for line in out.splitlines()]
    assert [next(iter(message)) for message in messages] == [
        "snapshot",
        "snapshot_complete",
        "bookmark",
        "event",
    ]


def test_ctrl_c_ends_a_watch_with_success_and_any_other_command_with_130() -> None:
    def interrupted() -> Iterator[pb.WatchRuntimesResponse]:
        yield from _watch_messages()[:1]
        raise KeyboardInterrupt

    session = StubSession()
    session.watch = interrupted()  # type: ignore[assignment]
    code, out, stub = run(["watch"], session)
    assert (code, stub.closed) == (0, True)
    assert out.split()[:2] == ["snapshot", "g1"]  # what came before Ctrl-C was shown

    code, _, stub = run(["get", "g1"], StubSession(fail=KeyboardInterrupt()))
    assert (code, stub.closed) == (130, True)


def test_watch_shows_which_operation_an_inner_step_is_part_of() -> None:
    inner = pb.WatchRuntimesResponse(
        event=pb.RuntimeEvent(
            cursor="c3",
            op_kind=pb.OP_KIND_STOP,
            op_source=pb.OP_SOURCE_GAME_MASTER,
            outcome=pb.OUTCOME_SUCCESS,
            runtime=convert.record_to_pb(record("g1", RuntimeStatus.STOPPED)),
            operation_id=12,
            committed_at=convert.timestamp_to_pb(T0),
            source_ref="gm-7",
            parent_op_kind=pb.OP_KIND_RESTART,
            parent_operation_id=11,
        )
    )
    code, out, _ = run(["watch"], StubSession(watch=[inner]))
    assert code == 0
    assert out.strip().endswith("part-of=restart:11  op=12  cursor=c3")

    code, out, _ = run(["--json", "watch"], StubSession(watch=[inner]))
    assert code == 0
    event = json.loads(out)["event"]
    assert (event["source_ref"], event["parent_op_kind"], event["parent_operation_id"]) == (
        "gm-7",
        "OP_KIND_RESTART",
        "11",
    )


# --- against an in-process gRPC server ----------------------------------------


class _Unimplemented(pb_grpc.RuntimeServiceServicer):
    """Answers GetRuntime with the caller's token as image (and a garbled record for the
    game `garbled`); WatchRuntimes is UNIMPLEMENTED."""

    def GetRuntime(
        self, request: pb.GetRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.GetRuntimeResponse:
        metadata = dict(context.invocation_metadata() or ())
        if request.game_id == "missing":
            context.abort_with_status(
                rich_status(code_pb2.NOT_FOUND, "not_found", "no runtime for missing", {})
            )
        runtime = convert.record_to_pb(record(request.game_id))
        runtime.current_image_ref = str(metadata.get("authorization", ""))
        if request.game_id == "garbled":
            runtime.status = 99  # type: ignore[assignment]  # a status this client does not know
        return pb.GetRuntimeResponse(runtime=runtime)

    def WatchRuntimes(
        self, request: pb.WatchRuntimesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchRuntimesResponse]:
        context.abort_with_status(
            rich_status(code_pb2.UNIMPLEMENTED, "unimplemented", "WatchRuntimes is not here", {})
        )
        yield from ()


@pytest.fixture
def fake_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RuntimeServiceServicer_to_server(_Unimplemented(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_real_client_sends_the_token_and_maps_rich_errors(
    fake_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    argv = ["--addr", fake_server, "--token", "tok-123", "--json", "get", "g1"]
    assert ctl.main(argv, stdout=out) == 0
    assert json.loads(out.getvalue())["current_image_ref"] == "Bearer tok-123"

    assert ctl.main(["--addr", fake_server, "get", "missing"]) == 3
    assert capsys.readouterr().err == "rtmanager ctl: not_found: no runtime for missing\n"


def test_watch_reports_unimplemented_with_exit_1(
    fake_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    assert ctl.main(["--addr", fake_server, "watch"], stdout=out) == 1
    assert out.getvalue() == ""
    assert capsys.readouterr().err == "rtmanager ctl: unimplemented: WatchRuntimes is not here\n"


def test_a_reply_the_client_cannot_read_is_an_internal_failure(
    fake_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    assert ctl.main(["--addr", fake_server, "get", "garbled"], stdout=out) == 1
    assert out.getvalue() == ""
    assert capsys.readouterr().err.startswith(
        "rtmanager ctl: internal: unexpected response from the server: status 99"
    )
