"""`OperationLog` on the append-only `operation_log` table."""

from __future__ import annotations

import builtins
from dataclasses import replace
from datetime import UTC
from enum import StrEnum
from typing import Any, LiteralString

from psycopg import sql
from psycopg.rows import dict_row

from rtmanager.adapters.postgres.paging import (
    check_page_size,
    check_utc,
    decode_operations_token,
    encode_operations_token,
)
from rtmanager.adapters.postgres.pool import Connection, database_errors
from rtmanager.domain.errors import InternalError, InvalidRequest
from rtmanager.domain.operation import (
    InvalidOperationEntry,
    OperationEntry,
    OpKind,
    OpSource,
    Outcome,
)
from rtmanager.ports import OperationFilter, Page

_SELECT: LiteralString = (
    "SELECT id, game_id, op_kind, op_source, source_ref, image_ref, container_id, outcome,"
    " error_code, error_message, started_at, finished_at, parent_op_kind,"
    " parent_operation_id FROM operation_log"
)
# The id is the sequence's next value (the column's default) ...
_INSERT: LiteralString = (
    "INSERT INTO operation_log (game_id, op_kind, op_source, source_ref, image_ref,"
    " container_id, outcome, error_code, error_message, started_at, finished_at,"
    " parent_op_kind, parent_operation_id)"
    " VALUES (%(game_id)s, %(op_kind)s, %(op_source)s, %(source_ref)s, %(image_ref)s,"
    " %(container_id)s, %(outcome)s, %(error_code)s, %(error_message)s, %(started_at)s,"
    " %(finished_at)s, %(parent_op_kind)s, %(parent_operation_id)s) RETURNING id"
)
# ... or the one `reserve_id` drew from the same sequence earlier.
_INSERT_RESERVED: LiteralString = (
    "INSERT INTO operation_log (id, game_id, op_kind, op_source, source_ref, image_ref,"
    " container_id, outcome, error_code, error_message, started_at, finished_at,"
    " parent_op_kind, parent_operation_id)"
    " VALUES (%(id)s, %(game_id)s, %(op_kind)s, %(op_source)s, %(source_ref)s, %(image_ref)s,"
    " %(container_id)s, %(outcome)s, %(error_code)s, %(error_message)s, %(started_at)s,"
    " %(finished_at)s, %(parent_op_kind)s, %(parent_operation_id)s) RETURNING id"
)
_RESERVE: LiteralString = "SELECT nextval(pg_get_serial_sequence('operation_log', 'id'))"


def _null_if_empty(value: str) -> str | None:
    return value if value else None


def entry_from_row(row: dict[str, Any]) -> OperationEntry:
    """Map an `operation_log` row (a `dict_row`) to the domain entry."""
    finished_at = row["finished_at"]
    parent_op_kind = row["parent_op_kind"]
    return OperationEntry(
        id=row["id"],
        game_id=row["game_id"],
        op_kind=OpKind(row["op_kind"]),
        op_source=OpSource(row["op_source"]),
        outcome=Outcome(row["outcome"]),
        source_ref=row["source_ref"] or "",
        image_ref=row["image_ref"] or "",
        container_id=row["container_id"] or "",
        error_code=row["error_code"] or "",
        error_message=row["error_message"] or "",
        started_at=row["started_at"].astimezone(UTC),
        finished_at=finished_at.astimezone(UTC) if finished_at is not None else None,
        parent_op_kind=OpKind(parent_op_kind) if parent_op_kind is not None else None,
        parent_operation_id=row["parent_operation_id"] or 0,
    )


def _check_member(name: str, value: object, vocabulary: type[StrEnum]) -> str:
    if value not in vocabulary.__members__.values():
        raise InvalidRequest(f"{name} {value!r} is unsupported", metadata={"field": name})
    return str(value)


