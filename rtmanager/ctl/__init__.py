"""`rtmanager ctl`: a human client of a running rtmanager server.

One subcommand per RPC, each a call of `rtmanager.client.RuntimeManagerClient`
(its channel, its typed errors, its paging)::

    rtmanager ctl start g1 galaxy/engine:1.4.2
    rtmanager ctl --json get g1
    rtmanager ctl ops --game g1 --limit 20
    rtmanager ctl explain g1

Output is a readable table by default; `--json` prints machine output
instead: records, operation-log entries and `explain`'s answer as objects
whose timestamps are ISO-8601 UTC strings, whose durations are seconds and
whose enum values are the lower-case strings the domain stores; listings as
an object holding the array and `next_page_token`; `reconcile` and `watch`
as the proto messages rendered by `google.protobuf.json_format` (`watch`
prints one object per line).

The connection comes from the global options, given after `ctl` (or after
the subcommand):
`--addr` (default $RTMANAGER_CTL_ADDR, else $RTMANAGER_GRPC_ADDR, else
127.0.0.1:50051), `--token` (default $RTMANAGER_CTL_TOKEN), `--tls-ca`,
`--tls-cert`, `--tls-key` (any of them switches to TLS; cert and key make it
mutual TLS), `--timeout` seconds per call (default 60; `watch` is not bounded
by it).

A failure prints `rtmanager ctl: <code>: <message>` on stderr, the code
being the stable error code (`not_found`, `service_unavailable`, ...), and
exits with the code `EXIT_CODES` gives the client's exception class
(`--help` lists them); usage errors exit 2, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.client import (
    ClientCredentials,
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
)
from rtmanager.domain.explanation import ContainerState, LeaseHolder, RuntimeExplanation
from rtmanager.domain.jobs import PendingJob
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

# The exit code of a failed call, by the client's exception class (a
# subclass inherits its base's); any other failure exits EXIT_FAILURE.
EXIT_CODES: dict[type[RuntimeManagerClientError], int] = {
    InternalServerError: EXIT_FAILURE,
    InvalidRequestError: EXIT_USAGE,
    NotFoundError: EXIT_NOT_FOUND,
    ConflictError: EXIT_CONFLICT,
    SemverPatchOnlyError: EXIT_REJECTED,
    ImageNotAllowedError: EXIT_REJECTED,
    ImagePullFailedError: EXIT_REJECTED,
    ContainerStartFailedError: EXIT_REJECTED,
    UnauthenticatedError: EXIT_AUTH,
    PermissionDeniedError: EXIT_AUTH,
    ServiceUnavailableError: EXIT_UNAVAILABLE,
}
_EXIT_NOTES = {
    EXIT_FAILURE: ", and any other failure (including unimplemented)",
    EXIT_USAGE: ", and usage errors",
    EXIT_UNAVAILABLE: " (including deadline exceeded and an unreachable server)",
}


def exit_code_for(error: RuntimeManagerClientError) -> int:
    """The process exit code of a failed call (see `EXIT_CODES`)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_FAILURE


def _exit_codes_help() -> str:
    codes: dict[int, list[str]] = {EXIT_OK: ["success"]}
    for cls, code in EXIT_CODES.items():
        codes.setdefault(code, []).append(cls.error_code)
    lines = [
        f"{code:>5}  {', '.join(codes[code])}{_EXIT_NOTES.get(code, '')}" for code in sorted(codes)
    ]
    lines.append(
        f"{EXIT_INTERRUPTED:>5}  interrupted (Ctrl-C); ending watch with Ctrl-C is a success"
    )
    return "\n".join(lines)


EPILOG = f"""\
exit codes:
{_exit_codes_help()}

errors are printed to stderr as 'rtmanager ctl: <code>: <message>'.
"""

_CONTAINER_ID_WIDTH = 12
_NODE_ID_WIDTH = 12


class UsageError(Exception):
    """Options that cannot work together, or a file that cannot be read."""


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


def connect(connection: Connection) -> RuntimeManagerClient:
    """The typed client for `connection`."""
    return RuntimeManagerClient(
        connection.address,
        token=connection.token,
        tls=connection.tls,
        timeout=connection.timeout,
    )


Connect = Callable[[Connection], RuntimeManagerClient]


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
    if isinstance(value, timedelta):
        return value.total_seconds()
    if is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def to_json(item: Any) -> dict[str, Any]:
    """A domain object (a record, an operation-log entry, an explanation, ...) as a
    JSON-ready dict: enums as their values, times as ISO-8601 UTC, durations in
    seconds, an operation-log entry's id first."""
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


