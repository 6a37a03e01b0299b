"""Conversion between protobuf messages and domain objects: the one place it happens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.explanation import ContainerState, LeaseHolder, RuntimeExplanation
from rtmanager.domain.jobs import JobKind, LobbyJob, PendingJob
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import RuntimeEvent

E = TypeVar("E", bound=Enum)

STATUS_TO_PB: Mapping[RuntimeStatus, pb.RuntimeStatus.ValueType] = {
    RuntimeStatus.RUNNING: pb.RUNTIME_STATUS_RUNNING,
    RuntimeStatus.STOPPED: pb.RUNTIME_STATUS_STOPPED,
    RuntimeStatus.REMOVED: pb.RUNTIME_STATUS_REMOVED,
}
OP_KIND_TO_PB: Mapping[OpKind, pb.OpKind.ValueType] = {
    OpKind.START: pb.OP_KIND_START,
    OpKind.STOP: pb.OP_KIND_STOP,
    OpKind.RESTART: pb.OP_KIND_RESTART,
    OpKind.PATCH: pb.OP_KIND_PATCH,
    OpKind.CLEANUP_CONTAINER: pb.OP_KIND_CLEANUP_CONTAINER,
    OpKind.RECONCILE_ADOPT: pb.OP_KIND_RECONCILE_ADOPT,
    OpKind.RECONCILE_DISPOSE: pb.OP_KIND_RECONCILE_DISPOSE,
}
OP_SOURCE_TO_PB: Mapping[OpSource, pb.OpSource.ValueType] = {
    OpSource.LOBBY_STREAM: pb.OP_SOURCE_LOBBY_STREAM,
    OpSource.GM_REST: pb.OP_SOURCE_GAME_MASTER,
    OpSource.ADMIN_REST: pb.OP_SOURCE_ADMIN,
    OpSource.AUTO_TTL: pb.OP_SOURCE_AUTO_TTL,
    OpSource.AUTO_RECONCILE: pb.OP_SOURCE_AUTO_RECONCILE,
}
OUTCOME_TO_PB: Mapping[Outcome, pb.Outcome.ValueType] = {
    Outcome.SUCCESS: pb.OUTCOME_SUCCESS,
    Outcome.FAILURE: pb.OUTCOME_FAILURE,
}
STOP_REASON_TO_PB: Mapping[StopReason, pb.StopReason.ValueType] = {
    StopReason.ADMIN_REQUEST: pb.STOP_REASON_ADMIN_REQUEST,
    StopReason.LOBBY_REQUEST: pb.STOP_REASON_LOBBY_REQUEST,
    StopReason.GAME_FINISHED: pb.STOP_REASON_GAME_FINISHED,
    StopReason.ENGINE_EXITED: pb.STOP_REASON_ENGINE_EXITED,
}

JOB_KIND_TO_PB: Mapping[JobKind, pb.JobKind.ValueType] = {
    JobKind.START: pb.JOB_KIND_START,
    JobKind.STOP: pb.JOB_KIND_STOP,
}


def _reverse(mapping: Mapping[E, int]) -> dict[int, E]:
    return {value: key for key, value in mapping.items()}


STATUS_FROM_PB = _reverse(STATUS_TO_PB)
OP_KIND_FROM_PB = _reverse(OP_KIND_TO_PB)
OP_SOURCE_FROM_PB = _reverse(OP_SOURCE_TO_PB)
OUTCOME_FROM_PB = _reverse(OUTCOME_TO_PB)
JOB_KIND_FROM_PB = _reverse(JOB_KIND_TO_PB)
# An unspecified reason is an admin request.
STOP_REASON_FROM_PB = {pb.STOP_REASON_UNSPECIFIED: StopReason.ADMIN_REQUEST} | _reverse(
    STOP_REASON_TO_PB
)


def enum_from_pb(mapping: Mapping[int, E], value: int, field: str) -> E | None:
    """Map a proto enum value to the domain; UNSPECIFIED (0) is None.

    Unknown numbers (a newer client, or garbage) are `InvalidRequest`.
    """
    if value == 0:
        return None
    try:
        return mapping[value]
    except KeyError:
        raise InvalidRequest(
            f"{field} {value} is not a known value", metadata={"field": field}
        ) from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _stamp(value: datetime) -> dict[str, int]:
    """The fields of the Timestamp of an aware datetime, from integer arithmetic.

    A dict, since building the Timestamp inside its parent's constructor is
    about three times cheaper than `Timestamp.FromDatetime` and a copy.
    """
    delta = value - _EPOCH
    return {"seconds": delta.days * 86_400 + delta.seconds, "nanos": delta.microseconds * 1000}


def _stamps(**values: datetime | None) -> dict[str, Any]:
    """Timestamp fields for a message's constructor; None values are left unset."""
    return {name: _stamp(value) for name, value in values.items() if value is not None}


