"""What `rtmanager ctl` prints: tables and `name: value` details for a
person, JSON for a script (domain objects through `to_json`, proto messages
through `json_format`), and `Output`, which picks between them per `--json`.

Nothing here calls the server: each function renders what a call returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.domain.explanation import ContainerState, LeaseHolder, RuntimeExplanation
from rtmanager.domain.jobs import PendingJob
from rtmanager.domain.operation import OperationEntry
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.ports import Page

_CONTAINER_ID_WIDTH = 12
_NODE_ID_WIDTH = 12


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
