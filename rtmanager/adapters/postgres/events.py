"""The runtime event outbox in PostgreSQL (`runtime_events`, migration 0002).

The writer's protocol: a unit of work's events are written by its commit,
after every other statement, in one pipeline with the `COMMIT`. Each
event's statement takes the schema's transaction-scoped advisory lock
(exclusive), inserts the event (its id drawn from the sequence now) and
calls pg_notify; the lock is released only when the transaction ends, and
PostgreSQL makes a commit visible before it releases the committer's locks.
Hence:

- ids are in commit order: the next writer draws its id only after this
  transaction is visible (or rolled back, leaving a gap no one will fill);
- at most one event is drawn but not yet committed at any time, and it has
  the highest id drawn so far;
- a READ COMMITTED statement sees a gap-free prefix of the committed
  events: if it sees event n it sees every committed event below n.

Retention deletes a prefix of ids and raises `pruned_through` in the same
statement, and `pruned_through` never decreases. So a page of events after
`c` read *before* `pruned_through <= c` is observed is whole: nothing after
`c` had been pruned when the page was read.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, LiteralString

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import TupleRow, dict_row

from rtmanager.adapters.postgres.pool import Connection, database_errors
from rtmanager.adapters.postgres.records import record_from_row, record_params
from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.ports import CursorExpired, RuntimeEvent

# One statement, one round trip: the INSERT reads its row from the lock's
# CTE, so the lock is held before the id is drawn from the sequence, and
# the notification names the id the INSERT returned (sent on commit).
_APPEND: LiteralString = (
    "WITH locked AS (SELECT pg_advisory_xact_lock("
    "hashtextextended('rtmanager.events:' || current_schema(), 0))),"
    " inserted AS (INSERT INTO runtime_events (operation_id, game_id, status,"
    " current_container_id, current_image_ref, engine_endpoint, state_path, docker_network,"
    " started_at, stopped_at, removed_at, last_op_at, created_at, node_id, node_hostname)"
    " SELECT %(operation_id)s, %(game_id)s, %(status)s, %(current_container_id)s,"
    " %(current_image_ref)s, %(engine_endpoint)s, %(state_path)s, %(docker_network)s,"
    " %(started_at)s::timestamptz, %(stopped_at)s::timestamptz, %(removed_at)s::timestamptz,"
    " %(last_op_at)s::timestamptz, %(created_at)s::timestamptz, %(node_id)s, %(node_hostname)s"
    " FROM locked"
    " RETURNING id)"
    " SELECT id, pg_notify('rtmanager_events_' || left(md5(current_schema()), 16), id::text)"
    " FROM inserted"
)
# Readers take the same lock shared: it waits for the writer holding it to
# commit, and no writer draws an id while it is held.
_LOCK_SHARED: LiteralString = (
    "SELECT pg_advisory_xact_lock_shared("
    "hashtextextended('rtmanager.events:' || current_schema(), 0))"
)
# A page of events after an id, each with what its operation-log row says.
_SELECT_AFTER: LiteralString = (
    "SELECT e.id, e.operation_id, e.committed_at, o.op_kind, o.op_source, o.outcome,"
    " o.source_ref, o.parent_op_kind, o.parent_operation_id, e.game_id, e.status,"
    " e.current_container_id, e.current_image_ref, e.engine_endpoint, e.state_path,"
    " e.docker_network, e.started_at, e.stopped_at, e.removed_at, e.last_op_at, e.created_at,"
    " e.node_id, e.node_hostname"
    " FROM runtime_events e JOIN operation_log o ON o.id = e.operation_id"
    " WHERE e.id > %s ORDER BY e.id LIMIT %s"
)
_SELECT_RECORDS: LiteralString = (
    "SELECT game_id, status, current_container_id, current_image_ref, engine_endpoint,"
    " state_path, docker_network, started_at, stopped_at, removed_at, last_op_at, created_at,"
    " node_id, node_hostname FROM runtime_records ORDER BY game_id"
)


def channel_name(schema: str) -> str:
    """The LISTEN channel of a schema's event feed (matches `_APPEND`)."""
    return "rtmanager_events_" + hashlib.md5(schema.encode()).hexdigest()[:16]  # noqa: S324