def timestamp_to_pb(value: datetime | None) -> Timestamp | None:
    """Return a protobuf Timestamp for an aware datetime (None stays None)."""
    if value is None:
        return None
    return Timestamp(**_stamp(value))


def timestamp_from_pb(message: object, field: str) -> datetime | None:
    """Return the datetime of an optional Timestamp field of `message`, or None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    stamp: Timestamp = getattr(message, field)
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidRequest(f"{field} has invalid nanos", metadata={"field": field})
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{field} is out of range", metadata={"field": field}) from None


def record_to_pb(record: RuntimeRecord) -> pb.RuntimeRecord:
    """Return the proto form of a runtime record."""
    return pb.RuntimeRecord(
        game_id=record.game_id,
        status=STATUS_TO_PB[record.status],
        current_container_id=record.current_container_id,
        current_image_ref=record.current_image_ref,
        engine_endpoint=record.engine_endpoint,
        state_path=record.state_path,
        docker_network=record.docker_network,
        node_id=record.node_id,
        node_hostname=record.node_hostname,
        **_stamps(
            started_at=record.started_at,
            stopped_at=record.stopped_at,
            removed_at=record.removed_at,
            last_op_at=record.last_op_at,
            created_at=record.created_at,
        ),
    )


_RECORD_FIELD = b"\x0a"  # field 1, length-delimited: the record of both replies
_TOKEN_FIELD = b"\x12"  # field 2, length-delimited: ListRuntimesResponse.next_page_token


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_FIELD_MEMO_SIZE = 4096
# id(record) -> (record, its field bytes); the entry keeps the record alive,
# so its id cannot stand for another object while the entry is here.
_fields_by_record: dict[int, tuple[RuntimeRecord, bytes]] = {}


def _record_field(record: RuntimeRecord) -> bytes:
    """`record` serialized as field 1 of a reply, memoised by record object.

    Records are immutable, so the bytes of one never go stale. The reader
    hands out the same record object for a row read again unchanged (see
    `record_from_columns`), so the memo is keyed by identity: a lookup by
    `id` instead of hashing all fourteen fields, which cost a ListRuntimes
    page of 100 records more than the rest of its conversion. An equal
    record that is another object is serialized again, which is correct,
    only slower. The oldest entry goes when the memo is full.
    """
    entry = _fields_by_record.get(id(record))
    if entry is not None and entry[0] is record:
        return entry[1]
    body = record_to_pb(record).SerializeToString()
    field = _RECORD_FIELD + _varint(len(body)) + body
    if len(_fields_by_record) >= _FIELD_MEMO_SIZE:
        # Another thread may have evicted first or be changing the memo.
        with contextlib.suppress(KeyError, StopIteration, RuntimeError):
            del _fields_by_record[next(iter(_fields_by_record))]
    _fields_by_record[id(record)] = (record, field)
    return field


def get_runtime_reply(record: RuntimeRecord) -> bytes:
    """The serialized `GetRuntimeResponse` of `record`."""
    return _record_field(record)


def list_runtimes_reply(records: Iterable[RuntimeRecord], next_page_token: str) -> bytes:
    """The serialized `ListRuntimesResponse` of a page: the same bytes protobuf
    writes for the message, assembled from each record's memoised bytes."""
    wire = b"".join(map(_record_field, records))
    if next_page_token:
        token = next_page_token.encode()
        wire += _TOKEN_FIELD + _varint(len(token)) + token
    return wire


def operation_to_pb(entry: OperationEntry) -> pb.OperationEntry:
    """Return the proto form of an operation-log entry."""
    return pb.OperationEntry(
        id=entry.id,
        game_id=entry.game_id,
        op_kind=OP_KIND_TO_PB[entry.op_kind],
        op_source=OP_SOURCE_TO_PB[entry.op_source],
        source_ref=entry.source_ref,
        image_ref=entry.image_ref,
        container_id=entry.container_id,
        outcome=OUTCOME_TO_PB[entry.outcome],
        error_code=entry.error_code,
        error_message=entry.error_message,
        parent_op_kind=parent_kind_to_pb(entry.parent_op_kind),
        parent_operation_id=entry.parent_operation_id,
        **_stamps(started_at=entry.started_at, finished_at=entry.finished_at),
    )


