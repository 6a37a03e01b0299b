"""`RuntimeRecordStore` on the `runtime_records` table."""

from __future__ import annotations

import builtins
import enum
import functools
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.adapt import AdaptersMap
from psycopg.types.numeric import Int8BinaryLoader

from rtmanager.adapters.postgres.paging import (
    check_page_size,
    check_utc,
    decode_records_token,
    encode_records_token,
)
from rtmanager.adapters.postgres.pool import Connection, database_errors
from rtmanager.domain.errors import ConcurrentModification, InvalidRequest, NotFound
from rtmanager.domain.runtime import (
    InvalidRuntimeRecord,
    RuntimeRecord,
    RuntimeStatus,
    transition,
)
from rtmanager.domain.timeutil import require_utc
from rtmanager.ports import Page, StatusChange

# The timestamps are read as they are stored. In binary a timestamptz is one
# integer, microseconds since 2000-01-01 UTC, and the event loop's reads load
# it as that integer (`micros_timestamps`): loaded and hashed as datetimes,
# a page of 100 records cost about 100 us more of the server's CPU. Computing
# epoch microseconds in SQL instead (`EXTRACT(EPOCH FROM ...)`, a numeric)
# cost PostgreSQL about 140 us more per such page. `record_from_columns`
# memoises by row, so most rows of a page never become datetimes at all.
_COLUMNS: LiteralString = (
    "game_id, status, current_container_id, current_image_ref, engine_endpoint,"
    " state_path, docker_network, started_at, stopped_at, removed_at, last_op_at,"
    " created_at, node_id, node_hostname"
)
_SELECT: LiteralString = "SELECT " + _COLUMNS + " FROM runtime_records"  # noqa: S608 - constants
_COLUMN_NAMES = (
    "game_id",
    "status",
    "current_container_id",
    "current_image_ref",
    "engine_endpoint",
    "state_path",
    "docker_network",
    "started_at",
    "stopped_at",
    "removed_at",
    "last_op_at",
    "created_at",
    "node_id",
    "node_hostname",
)
_UPSERT: LiteralString = (
    "INSERT INTO runtime_records (game_id, status, current_container_id, current_image_ref,"
    " engine_endpoint, state_path, docker_network, started_at, stopped_at, removed_at,"
    " last_op_at, created_at, node_id, node_hostname) VALUES "
    "(%(game_id)s, %(status)s, %(current_container_id)s, %(current_image_ref)s,"
    " %(engine_endpoint)s, %(state_path)s, %(docker_network)s, %(started_at)s,"
    " %(stopped_at)s, %(removed_at)s, %(last_op_at)s, %(created_at)s, %(node_id)s,"
    " %(node_hostname)s)"
    " ON CONFLICT (game_id) DO UPDATE SET"
    " status = EXCLUDED.status,"
    " current_container_id = EXCLUDED.current_container_id,"
    " current_image_ref = EXCLUDED.current_image_ref,"
    " engine_endpoint = EXCLUDED.engine_endpoint,"
    " state_path = EXCLUDED.state_path,"
    " docker_network = EXCLUDED.docker_network,"
    " started_at = EXCLUDED.started_at,"
    " stopped_at = EXCLUDED.stopped_at,"
    " removed_at = EXCLUDED.removed_at,"
    " last_op_at = EXCLUDED.last_op_at,"
    " created_at = EXCLUDED.created_at,"
    " node_id = EXCLUDED.node_id,"
    " node_hostname = EXCLUDED.node_hostname"
)


# `list` by (status filtered, after a page token): composed once, not per call.
_LIST_QUERIES: dict[tuple[bool, bool], LiteralString] = {
    (False, False): _SELECT + " ORDER BY game_id LIMIT %s",
    (True, False): _SELECT + " WHERE status = %s ORDER BY game_id LIMIT %s",
    (False, True): _SELECT + " WHERE game_id > %s ORDER BY game_id LIMIT %s",
    (True, True): _SELECT + " WHERE status = %s AND game_id > %s ORDER BY game_id LIMIT %s",
}


def _null_if_empty(value: str) -> str | None:
    return value if value else None