RECORD_HEADERS = ("GAME ID", "STATUS", "IMAGE", "CONTAINER", "NODE", "ENDPOINT", "LAST OP")
OPERATION_HEADERS = ("ID", "TIME", "GAME", "KIND", "SOURCE", "OUTCOME", "ERROR", "SOURCE REF")


def record_row(record: RuntimeRecord) -> list[str]:
    """The table cells of one record (the container and node ids cut to 12 characters)."""
    return [
        record.game_id,
        str(record.status),
        record.current_image_ref,
        record.current_container_id[:_CONTAINER_ID_WIDTH],
        record.node_id[:_NODE_ID_WIDTH],
        record.engine_endpoint,
        _short_time(record.last_op_at),
    ]


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


def details(rows: Sequence[tuple[str, str]]) -> str:
    """`name: value` lines with the values aligned; empty values shown as '-'."""
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width}} {value or '-'}" for name, value in rows)


def record_details(record: RuntimeRecord) -> str:
    """Every field of one record, one per line."""
    return details(
        [
            ("game id", record.game_id),
            ("status", str(record.status)),
            ("image", record.current_image_ref),
            ("container", record.current_container_id),
            ("node", node_text(record.node_id, record.node_hostname)),
            ("endpoint", record.engine_endpoint),
            ("state path", record.state_path),
            ("network", record.docker_network),
            ("created at", _short_time(record.created_at)),
            ("started at", _short_time(record.started_at)),
            ("stopped at", _short_time(record.stopped_at)),
            ("removed at", _short_time(record.removed_at)),
            ("last op at", _short_time(record.last_op_at)),
        ]
    )


def node_text(node_id: str, node_hostname: str) -> str:
    """A node as `hostname (id)`; empty when there is none (a single host)."""
    if not node_id:
        return ""
    return f"{node_hostname} ({node_id})" if node_hostname else node_id


def _seconds(value: timedelta | None) -> str:
    return "-" if value is None else f"{value.total_seconds():.1f}s"


def container_details(container: ContainerState) -> str:
    """What the backend reports of a container, one field per line."""
    exit_code = "-" if container.exit_code is None else str(container.exit_code)
    return details(
        [
            ("id", container.id),
            ("name", container.name),
            ("status", container.status),
            ("exit code", exit_code),
            ("oom killed", "yes" if container.oom_killed else "no"),
            ("health", container.health or ""),
            ("started at", _short_time(container.started_at)),
            ("finished at", _short_time(container.finished_at)),
            ("restart count", str(container.restart_count)),
            ("node", node_text(container.node_id, container.node_hostname)),
            ("image", container.image_ref),
            ("image id", container.image_id),
            ("ours", "yes" if container.owned else "no (not this deployment's: never touched)"),
        ]
    )


def lease_text(lease: LeaseHolder | None) -> str:
    """Who holds a game's lease, in a line."""
    if lease is None:
        return "free"
    holder = lease.instance_id or "a holder that does not name itself"
    if lease.ttl is None:
        return f"held by {holder}, without expiry"
    return f"held by {holder}, expires in {_seconds(lease.ttl)} unless renewed"


PENDING_HEADERS = ("KIND", "ENTRY ID", "FIELDS", "CONSUMER", "DELIVERIES", "IDLE")


def pending_row(pending: PendingJob) -> list[str]:
    """The table cells of one unanswered Lobby job (its game id left out)."""
    shown = " ".join(f"{k}={v}" for k, v in pending.fields.items() if k != "game_id")
    return [
        str(pending.job.kind),
        pending.job.entry_id,
        shown,
        pending.consumer or "(not delivered)",
        str(pending.deliveries),
        _seconds(pending.idle),
    ]


def explanation_text(explanation: RuntimeExplanation) -> str:
    """What is known about a game, one section per source."""
    record, container = explanation.record, explanation.container
    sections = [
        f"runtime record:\n{record_details(record)}" if record else "runtime record: none",
        f"container:\n{container_details(container)}" if container else "container: none",
        f"lease: {lease_text(explanation.lease)}",
    ]
    if explanation.pending_jobs:
        rows = [pending_row(job) for job in explanation.pending_jobs]
        sections.append(f"unanswered lobby jobs:\n{table(PENDING_HEADERS, rows)}")
    else:
        sections.append("unanswered lobby jobs: none")
    if explanation.pending_jobs_truncated:
        sections[-1] += "\n(the scan of the job streams stopped at its bound: there may be more)"
    if explanation.operations:
        rows = [operation_row(entry) for entry in explanation.operations]
        sections.append(f"latest operations:\n{table(OPERATION_HEADERS, rows)}")
    else:
        sections.append("latest operations: none")
    return "\n\n".join(sections)


