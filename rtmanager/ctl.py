"""`rtmanager ctl`: a human client of a running rtmanager server.

One subcommand per RPC, built on `rtmanager.client.RuntimeManagerClient`::

    rtmanager ctl start g1 galaxy/engine:1.4.2
    rtmanager ctl --json get g1
    rtmanager ctl ops --game g1 --limit 20

Output is a readable table by default; `--json` prints machine output
instead: records and operation-log entries as objects whose timestamps are
ISO-8601 UTC strings and whose enum values are the lower-case strings the
domain stores; listings as an object holding the array and
`next_page_token`; `reconcile` and `watch` as the proto messages rendered by
`google.protobuf.json_format` (`watch` prints one object per line).

The connection comes from the global options, given after `ctl` (or after
the subcommand):
`--addr` (default $RTMANAGER_CTL_ADDR, else $RTMANAGER_GRPC_ADDR, else
127.0.0.1:50051), `--token` (default $RTMANAGER_CTL_TOKEN), `--tls-ca`,
`--tls-cert`, `--tls-key` (any of them switches to TLS; cert and key make it
mutual TLS), `--timeout` seconds per call (default 60; `watch` is not bounded
by it).

A failure prints `rtmanager ctl: <code>: <message>` on stderr and exits with
the code of its class:

      0  success
      1  internal, and any other failure (including unimplemented)
      2  invalid_request, and usage errors
      3  not_found
      4  conflict
      5  semver_patch_only, image_not_allowed, image_pull_failed,
         container_start_failed
      6  unauthenticated, permission_denied
      7  service_unavailable (including deadline exceeded and an unreachable
         server)
    130  interrupted (Ctrl-C); ending `watch` with Ctrl-C is a success
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.client import (
    ClientCredentials,
    RuntimeManagerClient,
    RuntimeManagerClientError,
)
from rtmanager.domain.errors import ErrorCode, RuntimeManagerError
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import Page

PROG = "rtmanager ctl"
DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 60.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_REJECTED = 5
EXIT_AUTH = 6
EXIT_UNAVAILABLE = 7
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[str, int] = {
    ErrorCode.INVALID_REQUEST: EXIT_USAGE,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.CONFLICT: EXIT_CONFLICT,
    ErrorCode.SEMVER_PATCH_ONLY: EXIT_REJECTED,
    ErrorCode.IMAGE_NOT_ALLOWED: EXIT_REJECTED,
    ErrorCode.IMAGE_PULL_FAILED: EXIT_REJECTED,
    ErrorCode.CONTAINER_START_FAILED: EXIT_REJECTED,
    "unauthenticated": EXIT_AUTH,
    "permission_denied": EXIT_AUTH,
    ErrorCode.SERVICE_UNAVAILABLE: EXIT_UNAVAILABLE,
    ErrorCode.INTERNAL: EXIT_FAILURE,
}

EPILOG = """\
exit codes:
    0  success
    1  internal, and any other failure (including unimplemented)
    2  invalid_request, and usage errors
    3  not_found
    4  conflict
    5  semver_patch_only, image_not_allowed, image_pull_failed, container_start_failed
    6  unauthenticated, permission_denied
    7  service_unavailable (including deadline exceeded and an unreachable server)
  130  interrupted (Ctrl-C); ending watch with Ctrl-C is a success

errors are printed to stderr as 'rtmanager ctl: <code>: <message>'.
"""

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
_CONTAINER_ID_WIDTH = 12


class UsageError(Exception):
    """Options that cannot work together, or a file that cannot be read."""


def exit_code_for(error: RuntimeManagerClientError) -> int:
    """The process exit code of a failed call (see the module docstring)."""
    return EXIT_CODES.get(error.code, EXIT_FAILURE)


def error_label(error: RuntimeManagerClientError) -> str:
    """The code shown for a failed call: the stable code, else the gRPC status name."""
    return error.code or error.status.name.lower()


# --------------------------------------------------------------------------
# Connection


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the server."""

    address: str
    token: str | None = None
    tls: ClientCredentials | None = None
    timeout: float = DEFAULT_TIMEOUT