_STATUSES = {str(status): status for status in RuntimeStatus}


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def micros_timestamps() -> AdaptersMap:
    """Adapters that load a binary timestamptz as its integer (microseconds
    since 2000-01-01 UTC), for connections that read only records
    (`record_from_columns` takes either form)."""
    adapters = AdaptersMap(psycopg.adapters)
    adapters.register_loader("timestamptz", Int8BinaryLoader)
    return adapters


def _at(value: datetime | int) -> datetime:
    if isinstance(value, int):
        return _PG_EPOCH + timedelta(microseconds=value)
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _at_or_none(value: datetime | int | None) -> datetime | None:
    return None if value is None else _at(value)


@functools.lru_cache(maxsize=4096)
def record_from_columns(row: tuple[Any, ...]) -> RuntimeRecord:
    """Map a tuple row of `_COLUMNS`, in that order, to the domain record.

    The hot path of every read. Records are immutable values and the row is
    the whole record, so the mapping is memoised by row: a row read again
    unchanged (most rows of a `ListRuntimes` page) costs one dictionary
    lookup instead of building the record. Timestamps may come as aware
    datetimes or as integers (see `micros_timestamps`); either becomes a UTC
    datetime here.
    """
    (
        game_id,
        status,
        container_id,
        image_ref,
        endpoint,
        state_path,
        network,
        started_at,
        stopped_at,
        removed_at,
        last_op_at,
        created_at,
        node_id,
        node_hostname,
    ) = row
    return RuntimeRecord(
        game_id=game_id,
        status=_STATUSES[status],
        current_container_id=container_id or "",
        current_image_ref=image_ref or "",
        engine_endpoint=endpoint,
        state_path=state_path,
        docker_network=network,
        started_at=_at_or_none(started_at),
        stopped_at=_at_or_none(stopped_at),
        removed_at=_at_or_none(removed_at),
        last_op_at=_at(last_op_at),
        created_at=_at(created_at),
        node_id=node_id or "",
        node_hostname=node_hostname or "",
    )


def record_from_row(row: dict[str, Any]) -> RuntimeRecord:
    """Map a row holding the `runtime_records` columns by name (a `dict_row`)."""
    return record_from_columns(tuple(row[name] for name in _COLUMN_NAMES))


def record_params(record: RuntimeRecord) -> dict[str, Any]:
    """The query parameters of a record's columns (empty text as NULL)."""
    return {
        "game_id": record.game_id,
        "status": str(record.status),
        "current_container_id": _null_if_empty(record.current_container_id),
        "current_image_ref": _null_if_empty(record.current_image_ref),
        "engine_endpoint": record.engine_endpoint,
        "state_path": record.state_path,
        "docker_network": record.docker_network,
        "started_at": record.started_at,
        "stopped_at": record.stopped_at,
        "removed_at": record.removed_at,
        "last_op_at": record.last_op_at,
        "created_at": record.created_at,
        "node_id": _null_if_empty(record.node_id),
        "node_hostname": _null_if_empty(record.node_hostname),
    }


GET_QUERY: LiteralString = _SELECT + " WHERE game_id = %s"
"""The read of one record by game id (one parameter: the game id)."""

LIST_ACTION = "list runtime records"


def get_action(game_id: str) -> str:
    """What a failed read of one record was doing, for its error message."""
    return f"read runtime record {game_id}"


def record_of_get(game_id: str, row: tuple[Any, ...] | None) -> RuntimeRecord:
    """The record of the row `GET_QUERY` returned; `NotFound` when it returned none."""
    if row is None:
        raise NotFound(f"no runtime record for game {game_id}", metadata={"game_id": game_id})
    return record_from_columns(row)


def list_query(
    *, status: RuntimeStatus | None, page_size: int, page_token: str
) -> tuple[LiteralString, list[object]]:
    """The statement and parameters of one page of records (see `page_of_rows`).

    Raises `InvalidRequest` for a page size outside 1..1000, a malformed
    page token or an unknown status, before anything is sent.
    """
    check_page_size(page_size)
    after = decode_records_token(page_token)
    params: list[object] = []
    if status is not None:
        if status not in RuntimeStatus.__members__.values():
            raise InvalidRequest(f"status {status!r} is unsupported", metadata={"field": "status"})
        params.append(str(status))
    if after is not None:
        params.append(after)
    # One row more than the page: whether it exists says if a next page does.
    params.append(page_size + 1)
    return _LIST_QUERIES[(status is not None, after is not None)], params