def parent_kind_to_pb(kind: OpKind | None) -> pb.OpKind.ValueType:
    """The proto form of a parent op kind; none is UNSPECIFIED."""
    return OP_KIND_TO_PB[kind] if kind is not None else pb.OP_KIND_UNSPECIFIED


def stop_reason_from_pb(value: int) -> StopReason:
    """The stop reason of a request; unspecified means an admin request."""
    try:
        return STOP_REASON_FROM_PB[value]
    except KeyError:
        raise InvalidRequest(
            f"reason {value} is not a known value", metadata={"field": "reason"}
        ) from None


def record_from_pb(message: pb.RuntimeRecord) -> RuntimeRecord:
    """Return the domain form of a proto runtime record (used by clients)."""
    status = STATUS_FROM_PB.get(message.status)
    if status is None:
        raise InvalidRequest(f"status {message.status} is not a known value")
    last_op_at = timestamp_from_pb(message, "last_op_at")
    created_at = timestamp_from_pb(message, "created_at")
    if last_op_at is None or created_at is None:
        raise InvalidRequest("runtime record lacks last_op_at or created_at")
    return RuntimeRecord(
        game_id=message.game_id,
        status=status,
        engine_endpoint=message.engine_endpoint,
        state_path=message.state_path,
        docker_network=message.docker_network,
        last_op_at=last_op_at,
        created_at=created_at,
        current_container_id=message.current_container_id,
        current_image_ref=message.current_image_ref,
        started_at=timestamp_from_pb(message, "started_at"),
        stopped_at=timestamp_from_pb(message, "stopped_at"),
        removed_at=timestamp_from_pb(message, "removed_at"),
        node_id=message.node_id,
        node_hostname=message.node_hostname,
    )


def operation_from_pb(message: pb.OperationEntry) -> OperationEntry:
    """Return the domain form of a proto operation entry (used by clients)."""
    kind = OP_KIND_FROM_PB.get(message.op_kind)
    source = OP_SOURCE_FROM_PB.get(message.op_source)
    outcome = OUTCOME_FROM_PB.get(message.outcome)
    started_at = timestamp_from_pb(message, "started_at")
    if kind is None or source is None or outcome is None or started_at is None:
        raise InvalidRequest(f"operation entry {message.id} has unknown or missing fields")
    return OperationEntry(
        id=message.id,
        game_id=message.game_id,
        op_kind=kind,
        op_source=source,
        outcome=outcome,
        started_at=started_at,
        finished_at=timestamp_from_pb(message, "finished_at"),
        source_ref=message.source_ref,
        image_ref=message.image_ref,
        container_id=message.container_id,
        error_code=message.error_code,
        error_message=message.error_message,
        parent_op_kind=_parent_kind_from_pb(message.parent_op_kind),
        parent_operation_id=message.parent_operation_id,
    )


def _parent_kind_from_pb(value: int) -> OpKind | None:
    return enum_from_pb(OP_KIND_FROM_PB, value, "parent_op_kind")


def event_from_pb(message: pb.RuntimeEvent) -> RuntimeEvent:
    """Return the domain form of a watched event (used by clients).

    Its `id` is the event's cursor, which rtmanager writes as the decimal
    event id.
    """
    kind = OP_KIND_FROM_PB.get(message.op_kind)
    source = OP_SOURCE_FROM_PB.get(message.op_source)
    outcome = OUTCOME_FROM_PB.get(message.outcome)
    committed_at = timestamp_from_pb(message, "committed_at")
    if kind is None or source is None or outcome is None or committed_at is None:
        raise InvalidRequest(f"event {message.cursor!r} has unknown or missing fields")
    if not message.cursor.isascii() or not message.cursor.isdigit():
        raise InvalidRequest(f"event cursor {message.cursor!r} is not an event id")
    return RuntimeEvent(
        id=int(message.cursor),
        operation_id=message.operation_id,
        op_kind=kind,
        op_source=source,
        outcome=outcome,
        record=record_from_pb(message.runtime),
        committed_at=committed_at,
        source_ref=message.source_ref,
        parent_op_kind=_parent_kind_from_pb(message.parent_op_kind),
        parent_operation_id=message.parent_operation_id,
    )


def statuses_from_pb(values: Iterable[int]) -> list[RuntimeStatus]:
    """Status filters of a request; UNSPECIFIED or unknown values are invalid."""
    statuses = []
    for value in values:
        status = enum_from_pb(STATUS_FROM_PB, value, "statuses")
        if status is None:
            raise InvalidRequest(
                "statuses must not contain UNSPECIFIED", metadata={"field": "statuses"}
            )
        statuses.append(status)
    return statuses


