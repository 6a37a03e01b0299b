"""`UnitOfWork` over one pooled PostgreSQL connection.

A unit of work borrows one connection for its `with` block: the record store
and the operation log share that connection's transaction, so a record change
and its audit row commit together or not at all. Leaving the block without
`commit()` (or with an exception) rolls back; the connection always goes back
to the pool.

`timeout` bounds every statement through `SET LOCAL statement_timeout` (lock
waits included). `SET LOCAL` ends with the transaction, so `commit()` sets it
again for the next transaction when the block goes on writing.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Self

import psycopg
from psycopg.pq import TransactionStatus

from rtmanager.adapters.postgres.events import PostgresRuntimeEventLog
from rtmanager.adapters.postgres.job_marks import PostgresJobMarkStore
from rtmanager.adapters.postgres.operations import PostgresOperationLog
from rtmanager.adapters.postgres.pool import Connection, Pool, database_errors
from rtmanager.adapters.postgres.records import PostgresRuntimeRecordStore
from rtmanager.domain.errors import RuntimeManagerError
from rtmanager.ports import (
    JobMarkStore,
    OperationLog,
    RuntimeEventLog,
    RuntimeRecordStore,
    UnitOfWorkFactory,
)


def _timeout_ms(timeout: timedelta) -> int:
    if timeout <= timedelta(0):
        raise ValueError(f"unit of work timeout must be positive, got {timeout}")
    # At least 1 ms: 0 would disable the timeout altogether.
    return max(1, round(timeout.total_seconds() * 1000))


class PostgresUnitOfWork:
    """One transaction on one pooled connection, used as a context manager.

    Raises `ServiceUnavailable` on entry when no connection can be borrowed
    within the pool timeout, and from any statement (or `commit()`) when
    PostgreSQL fails or the statement timeout expires.
    """

    records: RuntimeRecordStore
    operations: OperationLog
    events: RuntimeEventLog
    job_marks: JobMarkStore

    def __init__(self, pool: Pool, *, timeout: timedelta | None = None) -> None:
        self._pool = pool
        self._timeout_ms = _timeout_ms(timeout) if timeout is not None else None
        self._conn: Connection | None = None

    def __enter__(self) -> Self:
        if self._conn is not None:
            raise RuntimeError("a unit of work cannot be entered twice")
        with database_errors("borrow a PostgreSQL connection"):
            conn = self._pool.getconn()
        try:
            self._begin(conn)
        except BaseException:
            self._release(conn)
            raise
        self._conn = conn
        self.records = PostgresRuntimeRecordStore(conn)
        self.operations = PostgresOperationLog(conn)
        self.events = PostgresRuntimeEventLog(conn)
        self.job_marks = PostgresJobMarkStore(conn)
        return self

    def _begin(self, conn: Connection) -> None:
        # With autocommit off this first statement opens the transaction.
        if self._timeout_ms is not None:
            with database_errors("set the statement timeout"):
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, true)", (str(self._timeout_ms),)
                )

    @property
    def connection(self) -> Connection:
        """The borrowed connection, for adapters that must join this transaction."""
        return self._require_conn()

    def commit(self) -> None:
        """Commit everything written in this unit of work so far."""
        conn = self._require_conn()
        with database_errors("commit"):
            conn.commit()
        if self._timeout_ms is not None:
            # The commit stands whatever happens here; a broken connection
            # shows up on the next statement (and the pool discards it).
            with suppress(RuntimeManagerError):
                self._begin(conn)

    def rollback(self) -> None:
        """Discard everything written since the last commit."""
        conn = self._require_conn()
        with database_errors("roll back"):
            conn.rollback()
        self._begin(conn)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # The connection goes back to the pool: the stores must not reach it.
            del self.records, self.operations, self.events
            self._release(conn)

    def _release(self, conn: Connection) -> None:
        try:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
        except psycopg.Error:
            pass  # The connection is broken; the pool closes and replaces it.
        finally:
            self._pool.putconn(conn)

    def _require_conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the unit of work is not active (use it in a `with` block)")
        return self._conn


class PostgresUnitOfWorkFactory:
    """Makes units of work on a pool (`UnitOfWorkFactory`).

    `default_timeout` bounds the statements of units of work made without an
    explicit `timeout`; None leaves them unbounded.
    """

    def __init__(self, pool: Pool, *, default_timeout: timedelta | None = None) -> None:
        if default_timeout is not None:
            _timeout_ms(default_timeout)
        self._pool = pool
        self._default_timeout = default_timeout

    def __call__(self, *, timeout: timedelta | None = None) -> PostgresUnitOfWork:
        """Return a new (not yet entered) unit of work."""
        return PostgresUnitOfWork(
            self._pool, timeout=timeout if timeout is not None else self._default_timeout
        )


if TYPE_CHECKING:
    # mypy proves the adapters satisfy the ports structurally.
    def _conforms(
        pool: Pool, conn: Connection
    ) -> tuple[UnitOfWorkFactory, RuntimeRecordStore, OperationLog]:
        return (
            PostgresUnitOfWorkFactory(pool),
            PostgresRuntimeRecordStore(conn),
            PostgresOperationLog(conn),
        )