def message_to_json(message: Message) -> dict[str, Any]:
    """A proto message as a dict with proto field names and every field present."""
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


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
            pb.ReconcileActionKind.Name(action.kind).removeprefix("RECONCILE_ACTION_KIND_").lower(),
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


def _pb_time(message: Message, field: str) -> str:
    """A timestamp field as `record_row` shows times ('-' when unset or unreadable)."""
    if not message.HasField(field):
        return "-"
    try:
        return _short_time(getattr(message, field).ToDatetime(tzinfo=UTC))
    except (ValueError, OverflowError):
        return "-"


def _pb_name(mapping: Mapping[int, Enum], value: int) -> str:
    """The domain name of a proto enum value ('-' for unspecified or unknown)."""
    known = mapping.get(value)
    return "-" if known is None else str(known.value)


def _streamed_record_row(runtime: pb.RuntimeRecord) -> list[str]:
    """`record_row` of a streamed record, shown as sent (a watch shows, never rejects)."""
    return [
        runtime.game_id,
        _pb_name(convert.STATUS_FROM_PB, runtime.status),
        runtime.current_image_ref,
        runtime.current_container_id[:_CONTAINER_ID_WIDTH],
        runtime.node_id[:_NODE_ID_WIDTH],
        runtime.engine_endpoint,
        _pb_time(runtime, "last_op_at"),
    ]


def watch_line(message: pb.WatchRuntimesResponse) -> str | None:
    """One readable line per streamed message; None for bookmarks (heartbeats)."""
    payload = message.WhichOneof("payload")
    if payload == "snapshot":
        return "snapshot  " + "  ".join(
            cell or "-" for cell in _streamed_record_row(message.snapshot)
        )
    if payload == "snapshot_complete":
        return f"snapshot complete  cursor={message.snapshot_complete.cursor}"
    if payload == "event":
        event = message.event
        cells = [
            _pb_time(event, "committed_at"),
            _pb_name(convert.OP_KIND_FROM_PB, event.op_kind),
            _pb_name(convert.OP_SOURCE_FROM_PB, event.op_source),
            _pb_name(convert.OUTCOME_FROM_PB, event.outcome),
            *_streamed_record_row(event.runtime)[:4],
            f"op={event.operation_id}",
            f"cursor={event.cursor}",
        ]
        if event.runtime.node_id:  # on a cluster backend: where the engine is placed
            cells.insert(-2, f"node={event.runtime.node_id[:_NODE_ID_WIDTH]}")
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

    def record(self, record: RuntimeRecord, *, full: bool = False) -> None:
        """One runtime record: a table row, or every field when `full`."""
        if self.json:
            self.emit_json(to_json(record))
        else:
            self.emit(
                record_details(record) if full else table(RECORD_HEADERS, [record_row(record)])
            )

    def records(self, page: Page[RuntimeRecord]) -> None:
        """A page of runtime records."""
        self._page("runtimes", page, RECORD_HEADERS, record_row)

    def operations(self, page: Page[OperationEntry]) -> None:
        """A page of operation-log entries."""
        self._page("operations", page, OPERATION_HEADERS, operation_row)

    def _page(
        self, key: str, page: Page[Any], headers: Sequence[str], row: Callable[[Any], list[str]]
    ) -> None:
        if self.json:
            items = [to_json(item) for item in page.items]
            self.emit_json({key: items, "next_page_token": page.next_page_token})
            return
        self.emit(table(headers, [row(item) for item in page.items]))
        if page.next_page_token:
            self.emit(f"next page: --page-token {page.next_page_token}")


# --------------------------------------------------------------------------
# Subcommands


def _start(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.start_runtime(args.game, args.image, source_ref=args.source_ref))