class PostgresOperationLog:
    """The operation log in PostgreSQL, inside the transaction of one connection.

    Append-only: there is no update or delete. The log never commits; the
    unit of work that owns the connection does, so an entry commits together
    with the record change it describes. Every method may raise
    `ServiceUnavailable` when PostgreSQL is unreachable or times out.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def append(self, entry: OperationEntry, *, reserved_id: int = 0) -> OperationEntry:
        """Append a validated entry and return it with its id.

        The id is the sequence's next value, or `reserved_id`: one that
        `reserve_id` drew for this row. Raises `InvalidOperationEntry`
        (before any statement) when the entry breaks a rule or already
        carries an id, or `reserved_id` is negative; appending twice with
        one reserved id fails on the primary key.
        """
        entry.validate()
        if entry.id != 0:
            raise InvalidOperationEntry(f"entry already has id {entry.id}; append it only once")
        if isinstance(reserved_id, bool) or reserved_id < 0:
            raise InvalidOperationEntry(f"reserved id {reserved_id!r} was never drawn")
        params = {
            "id": reserved_id,
            "game_id": entry.game_id,
            "op_kind": str(entry.op_kind),
            "op_source": str(entry.op_source),
            "source_ref": _null_if_empty(entry.source_ref),
            "image_ref": _null_if_empty(entry.image_ref),
            "container_id": _null_if_empty(entry.container_id),
            "outcome": str(entry.outcome),
            "error_code": _null_if_empty(entry.error_code),
            "error_message": _null_if_empty(entry.error_message),
            "started_at": entry.started_at,
            "finished_at": entry.finished_at,
            "parent_op_kind": str(entry.parent_op_kind) if entry.parent_op_kind else None,
            "parent_operation_id": entry.parent_operation_id or None,
        }
        with database_errors(f"append {entry.op_kind} operation of game {entry.game_id}"):
            row = self._conn.execute(
                _INSERT_RESERVED if reserved_id else _INSERT, params
            ).fetchone()
        if row is None:  # INSERT ... RETURNING always returns the row.
            raise InternalError("operation log insert returned no id")
        return replace(entry, id=int(row[0]))

    def reserve_id(self) -> int:
        """Draw the id of a row to be appended later (`append(..., reserved_id=...)`).

        `nextval` is not transactional: the id is never handed out again,
        whether or not this unit of work commits, and one never appended is
        a gap like a rolled-back row's. So it needs no transaction, and
        drawing again after a failure is harmless.
        """
        with database_errors("reserve an operation id"):
            row = self._conn.execute(_RESERVE).fetchone()
        if row is None:
            raise InternalError("nextval returned no row")
        return int(row[0])

    def list(
        self, filters: OperationFilter, *, page_size: int = 100, page_token: str = ""
    ) -> Page[OperationEntry]:
        """Return entries newest first (by id), filtered, one page at a time.

        `since` bounds `started_at` inclusively, `until` exclusively. Raises
        `InvalidRequest` for a page size outside 1..1000, a malformed page
        token, an empty game id, an unknown vocabulary value or a time bound
        that is not aware UTC.
        """
        check_page_size(page_size)
        before = decode_operations_token(page_token)
        conditions: builtins.list[sql.Composable] = []
        params: builtins.list[object] = []

        def where(condition: LiteralString, value: object) -> None:
            conditions.append(sql.SQL(condition))
            params.append(value)

        if filters.game_id is not None:
            if not filters.game_id.strip():
                raise InvalidRequest(
                    "game_id filter must not be empty (use None for any game)",
                    metadata={"field": "game_id"},
                )
            where("game_id = %s", filters.game_id)
        if filters.op_kind is not None:
            where("op_kind = %s", _check_member("op_kind", filters.op_kind, OpKind))
        if filters.op_source is not None:
            where("op_source = %s", _check_member("op_source", filters.op_source, OpSource))
        if filters.outcome is not None:
            where("outcome = %s", _check_member("outcome", filters.outcome, Outcome))
        if filters.since is not None:
            where("started_at >= %s", check_utc("since", filters.since))
        if filters.until is not None:
            where("started_at < %s", check_utc("until", filters.until))
        if before is not None:
            where("id < %s", before)
        clause = (
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        )
        query = sql.SQL("{select}{where} ORDER BY id DESC LIMIT %s").format(
            select=sql.SQL(_SELECT), where=clause
        )
        params.append(page_size + 1)
        with (
            database_errors("list operations"),
            self._conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(query, params)
            rows = cur.fetchall()
        entries = [entry_from_row(row) for row in rows[:page_size]]
        next_token = encode_operations_token(entries[-1].id) if len(rows) > page_size else ""
        return Page(items=entries, next_page_token=next_token)
