"""The runtime event outbox in PostgreSQL (`runtime_events`, migration 0002).

`PostgresRuntimeEventLog.append` runs inside a unit of work: it takes a
transaction-scoped advisory lock, inserts the event and calls pg_notify, so
ids are assigned in commit order and listeners hear of the event when (and
only when) it commits. The read helpers serve the event feed.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, LiteralString

from psycopg import IsolationLevel
from psycopg.rows import dict_row

from rtmanager.adapters.postgres.pool import Connection, Pool, database_errors
from rtmanager.adapters.postgres.records import record_from_row, record_params
from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.ports import CursorExpired, RuntimeEvent

_LOCK: LiteralString = (
    "SELECT pg_advisory_xact_lock(hashtextextended('rtmanager.events:' || current_schema(), 0))"
)
_INSERT: LiteralString = (
    "INSERT INTO runtime_events (operation_id, game_id, status, current_container_id,"
    " current_image_ref, engine_endpoint, state_path, docker_network, started_at,"
    " stopped_at, removed_at, last_op_at, created_at) VALUES ("
    "%(operation_id)s, %(game_id)s, %(status)s, %(current_container_id)s,"
    " %(current_image_ref)s, %(engine_endpoint)s, %(state_path)s, %(docker_network)s,"
    " %(started_at)s, %(stopped_at)s, %(removed_at)s, %(last_op_at)s, %(created_at)s)"
    " RETURNING id"
)
_NOTIFY: LiteralString = (
    "SELECT pg_notify('rtmanager_events_' || left(md5(current_schema()), 16), %s)"
)
_SELECT_AFTER: LiteralString = (
    "SELECT e.id, e.operation_id, e.committed_at, o.op_kind, o.op_source, o.outcome,"
    " e.game_id, e.status, e.current_container_id, e.current_image_ref, e.engine_endpoint,"
    " e.state_path, e.docker_network, e.started_at, e.stopped_at, e.removed_at,"
    " e.last_op_at, e.created_at"
    " FROM runtime_events e JOIN operation_log o ON o.id = e.operation_id"
    " WHERE e.id > %s ORDER BY e.id LIMIT %s"
)
_SELECT_RECORDS: LiteralString = (
    "SELECT game_id, status, current_container_id, current_image_ref, engine_endpoint,"
    " state_path, docker_network, started_at, stopped_at, removed_at, last_op_at, created_at"
    " FROM runtime_records ORDER BY game_id"
)


def channel_name(schema: str) -> str:
    """The LISTEN channel of a schema's event feed (matches `_NOTIFY`)."""
    return "rtmanager_events_" + hashlib.md5(schema.encode()).hexdigest()[:16]  # noqa: S324


class PostgresRuntimeEventLog:
    """`RuntimeEventLog` on the connection of one unit of work."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def append(self, operation: OperationEntry, record: RuntimeRecord) -> int:
        """Insert the event (ids in commit order) and notify listeners on commit."""
        params = {"operation_id": operation.id, **record_params(record)}
        with database_errors(f"append a runtime event of game {record.game_id}"):
            # Held until commit: the next writer gets its id only after this
            # transaction is visible, so readers following ids skip nothing.
            self._conn.execute(_LOCK)
            row = self._conn.execute(_INSERT, params).fetchone()
            assert row is not None
            event_id = int(row[0])
            self._conn.execute(_NOTIFY, (str(event_id),))
        return event_id


def event_from_row(row: dict[str, Any]) -> RuntimeEvent:
    """Map a joined event row to the domain event."""
    return RuntimeEvent(
        id=row["id"],
        operation_id=row["operation_id"],
        op_kind=OpKind(row["op_kind"]),
        op_source=OpSource(row["op_source"]),
        outcome=Outcome(row["outcome"]),
        record=record_from_row(row),
        committed_at=row["committed_at"].astimezone(UTC),
    )


def events_after(conn: Connection, after_id: int, limit: int) -> list[RuntimeEvent]:
    """Up to `limit` events with id > `after_id`, in id order."""
    with database_errors("read runtime events"), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_SELECT_AFTER, (after_id, limit)).fetchall()
    return [event_from_row(row) for row in rows]


def newest_event_id(conn: Connection) -> int:
    """The highest event id ever issued (0 before the first event)."""
    with database_errors("read the newest runtime event id"):
        row = conn.execute(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM runtime_events_id_seq"
        ).fetchone()
    return int(row[0]) if row else 0


def check_cursor(conn: Connection, cursor: int) -> None:
    """Raise `CursorExpired` below retention, `InvalidRequest` past the newest id."""
    with database_errors("check a watch cursor"):
        row = conn.execute("SELECT pruned_through FROM runtime_event_retention").fetchone()
    pruned_through = int(row[0]) if row else 0
    if cursor < pruned_through:
        raise CursorExpired(
            f"cursor {cursor} is older than the event retention (events up to "
            f"{pruned_through} were pruned); resync with a snapshot"
        )
    if cursor > newest_event_id(conn):
        raise InvalidRequest(f"cursor {cursor} was never issued", metadata={"field": "since"})


def read_snapshot(pool: Pool, timeout: float) -> tuple[list[RuntimeRecord], int]:
    """Every record and the newest event id, from one REPEATABLE READ snapshot."""
    with database_errors("read a snapshot"), pool.connection(timeout=timeout) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        try:
            with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(_SELECT_RECORDS).fetchall()
                cur.execute(
                    "SELECT greatest(coalesce(max(id), 0),"
                    " (SELECT pruned_through FROM runtime_event_retention)) AS newest"
                    " FROM runtime_events"
                )
                newest_row = cur.fetchone()
        finally:
            conn.isolation_level = None
    newest = int(newest_row["newest"]) if newest_row else 0
    return [record_from_row(row) for row in rows], newest


def prune_events(conn: Connection, cutoff: datetime) -> int:
    """Delete events committed before `cutoff`; remember how far; return how many."""
    with database_errors("prune runtime events"):
        row = conn.execute(
            "WITH gone AS (DELETE FROM runtime_events WHERE committed_at < %s RETURNING id) "
            "SELECT count(*), coalesce(max(id), 0) FROM gone",
            (cutoff,),
        ).fetchone()
        count, through = (int(row[0]), int(row[1])) if row else (0, 0)
        if through:
            conn.execute(
                "UPDATE runtime_event_retention SET pruned_through = greatest(pruned_through, %s)",
                (through,),
            )
    return count