def duration_to_pb(value: timedelta | None) -> Duration | None:
    """Return a protobuf Duration for a timedelta (None stays None)."""
    if value is None:
        return None
    duration = Duration()
    duration.FromTimedelta(value)
    return duration


def duration_from_pb(message: object, field: str) -> timedelta | None:
    """Return the timedelta of an optional Duration field of `message`, or None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    duration: Duration = getattr(message, field)
    try:
        return duration.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{field} is out of range", metadata={"field": field}) from None


def container_state_to_pb(state: ContainerState) -> pb.ContainerState:
    """Return the proto form of a container's state."""
    return pb.ContainerState(
        container_id=state.id,
        name=state.name,
        status=state.status,
        running=state.running,
        owned=state.owned,
        image_ref=state.image_ref,
        image_id=state.image_id,
        exit_code=state.exit_code,
        oom_killed=state.oom_killed,
        health=state.health or "",
        restart_count=state.restart_count,
        node_id=state.node_id,
        node_hostname=state.node_hostname,
        **_stamps(started_at=state.started_at, finished_at=state.finished_at),
    )


def container_state_from_pb(message: pb.ContainerState) -> ContainerState:
    """Return the domain form of a proto container state (used by clients)."""
    return ContainerState(
        id=message.container_id,
        name=message.name,
        status=message.status,
        running=message.running,
        owned=message.owned,
        image_ref=message.image_ref,
        image_id=message.image_id,
        exit_code=message.exit_code if message.HasField("exit_code") else None,
        oom_killed=message.oom_killed,
        health=message.health or None,
        started_at=timestamp_from_pb(message, "started_at"),
        finished_at=timestamp_from_pb(message, "finished_at"),
        restart_count=message.restart_count,
        node_id=message.node_id,
        node_hostname=message.node_hostname,
    )


def pending_job_to_pb(pending: PendingJob) -> pb.PendingJob:
    """Return the proto form of an unanswered Lobby job."""
    return pb.PendingJob(
        kind=JOB_KIND_TO_PB[pending.job.kind],
        stream=pending.job.stream,
        entry_id=pending.job.entry_id,
        fields=dict(pending.fields),
        consumer=pending.consumer,
        deliveries=pending.deliveries,
        idle=duration_to_pb(pending.idle),
    )


def pending_job_from_pb(message: pb.PendingJob) -> PendingJob:
    """Return the domain form of a proto pending job (used by clients)."""
    kind = JOB_KIND_FROM_PB.get(message.kind)
    if kind is None:
        raise InvalidRequest(f"pending job {message.entry_id} has an unknown kind {message.kind}")
    return PendingJob(
        job=LobbyJob(kind=kind, stream=message.stream, entry_id=message.entry_id),
        fields=dict(message.fields),
        consumer=message.consumer,
        deliveries=message.deliveries,
        idle=duration_from_pb(message, "idle"),
    )


def explanation_to_pb(explanation: RuntimeExplanation) -> pb.ExplainRuntimeResponse:
    """Return the proto form of what is known about a game."""
    record, container, lease = explanation.record, explanation.container, explanation.lease
    return pb.ExplainRuntimeResponse(
        game_id=explanation.game_id,
        runtime=None if record is None else record_to_pb(record),
        container=None if container is None else container_state_to_pb(container),
        operations=[operation_to_pb(entry) for entry in explanation.operations],
        pending_jobs=[pending_job_to_pb(job) for job in explanation.pending_jobs],
        pending_jobs_truncated=explanation.pending_jobs_truncated,
        lease=(
            None
            if lease is None
            else pb.LeaseHolder(instance_id=lease.instance_id, ttl=duration_to_pb(lease.ttl))
        ),
    )


def explanation_from_pb(message: pb.ExplainRuntimeResponse) -> RuntimeExplanation:
    """Return the domain form of an `ExplainRuntimeResponse` (used by clients)."""
    lease = (
        LeaseHolder(message.lease.instance_id, duration_from_pb(message.lease, "ttl"))
        if message.HasField("lease")
        else None
    )
    return RuntimeExplanation(
        game_id=message.game_id,
        record=record_from_pb(message.runtime) if message.HasField("runtime") else None,
        container=(
            container_state_from_pb(message.container) if message.HasField("container") else None
        ),
        operations=tuple(operation_from_pb(entry) for entry in message.operations),
        pending_jobs=tuple(pending_job_from_pb(job) for job in message.pending_jobs),
        pending_jobs_truncated=message.pending_jobs_truncated,
        lease=lease,
    )