class PostgresRuntimeEventLog:
    """`RuntimeEventLog` on the connection of one unit of work.

    `append` only stages the event: `commit` sends the staged events and
    `COMMIT` in one pipeline, so the writers' lock is taken by the
    transaction's last statements and released by the `COMMIT` already
    queued behind them. No writer holds it across a round trip to this
    process, however long this process takes to read the reply.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._staged: list[dict[str, Any]] = []

    def append(self, operation: OperationEntry, record: RuntimeRecord) -> None:
        """Stage the event; `commit` writes it."""
        self._staged.append(_event_params(operation, record))

    def commit(self) -> list[int]:
        """Write the staged events (ids in commit order), notify, and commit, in
        one round trip; return the events' ids. Without staged events, just
        `COMMIT`."""
        staged, self._staged = self._staged, []
        if not staged:
            self._conn.commit()
            return []
        # The lock is held until the COMMIT queued behind the inserts: the
        # next writer gets its id only after this transaction is visible, so
        # readers following ids skip nothing. The COMMIT is a statement of the
        # pipeline, not `commit()`, which would sync (wait) on its own before
        # the pipeline's closing sync.
        with self._conn.pipeline():
            cursors = [self._conn.execute(_APPEND, params) for params in staged]
            self._conn.execute(b"COMMIT")
        return [_returned_id(cursor) for cursor in cursors]

    def discard(self) -> None:
        """Drop the staged events (the transaction is rolled back)."""
        self._staged = []


def insert_event(conn: Connection, operation: OperationEntry, record: RuntimeRecord) -> int:
    """Insert one event at once in `conn`'s open transaction; return its id.

    The writers' lock is then held until that transaction ends. Units of
    work do not do this (their events go with the `COMMIT`); it makes the
    state in between, an event drawn but not committed, for tools and tests.
    """
    with database_errors(f"append a runtime event of game {record.game_id}"):
        return _returned_id(conn.execute(_APPEND, _event_params(operation, record)))


def _event_params(operation: OperationEntry, record: RuntimeRecord) -> dict[str, Any]:
    return {"operation_id": operation.id, **record_params(record)}


def _returned_id(cursor: psycopg.Cursor[TupleRow]) -> int:
    row = cursor.fetchone()
    assert row is not None
    return int(row[0])


def event_from_row(row: dict[str, Any]) -> RuntimeEvent:
    """Map a joined event row to the domain event."""
    parent_op_kind = row["parent_op_kind"]
    return RuntimeEvent(
        id=row["id"],
        operation_id=row["operation_id"],
        op_kind=OpKind(row["op_kind"]),
        op_source=OpSource(row["op_source"]),
        outcome=Outcome(row["outcome"]),
        record=record_from_row(row),
        committed_at=row["committed_at"].astimezone(UTC),
        source_ref=row["source_ref"] or "",
        parent_op_kind=OpKind(parent_op_kind) if parent_op_kind is not None else None,
        parent_operation_id=row["parent_operation_id"] or 0,
    )


def events_after(conn: Connection, after_id: int, limit: int) -> list[RuntimeEvent]:
    """Up to `limit` events with id > `after_id`, in id order."""
    with database_errors("read runtime events"), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_SELECT_AFTER, (after_id, limit)).fetchall()
    return [event_from_row(row) for row in rows]


_SELECT_AFTER_WITH_EDGE: LiteralString = (
    "SELECT r.pruned_through, page.* FROM runtime_event_retention r LEFT JOIN LATERAL ("
    " SELECT e.id, e.operation_id, e.committed_at, o.op_kind, o.op_source, o.outcome,"
    " o.source_ref, o.parent_op_kind, o.parent_operation_id, e.game_id, e.status,"
    " e.current_container_id, e.current_image_ref, e.engine_endpoint, e.state_path,"
    " e.docker_network, e.started_at, e.stopped_at, e.removed_at, e.last_op_at, e.created_at,"
    " e.node_id, e.node_hostname"
    " FROM runtime_events e JOIN operation_log o ON o.id = e.operation_id"
    " WHERE e.id > %s ORDER BY e.id LIMIT %s"
    ") page ON true ORDER BY page.id"
)


def events_after_with_edge(
    conn: Connection, after_id: int, limit: int
) -> tuple[list[RuntimeEvent], int]:
    """`events_after` and `pruned_through`, read by one statement: one round trip.

    One statement reads one snapshot, and a pruning is one transaction, so
    if the edge read here has not passed `after_id`, no pruning the page
    could be missing events to had committed when the page was read: the
    page is whole, as when `pruned_through` is read after it.
    """
    with database_errors("read runtime events"), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_SELECT_AFTER_WITH_EDGE, (after_id, limit)).fetchall()
    edge = int(rows[0]["pruned_through"]) if rows else 0
    return [event_from_row(row) for row in rows if row["id"] is not None], edge


def newest_event_id(conn: Connection) -> int:
    """The highest event id ever drawn (0 before the first event).

    It may belong to an event not committed yet, or rolled back; it bounds
    every cursor the feed can have issued, which is what `check_cursor` needs.
    """
    with database_errors("read the newest runtime event id"):
        row = conn.execute(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM runtime_events_id_seq"
        ).fetchone()
    return int(row[0]) if row else 0


def pruned_through(conn: Connection) -> int:
    """The id through which retention has deleted every event (0 before any pruning)."""
    with database_errors("read the event retention"):
        row = conn.execute("SELECT pruned_through FROM runtime_event_retention").fetchone()
    return int(row[0]) if row else 0


def committed_position(conn: Connection, lock_timeout: float) -> int:
    """A start position for the feed: every event at or below it is committed (or
    will never be), and every event committed later has a higher id.

    The sequence's `last_value` is not that: it can be the id of an event
    drawn under the writer's lock and not yet committed, which a feed starting
    there would never dispatch. Taking the writers' lock shared waits for that
    writer to commit or roll back and keeps any other from drawing an id; the
    next statement (a new READ COMMITTED snapshot, taken after the lock was
    granted) then sees every event that will ever have an id this low. Ids
    drawn later come after the lock is released, so they are higher. The
    connection must be idle and READ COMMITTED; `lock_timeout` (seconds)
    bounds the wait for a stuck writer.
    """
    with database_errors("read the event feed's start position"), conn.transaction():
        conn.execute(
            "SELECT set_config('lock_timeout', %s, true)",
            (f"{max(1, round(lock_timeout * 1000))}ms",),
        )
        conn.execute(_LOCK_SHARED)
        row = conn.execute(
            "SELECT greatest(coalesce(max(id), 0),"
            " (SELECT pruned_through FROM runtime_event_retention)) FROM runtime_events"
        ).fetchone()
    return int(row[0]) if row else 0


def check_cursor(conn: Connection, cursor: int) -> None:
    """Raise `CursorExpired` below retention, `InvalidRequest` past the newest id.

    The edge: a cursor equal to `pruned_through` is still good (the events
    after it are all kept); one below it is expired.
    """
    through = pruned_through(conn)
    if cursor < through:
        raise CursorExpired(
            f"cursor {cursor} is older than the event retention (events up to "
            f"{through} were pruned); resync with a snapshot"
        )
    if cursor > newest_event_id(conn):
        raise InvalidRequest(f"cursor {cursor} was never issued", metadata={"field": "since"})


def read_snapshot(conn: Connection) -> tuple[list[RuntimeRecord], int]:
    """Every record and the newest event id, from one REPEATABLE READ snapshot."""
    with database_errors("read a snapshot"):
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


def prune_events(conn: Connection, cutoff: datetime, through_at_most: int) -> int:
    """Delete the events committed before `cutoff`, never past id `through_at_most`;
    raise `pruned_through` to the last id deleted; return how many were deleted.

    One statement, so one transaction: the deletion and the new
    `pruned_through` become visible together, and a cursor inside the deleted
    range can never pass `check_cursor`. What is deleted is a prefix of ids
    (up to the newest event older than `cutoff`), so a clock stepping back
    cannot leave an old event behind below the edge. `greatest` keeps the
    edge from moving back when two replicas prune at once.
    """
    with database_errors("prune runtime events"):
        row = conn.execute(
            "WITH edge AS ("
            "  SELECT max(id) AS id FROM runtime_events"
            "  WHERE committed_at < %(cutoff)s AND id <= %(limit)s),"
            " gone AS ("
            "  DELETE FROM runtime_events WHERE id <= (SELECT id FROM edge) RETURNING id),"
            # Run to completion though nothing reads it (a data-modifying CTE).
            " moved AS ("
            "  UPDATE runtime_event_retention"
            "  SET pruned_through = greatest(pruned_through, (SELECT max(id) FROM gone))"
            "  WHERE EXISTS (SELECT 1 FROM gone))"
            " SELECT count(*) FROM gone",
            {"cutoff": cutoff, "limit": through_at_most},
        ).fetchone()
    return int(row[0]) if row else 0