def page_of_rows(rows: list[tuple[Any, ...]], page_size: int) -> Page[RuntimeRecord]:
    """The page of records the rows of a `list_query` statement hold."""
    records = [record_from_columns(row) for row in rows[:page_size]]
    next_token = encode_records_token(records[-1].game_id) if len(rows) > page_size else ""
    return Page(items=records, next_page_token=next_token)


def _describe(status: str, container_id: str | None) -> str:
    return f"status {status} with container {container_id or '(none)'}"


class _ContainerGuard(enum.Enum):
    """What a status update requires of the stored container id."""

    NONE = ""
    EQUALS = " AND current_container_id = %(expected_container_id)s"
    IS_NULL = " AND current_container_id IS NULL"


@functools.cache
def _status_update(columns: tuple[LiteralString, ...], guard: _ContainerGuard) -> bytes:
    """The `UPDATE ... RETURNING` of a status change that sets `columns`.

    Composed once per shape, not on every change: there are a handful (the
    target status decides the columns), and composing one costs about 60 µs.
    """
    query = sql.SQL(
        "UPDATE runtime_records SET {sets} WHERE game_id = %(game_id)s"
        " AND status = %(expected_from)s{guard} RETURNING {columns}"
    ).format(
        sets=sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(column), sql.Placeholder(f"set_{column}"))
            for column in columns
        ),
        guard=sql.SQL(guard.value),
        columns=sql.SQL(_COLUMNS),
    )
    return query.as_bytes(None)