class Session(Protocol):
    """What the subcommands call; `RuntimeManagerClient` plus `watch_runtimes`."""

    def start_runtime(self, game_id: str, image_ref: str, *, source_ref: str = "") -> RuntimeRecord:
        """StartRuntime."""
        ...

    def stop_runtime(
        self, game_id: str, *, reason: StopReason = StopReason.ADMIN_REQUEST, source_ref: str = ""
    ) -> RuntimeRecord:
        """StopRuntime."""
        ...

    def restart_runtime(self, game_id: str, *, source_ref: str = "") -> RuntimeRecord:
        """RestartRuntime."""
        ...

    def patch_runtime(self, game_id: str, image_ref: str, *, source_ref: str = "") -> RuntimeRecord:
        """PatchRuntime."""
        ...

    def get_runtime(self, game_id: str) -> RuntimeRecord:
        """GetRuntime."""
        ...

    def list_runtimes(
        self, *, status: RuntimeStatus | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[RuntimeRecord]:
        """ListRuntimes (one page)."""
        ...

    def cleanup_runtime(
        self, game_id: str, *, force: bool = False, source_ref: str = ""
    ) -> RuntimeRecord:
        """CleanupRuntime."""
        ...

    def list_operations(
        self,
        *,
        game_id: str = "",
        op_kind: OpKind | None = None,
        op_source: OpSource | None = None,
        outcome: Outcome | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[OperationEntry]:
        """ListOperations (one page)."""
        ...

    def reconcile(self, *, dry_run: bool = False) -> pb.ReconcileResponse:
        """Reconcile."""
        ...

    def watch_runtimes(
        self, request: pb.WatchRuntimesRequest
    ) -> Iterator[pb.WatchRuntimesResponse]:
        """WatchRuntimes: the server's stream, message by message."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


def open_channel(connection: Connection) -> grpc.Channel:
    """A channel to the server, with TLS when `connection.tls` is set."""
    if connection.tls is None:
        return grpc.insecure_channel(connection.address, options=_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=connection.tls.root_certificates,
        private_key=connection.tls.private_key,
        certificate_chain=connection.tls.certificate_chain,
    )
    return grpc.secure_channel(connection.address, credentials, options=_CHANNEL_OPTIONS)


class CtlClient(RuntimeManagerClient):
    """The typed client on a channel built from the command line's options."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(
            connection.address,
            token=connection.token,
            timeout=connection.timeout,
            channel=open_channel(connection),
        )


Connect = Callable[[Connection], Session]


def _env_address() -> str:
    explicit = os.environ.get("RTMANAGER_CTL_ADDR", "").strip()
    if explicit:
        return explicit
    server = os.environ.get("RTMANAGER_GRPC_ADDR", "").strip()
    if not server:
        return DEFAULT_ADDR
    # The server's listen address; a wildcard host is reached on loopback.
    host, sep, port = server.rpartition(":")
    if sep and host in ("", "0.0.0.0", "[::]", "::"):
        return f"{'[::1]' if ':' in host else '127.0.0.1'}:{port}"
    return server


def _read(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{option} {path}: {error.strerror or error}") from None


def connection_of(args: argparse.Namespace) -> Connection:
    """The connection the global options (and the environment) describe."""
    address = args.addr or _env_address()
    token = args.token if args.token is not None else os.environ.get("RTMANAGER_CTL_TOKEN")
    tls: ClientCredentials | None = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError("--tls-cert and --tls-key must be given together")
        tls = ClientCredentials(
            root_certificates=_read(args.tls_ca, "--tls-ca"),
            private_key=_read(args.tls_key, "--tls-key"),
            certificate_chain=_read(args.tls_cert, "--tls-cert"),
        )
    return Connection(address=address, token=token or None, tls=tls, timeout=args.timeout)


# --------------------------------------------------------------------------
# Rendering


def iso_utc(value: datetime | None) -> str | None:
    """ISO-8601 in UTC with a `Z` suffix; None stays None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _jsonable(value: object) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return iso_utc(value)
    return value


def to_json(item: RuntimeRecord | OperationEntry) -> dict[str, Any]:
    """A record or an operation-log entry as a JSON-ready dict (an entry's id first)."""
    data = {field.name: _jsonable(getattr(item, field.name)) for field in fields(item)}
    if isinstance(item, OperationEntry):
        data = {"id": data.pop("id"), **data}
    return data


def _short_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; empty cells shown as '-'."""
    cells = [list(headers)] + [[cell or "-" for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in cells) for index in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


RECORD_HEADERS = ("GAME ID", "STATUS", "IMAGE", "CONTAINER", "ENDPOINT", "LAST OP")
OPERATION_HEADERS = (
    "ID",
    "TIME",
    "GAME",
    "KIND",
    "SOURCE",
    "OUTCOME",
    "ERROR",
    "SOURCE REF",
)


def record_row(record: RuntimeRecord) -> list[str]:
    """The table cells of one record (the container id cut to 12 characters)."""
    return [
        record.game_id,
        str(record.status),
        record.current_image_ref,
        record.current_container_id[:_CONTAINER_ID_WIDTH],
        record.engine_endpoint,
        _short_time(record.last_op_at),
    ]


def records_table(records: Sequence[RuntimeRecord]) -> str:
    """Records as a table."""
    return table(RECORD_HEADERS, [record_row(record) for record in records])


def operation_row(entry: OperationEntry) -> list[str]:
    """The table cells of one operation-log entry."""
    return [
        str(entry.id),
        _short_time(entry.started_at),
        entry.game_id,
        str(entry.op_kind),
        str(entry.op_source),
        str(entry.outcome),
        entry.error_code,
        entry.source_ref,
    ]


def operations_table(entries: Sequence[OperationEntry]) -> str:
    """Operation-log entries as a table."""
    return table(OPERATION_HEADERS, [operation_row(entry) for entry in entries])


def record_details(record: RuntimeRecord) -> str:
    """Every field of one record, one per line."""
    rows = [
        ("game id", record.game_id),
        ("status", str(record.status)),
        ("image", record.current_image_ref),
        ("container", record.current_container_id),
        ("endpoint", record.engine_endpoint),
        ("state path", record.state_path),
        ("network", record.docker_network),
        ("created at", _short_time(record.created_at)),
        ("started at", _short_time(record.started_at)),
        ("stopped at", _short_time(record.stopped_at)),
        ("removed at", _short_time(record.removed_at)),
        ("last op at", _short_time(record.last_op_at)),
    ]
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width}} {value or '-'}" for name, value in rows)


def message_to_json(message: Message) -> dict[str, Any]:
    """A proto message as a dict with proto field names and every field present."""
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


def _action_kind(value: pb.ReconcileActionKind.ValueType) -> str:
    name = pb.ReconcileActionKind.Name(value)
    return name.removeprefix("RECONCILE_ACTION_KIND_").lower()


def reconcile_text(reply: pb.ReconcileResponse) -> str:
    """A reconcile pass: its counts, then its actions as a table."""
    summary = (
        f"{'dry run' if reply.dry_run else 'applied'}: adopted {reply.adopted}, "
        f"disposed {reply.disposed}, marked stopped {reply.marked_stopped}, "
        f"marked running {reply.marked_running}, skipped {reply.skipped}"
    )
    if not reply.actions:
        return f"{summary}\nno actions"
    rows = [
        [
            _action_kind(action.kind),
            action.game_id,
            action.container_id[:_CONTAINER_ID_WIDTH],
            action.image_ref,
            "yes" if action.applied else "no",
            action.skipped_reason,
        ]
        for action in reply.actions
    ]
    headers = ("ACTION", "GAME", "CONTAINER", "IMAGE", "APPLIED", "SKIPPED REASON")
    return f"{summary}\n{table(headers, rows)}"


def watch_line(message: pb.WatchRuntimesResponse) -> str | None:
    """One readable line per streamed message; None for bookmarks (heartbeats)."""
    payload = message.WhichOneof("payload")
    if payload == "snapshot":
        record = convert.record_from_pb(message.snapshot)
        return "snapshot  " + "  ".join(cell or "-" for cell in record_row(record))
    if payload == "snapshot_complete":
        return f"snapshot complete  cursor={message.snapshot_complete.cursor}"
    if payload == "event":
        event = message.event
        record = convert.record_from_pb(event.runtime)
        committed = convert.timestamp_from_pb(event, "committed_at")
        kind = convert.OP_KIND_FROM_PB.get(event.op_kind)
        source = convert.OP_SOURCE_FROM_PB.get(event.op_source)
        outcome = convert.OUTCOME_FROM_PB.get(event.outcome)
        cells = [
            _short_time(committed),
            str(kind or "-"),
            str(source or "-"),
            str(outcome or "-"),
            *record_row(record)[:4],
            f"op={event.operation_id}",
            f"cursor={event.cursor}",
        ]
        if event.parent_operation_id:  # an inner step of a restart, patch or cleanup
            parent = convert.OP_KIND_FROM_PB.get(event.parent_op_kind)
            cells.insert(-2, f"part-of={parent or '-'}:{event.parent_operation_id}")
        return "  ".join(cell or "-" for cell in cells)
    return None


@dataclass
class Output:
    """Where results go and in which form."""

    json: bool
    stream: TextIO

    def emit(self, text: str) -> None:
        """Write one block of text and a newline."""
        self.stream.write(f"{text}\n")
        self.stream.flush()

    def emit_json(self, value: object, *, indent: int | None = 2) -> None:
        """Write a JSON document."""
        self.emit(json.dumps(value, indent=indent, ensure_ascii=False))

    def record(self, record: RuntimeRecord, *, details: bool = False) -> None:
        """One runtime record."""
        if self.json:
            self.emit_json(to_json(record))
        else:
            self.emit(record_details(record) if details else records_table([record]))

    def records(self, page: Page[RuntimeRecord]) -> None:
        """A page of runtime records."""
        self._page("runtimes", page, records_table(page.items))

    def operations(self, page: Page[OperationEntry]) -> None:
        """A page of operation-log entries."""
        self._page("operations", page, operations_table(page.items))

    def _page(self, key: str, page: Page[Any], table: str) -> None:
        if self.json:
            self.emit_json(
                {
                    key: [to_json(item) for item in page.items],
                    "next_page_token": page.next_page_token,
                }
            )
            return
        self.emit(table)
        if page.next_page_token:
            self.emit(f"next page: --page-token {page.next_page_token}")


# --------------------------------------------------------------------------
# Subcommands


def _start(session: Session, args: argparse.Namespace, out: Output) -> None:
    out.record(session.start_runtime(args.game, args.image, source_ref=args.source_ref))


def _stop(session: Session, args: argparse.Namespace, out: Output) -> None:
    record = session.stop_runtime(
        args.game, reason=StopReason(args.reason), source_ref=args.source_ref
    )
    out.record(record)


def _restart(session: Session, args: argparse.Namespace, out: Output) -> None:
    out.record(session.restart_runtime(args.game, source_ref=args.source_ref))


def _patch(session: Session, args: argparse.Namespace, out: Output) -> None:
    out.record(session.patch_runtime(args.game, args.image, source_ref=args.source_ref))


def _get(session: Session, args: argparse.Namespace, out: Output) -> None:
    out.record(session.get_runtime(args.game), details=True)


def _list(session: Session, args: argparse.Namespace, out: Output) -> None:
    status = RuntimeStatus(args.status) if args.status else None
    if not args.all:
        out.records(
            session.list_runtimes(
                status=status, page_size=args.page_size, page_token=args.page_token
            )
        )
        return
    records: list[RuntimeRecord] = []
    token = args.page_token
    while True:
        page = session.list_runtimes(status=status, page_size=args.page_size, page_token=token)
        records.extend(page.items)
        token = page.next_page_token
        if not token:
            break
    out.records(Page(records))


def _ops(session: Session, args: argparse.Namespace, out: Output) -> None:
    if args.since and args.until and args.since >= args.until:
        raise UsageError("--since must be before --until")
    page = session.list_operations(
        game_id=args.game or "",
        op_kind=OpKind(args.kind) if args.kind else None,
        op_source=OpSource(args.source) if args.source else None,
        outcome=Outcome(args.outcome) if args.outcome else None,
        since=args.since,
        until=args.until,
        page_size=args.limit,
        page_token=args.page_token,
    )
    out.operations(page)


def _cleanup(session: Session, args: argparse.Namespace, out: Output) -> None:
    out.record(session.cleanup_runtime(args.game, force=args.force, source_ref=args.source_ref))


def _reconcile(session: Session, args: argparse.Namespace, out: Output) -> None:
    reply = session.reconcile(dry_run=args.dry_run)
    if out.json:
        out.emit_json(message_to_json(reply))
    else:
        out.emit(reconcile_text(reply))


def _watch(session: Session, args: argparse.Namespace, out: Output) -> None:
    request = pb.WatchRuntimesRequest(
        game_ids=args.game or [],
        statuses=[convert.STATUS_TO_PB[RuntimeStatus(status)] for status in args.status or []],
        since=args.since,
        initial_snapshot=args.snapshot,
    )
    for message in session.watch_runtimes(request):
        if out.json:
            out.emit_json(message_to_json(message), indent=None)
            continue
        line = watch_line(message)
        if line is not None:
            out.emit(line)


Handler = Callable[[Session, argparse.Namespace, Output], None]


# --------------------------------------------------------------------------
# Parsing


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 timestamp (or date); one without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 timestamp (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _add_connection_options(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    """The global options; on subcommands they default to 'not given' (SUPPRESS)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if nested else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--addr",
        metavar="HOST:PORT",
        default=default(None),
        help="server address (default: $RTMANAGER_CTL_ADDR, else $RTMANAGER_GRPC_ADDR, "
        f"else {DEFAULT_ADDR})",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help="bearer token (default: $RTMANAGER_CTL_TOKEN)",
    )
    group.add_argument(
        "--tls-ca", metavar="FILE", default=default(None), help="CA bundle; switches to TLS"
    )
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=default(None),
        help="client certificate for mutual TLS (with --tls-key)",
    )
    group.add_argument(
        "--tls-key",
        metavar="FILE",
        default=default(None),
        help="client private key for mutual TLS (with --tls-cert)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g}; watch is unbounded)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON instead of tables",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the global options and the subcommands of `rtmanager ctl` to `parser`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    _add_connection_options(parser, nested=False)
    commands = parser.add_subparsers(dest="ctl_command", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(ctl_handler=handler)
        _add_connection_options(sub, nested=True)
        return sub

    def game(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("game", metavar="GAME", help="game id")

    def source_ref(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--source-ref", default="", metavar="REF", help="caller reference for the log"
        )

    sub = command("start", _start, "start (or confirm) a game's engine")
    game(sub)
    sub.add_argument("image", metavar="IMAGE", help="engine image, e.g. galaxy/engine:1.4.2")
    source_ref(sub)

    sub = command("stop", _stop, "stop a game's engine gracefully")
    game(sub)
    sub.add_argument(
        "--reason",
        choices=[reason.value for reason in StopReason],
        default=StopReason.ADMIN_REQUEST.value,
        help="why (default: admin_request)",
    )
    source_ref(sub)

    sub = command("restart", _restart, "recreate a game's engine with its current image")
    game(sub)
    source_ref(sub)

    sub = command("patch", _patch, "recreate a game's engine with a semver patch image")
    game(sub)
    sub.add_argument("image", metavar="IMAGE", help="same repository and major.minor")
    source_ref(sub)

    sub = command("get", _get, "show one game's runtime record")
    game(sub)

    sub = command("list", _list, "list runtime records, ordered by game id")
    sub.add_argument("--status", choices=[status.value for status in RuntimeStatus])
    sub.add_argument(
        "--page-size",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="records per page (default: the server's, 100)",
    )
    sub.add_argument("--page-token", default="", metavar="T", help="continue a listing")
    sub.add_argument("--all", action="store_true", help="follow page tokens to the end")

    sub = command("ops", _ops, "list the operation log, newest first (admin)")
    sub.add_argument("--game", metavar="G", help="only this game")
    sub.add_argument("--kind", choices=[kind.value for kind in OpKind])
    sub.add_argument("--source", choices=[source.value for source in OpSource])
    sub.add_argument("--outcome", choices=[outcome.value for outcome in Outcome])
    sub.add_argument("--since", type=parse_timestamp, metavar="ISO8601", help="started at or after")
    sub.add_argument("--until", type=parse_timestamp, metavar="ISO8601", help="started before")
    sub.add_argument(
        "--limit",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="entries in this page (default: the server's, 100; at most 1000)",
    )
    sub.add_argument("--page-token", default="", metavar="T", help="continue a listing")

    sub = command("cleanup", _cleanup, "remove a stopped game's container (admin)")
    game(sub)
    sub.add_argument("--force", action="store_true", help="stop a running engine first")
    source_ref(sub)

    sub = command("reconcile", _reconcile, "run a reconciliation pass now (admin)")
    sub.add_argument("--dry-run", action="store_true", help="only return the plan")

    sub = command("watch", _watch, "stream runtime changes until interrupted")
    sub.add_argument("--game", action="append", metavar="G", help="only this game (repeatable)")
    sub.add_argument(
        "--status",
        action="append",
        choices=[status.value for status in RuntimeStatus],
        help="only records in this status after the change (repeatable)",
    )
    sub.add_argument("--since", default="", metavar="CURSOR", help="resume after this cursor")
    sub.add_argument("--snapshot", action="store_true", help="send the current records first")


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of `rtmanager ctl` (as `python -m rtmanager.ctl` uses it)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Call a running rtmanager server (a human client)."
    )
    configure_parser(parser)
    return parser


def add_ctl_parser(commands: Any) -> argparse.ArgumentParser:
    """Register `ctl` on the subparsers action of the `rtmanager` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "ctl",
        help="call a running server: start, stop, get, list, ops, ... (a human client)",
        description="Call a running rtmanager server (a human client).",
    )
    configure_parser(parser)
    return parser


# --------------------------------------------------------------------------
# Running


def _fail(code: str, message: str) -> None:
    print(f"{PROG}: {code}: {message}", file=sys.stderr)


def run(
    args: argparse.Namespace,
    *,
    connect: Connect = CtlClient,
    stdout: TextIO | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Run the parsed `ctl` command and return the exit code."""
    handler: Handler | None = getattr(args, "ctl_handler", None)
    if handler is None:
        (parser or build_parser()).print_help(sys.stderr)
        return EXIT_USAGE
    out = Output(json=args.json, stream=stdout or sys.stdout)
    try:
        session = connect(connection_of(args))
    except UsageError as error:
        _fail("usage", str(error))
        return EXIT_USAGE
    try:
        handler(session, args, out)
    except UsageError as error:
        _fail("usage", str(error))
        return EXIT_USAGE
    except RuntimeManagerClientError as error:
        _fail(error_label(error), error.message)
        return exit_code_for(error)
    except RuntimeManagerError as error:
        # The client could not decode what the server sent.
        _fail(ErrorCode.INTERNAL, f"unexpected response from the server: {error.message}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK if handler is _watch else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): silence the final flush.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.stream.fileno())
        return EXIT_FAILURE
    finally:
        session.close()
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    connect: Connect = CtlClient,
    stdout: TextIO | None = None,
) -> int:
    """Parse `argv` (without the leading `ctl`), run it, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as leaving:  # --help (0) or a usage error (2)
        return leaving.code if isinstance(leaving.code, int) else EXIT_USAGE
    return run(args, connect=connect, stdout=stdout, parser=parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