def _stop(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    reason = StopReason(args.reason)
    out.record(client.stop_runtime(args.game, reason=reason, source_ref=args.source_ref))


def _restart(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.restart_runtime(args.game, source_ref=args.source_ref))


def _patch(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.patch_runtime(args.game, args.image, source_ref=args.source_ref))


def _get(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.get_runtime(args.game), full=True)


def _list(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    status = RuntimeStatus(args.status) if args.status else None
    if args.all:
        records = client.iter_runtimes(
            status=status, page_size=args.page_size, page_token=args.page_token
        )
        out.records(Page(list(records)))
    else:
        out.records(
            client.list_runtimes(
                status=status, page_size=args.page_size, page_token=args.page_token
            )
        )


def _ops(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    if args.since and args.until and args.since >= args.until:
        raise UsageError("--since must be before --until")
    page = client.list_operations(
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


def _cleanup(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.cleanup_runtime(args.game, force=args.force, source_ref=args.source_ref))


def _reconcile(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    reply = client.reconcile(dry_run=args.dry_run)
    if out.json:
        out.emit_json(message_to_json(reply))
    else:
        out.emit(reconcile_text(reply))


def _explain(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    explanation = client.explain_runtime(args.game, operations=args.limit)
    if out.json:
        out.emit_json(to_json(explanation))
    else:
        out.emit(explanation_text(explanation))


def _watch(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    stream = client.watch_runtimes(
        game_ids=args.game or [],
        statuses=[RuntimeStatus(status) for status in args.status or []],
        since=args.since,
        initial_snapshot=args.snapshot,
    )
    for message in stream:
        if out.json:
            out.emit_json(message_to_json(message), indent=None)
            continue
        line = watch_line(message)
        if line is not None:
            out.emit(line)


Handler = Callable[[RuntimeManagerClient, argparse.Namespace, Output], None]


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

    def option(*names: str, default: object, **kwargs: Any) -> None:
        group.add_argument(*names, default=argparse.SUPPRESS if nested else default, **kwargs)

    group = parser.add_argument_group("connection and output")
    option(
        "--addr",
        default=None,
        metavar="HOST:PORT",
        help="server address (default: $RTMANAGER_CTL_ADDR, else $RTMANAGER_GRPC_ADDR, "
        f"else {DEFAULT_ADDR})",
    )
    option("--token", default=None, help="bearer token (default: $RTMANAGER_CTL_TOKEN)")
    option("--tls-ca", default=None, metavar="FILE", help="CA bundle; switches to TLS")
    option(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="client certificate for mutual TLS (with --tls-key)",
    )
    option(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="client private key for mutual TLS (with --tls-cert)",
    )
    option(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        type=_positive_float,
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g}; watch is unbounded)",
    )
    option("--json", default=False, action="store_true", help="print JSON instead of tables")


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

    def page_options(sub: argparse.ArgumentParser, size: str, size_help: str) -> None:
        sub.add_argument(size, type=_non_negative_int, default=0, metavar="N", help=size_help)
        sub.add_argument("--page-token", default="", metavar="T", help="continue a listing")

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
    page_options(sub, "--page-size", "records per page (default: the server's, 100)")
    sub.add_argument("--all", action="store_true", help="follow page tokens to the end")

    sub = command("ops", _ops, "list the operation log, newest first (admin)")
    sub.add_argument("--game", metavar="G", help="only this game")
    sub.add_argument("--kind", choices=[kind.value for kind in OpKind])
    sub.add_argument("--source", choices=[source.value for source in OpSource])
    sub.add_argument("--outcome", choices=[outcome.value for outcome in Outcome])
    sub.add_argument("--since", type=parse_timestamp, metavar="ISO8601", help="started at or after")
    sub.add_argument("--until", type=parse_timestamp, metavar="ISO8601", help="started before")
    page_options(sub, "--limit", "entries in this page (default: the server's, 100; at most 1000)")

    sub = command("cleanup", _cleanup, "remove a stopped game's container (admin)")
    game(sub)
    sub.add_argument("--force", action="store_true", help="stop a running engine first")
    source_ref(sub)

    sub = command("reconcile", _reconcile, "run a reconciliation pass now (admin)")
    sub.add_argument("--dry-run", action="store_true", help="only return the plan")

    sub = command(
        "explain",
        _explain,
        "what is known about a game: record, container, lease, Lobby jobs, operations (admin)",
    )
    game(sub)
    sub.add_argument(
        "--limit",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="operation-log entries to show (default: the server's, 20; at most 100)",
    )

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


# --------------------------------------------------------------------------
# Running


def _fail(code: str, message: str) -> None:
    print(f"{PROG}: {code}: {message}", file=sys.stderr)


def run(
    args: argparse.Namespace,
    *,
    connect: Connect = connect,
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
        client = connect(connection_of(args))
    except UsageError as error:
        _fail("usage", str(error))
        return EXIT_USAGE
    try:
        handler(client, args, out)
    except UsageError as error:
        _fail("usage", str(error))
        return EXIT_USAGE
    except RuntimeManagerClientError as error:
        _fail(error_label(error), error.message)
        return exit_code_for(error)
    except KeyboardInterrupt:
        return EXIT_OK if handler is _watch else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): silence the final flush.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.stream.fileno())
        return EXIT_FAILURE
    finally:
        client.close()
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    connect: Connect = connect,
    stdout: TextIO | None = None,
) -> int:
    """Parse `argv` (without the leading `ctl`), run it, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as leaving:  # --help (0) or a usage error (2)
        return leaving.code if isinstance(leaving.code, int) else EXIT_USAGE
    return run(args, connect=connect, stdout=stdout, parser=parser)