class PostgresRuntimeRecordStore:
    """Runtime records in PostgreSQL, inside the transaction of one connection.

    The store never commits or rolls back: the unit of work that owns the
    connection does. Every method may raise `ServiceUnavailable` when
    PostgreSQL is unreachable or a statement times out.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _fetch_one(
        self, action: str, query: LiteralString | bytes | sql.Composed, params: Any
    ) -> tuple[Any, ...] | None:
        with database_errors(action), self._conn.cursor(binary=True) as cur:
            return cur.execute(query, params).fetchone()

    def _fetch_all(
        self, action: str, query: LiteralString | bytes | sql.Composed, params: Any
    ) -> builtins.list[tuple[Any, ...]]:
        # Binary results: a page of records parses in about 3/4 of the time.
        with database_errors(action), self._conn.cursor(binary=True) as cur:
            return cur.execute(query, params).fetchall()

    def get(self, game_id: str) -> RuntimeRecord:
        """Return the game's record; raise `NotFound` when there is none."""
        row = self._fetch_one(get_action(game_id), GET_QUERY, (game_id,))
        return record_of_get(game_id, row)

    def get_for_update(self, game_id: str) -> RuntimeRecord | None:
        """Return the game's record locked (`FOR UPDATE`) until the transaction ends, or None."""
        row = self._fetch_one(
            f"lock runtime record {game_id}",
            _SELECT + " WHERE game_id = %s FOR UPDATE",
            (game_id,),
        )
        return record_from_columns(row) if row is not None else None

    def upsert(self, record: RuntimeRecord) -> None:
        """Insert the record, or overwrite every column of the existing row.

        Raises `InvalidRuntimeRecord` (before any statement) when the record
        breaks a domain rule.
        """
        record.validate()
        with database_errors(f"upsert runtime record {record.game_id}"):
            self._conn.execute(_UPSERT, record_params(record))

    def update_status(self, change: StatusChange) -> RuntimeRecord:
        """Apply a CAS status transition with one `UPDATE ... RETURNING`.

        Raises `InvalidTransition` for a forbidden pair without touching the
        database, `NotFound` when there is no record, and
        `ConcurrentModification` when the stored status (or container id,
        when `expected_container_id` is given) differs from the expected one.
        Timestamps are derived as `RuntimeRecord.with_status` derives them.
        A result that would break a record rule (e.g. `now` before the stored
        `started_at`, or running without a container) is refused by the
        table's CHECK constraints and raised as `InternalError`; the
        transaction is then aborted.
        """
        transition(change.expected_from, change.to)
        require_utc("now", change.now, InvalidRuntimeRecord)
        if change.to is RuntimeStatus.RUNNING and change.container_id == "":
            raise InvalidRuntimeRecord("a running record needs a container id; got ''")
        now = change.now
        assignments: dict[LiteralString, object] = {"status": str(change.to), "last_op_at": now}
        if change.to is RuntimeStatus.RUNNING:
            assignments["started_at"] = now
            assignments["stopped_at"] = None
        elif change.to is RuntimeStatus.STOPPED:
            assignments["stopped_at"] = now
        else:
            assignments["removed_at"] = now
        if change.container_id is not None:
            assignments["current_container_id"] = _null_if_empty(change.container_id)

        params: dict[str, object] = {
            f"set_{column}": value for column, value in assignments.items()
        }
        params["game_id"] = change.game_id
        params["expected_from"] = str(change.expected_from)
        container_guard = _ContainerGuard.NONE
        if change.expected_container_id is not None:
            if change.expected_container_id:
                container_guard = _ContainerGuard.EQUALS
                params["expected_container_id"] = change.expected_container_id
            else:
                container_guard = _ContainerGuard.IS_NULL
        query = _status_update(tuple(assignments), container_guard)
        action = f"change runtime status of game {change.game_id} to {change.to}"
        row = self._fetch_one(action, query, params)
        if row is not None:
            return record_from_columns(row)

        current = self._fetch_one(
            action,
            "SELECT status, current_container_id FROM runtime_records WHERE game_id = %s",
            (change.game_id,),
        )
        if current is None:
            raise NotFound(
                f"no runtime record for game {change.game_id}",
                metadata={"game_id": change.game_id},
            )
        expected_container = change.expected_container_id
        expected = (
            f"status {change.expected_from}"
            if expected_container is None
            else _describe(change.expected_from, expected_container)
        )
        raise ConcurrentModification(
            f"runtime record of game {change.game_id} changed concurrently: expected "
            f"{expected}, found {_describe(current[0], current[1])}",
            metadata={
                "game_id": change.game_id,
                "expected_status": str(change.expected_from),
                "actual_status": current[0],
            },
        )

    def list_by_status(self, status: RuntimeStatus) -> builtins.list[RuntimeRecord]:
        """Return every record of one status, ordered by game id."""
        rows = self._fetch_all(
            f"list {status} runtime records",
            _SELECT + " WHERE status = %s ORDER BY game_id",
            (str(status),),
        )
        return [record_from_columns(row) for row in rows]

    def list_stopped_before(self, cutoff: datetime, limit: int) -> builtins.list[RuntimeRecord]:
        """Return up to `limit` stopped records with `last_op_at` before `cutoff`.

        Ordered by `last_op_at` (oldest first), then game id. Raises
        `InvalidRequest` when `limit` is below 1 or `cutoff` is not aware UTC.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest(f"limit {limit!r} is invalid: expected at least 1")
        check_utc("cutoff", cutoff)
        rows = self._fetch_all(
            "list stopped runtime records",
            _SELECT + " WHERE status = 'stopped' AND last_op_at < %s"
            " ORDER BY last_op_at, game_id LIMIT %s",
            (cutoff, limit),
        )
        return [record_from_columns(row) for row in rows]

    def list(
        self, *, status: RuntimeStatus | None = None, page_size: int = 100, page_token: str = ""
    ) -> Page[RuntimeRecord]:
        """Return one page of records ordered by game id, optionally of one status.

        Raises `InvalidRequest` for a page size outside 1..1000, a malformed
        page token or an unknown status.
        """
        query, params = list_query(status=status, page_size=page_size, page_token=page_token)
        rows = self._fetch_all(LIST_ACTION, query, params)
        return page_of_rows(rows, page_size)
