"""`UnitOfWork` over one pooled PostgreSQL connection, in as few round trips as it can.

A unit of work borrows one connection for its `with` block: the record store
and the operation log share that connection's transaction, so a record change
and its audit row commit together or not at all. Leaving the block without
`commit()` (or with an exception) rolls back; the connection always goes back
to the pool.

Round trips. Every pooled connection starts with the session's
`statement_timeout` (`pool.SESSION_STATEMENT_TIMEOUT`). A unit of work sends
`BEGIN` as its first round trip, with `SET LOCAL statement_timeout` in the
same message only when it wants a timeout the session does not have: longer
than the session's, or shorter by more than `pool.TIMEOUT_SLACK` (a statement
bounded at 9.6 s instead of 10 s changes nothing anyone can observe, and
every read under a 10 s client deadline would otherwise pay for a `SET`).
Its statements follow, then `COMMIT`, sent in one pipeline with the
unit's runtime events (`events.py`): the events and the commit cost one
round trip together. Nothing is sent on leaving a committed block. A
read (`PostgresUnitOfWorkFactory.read`) sends no `BEGIN`: its one statement
runs in autocommit, so a `GetRuntime` costs a single round trip.
psycopg prepares a statement once it has run a few times on a connection.

A broken connection (PostgreSQL restarted since it was pooled) is found by
the first statement sent on it. The unit of work then has the pool check
its idle connections (the restart broke them all) and repeats the step on a
fresh connection, once: the `BEGIN` of a write, or the whole of a read (a
read is idempotent). A failure after that is `ServiceUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from rtmanager.adapters.postgres.events import PostgresRuntimeEventLog
from rtmanager.adapters.postgres.job_marks import PostgresJobMarkStore
from rtmanager.adapters.postgres.operations import PostgresOperationLog
from rtmanager.adapters.postgres.pool import (
    SESSION_STATEMENT_TIMEOUT,
    Connection,
    Pool,
    connection_broken,
    database_errors,
    local_timeout_ms,
    timeout_ms,
    to_domain_error,
)
from rtmanager.adapters.postgres.records import PostgresRuntimeRecordStore
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.ports import (
    JobMarkStore,
    OperationLog,
    RuntimeEventLog,
    RuntimeRecordStore,
    UnitOfWork,
    UnitOfWorkFactory,
)

T = TypeVar("T")


class PostgresUnitOfWork:
    """One transaction on one pooled connection, used as a context manager.

    Raises `ServiceUnavailable` on entry when no connection can be borrowed
    within the pool timeout, and from any statement (or `commit()`) when
    PostgreSQL fails or the statement timeout expires. With `read_only`, the
    statements run one by one in autocommit (for single-statement reads) and
    there is nothing to commit.
    """

    records: RuntimeRecordStore
    operations: OperationLog
    events: RuntimeEventLog
    job_marks: JobMarkStore

    def __init__(
        self,
        pool: Pool,
        *,
        timeout: timedelta | None = None,
        session_timeout: timedelta = SESSION_STATEMENT_TIMEOUT,
        read_only: bool = False,
    ) -> None:
        self._pool = pool
        self._local_ms = local_timeout_ms(timeout, session_timeout)
        self._read_only = read_only
        self._conn: Connection | None = None
        self.connection_broke = False
        """Whether the connection turned out broken (set when the block ends)."""
        self.committed_event_ids: list[int] = []
        """The ids of the runtime events the last `commit()` wrote, in order."""

    def __enter__(self) -> Self:
        if self._conn is not None:
            raise RuntimeError("a unit of work cannot be entered twice")
        if self._read_only and self._local_ms is None:
            conn = self._borrow()
        else:
            conn = self._borrow_begun()
        self._conn = conn
        self.records = PostgresRuntimeRecordStore(conn)
        self.operations = PostgresOperationLog(conn)
        self.events = self._events = PostgresRuntimeEventLog(conn)
        self.job_marks = PostgresJobMarkStore(conn)
        return self

    def _borrow_begun(self) -> Connection:
        """A borrowed connection with the transaction open: on a fresh one, once,
        when the first turned out broken (nothing was done on it)."""
        for last in (False, True):
            conn = self._borrow()
            try:
                self._begin(conn)
            except psycopg.Error as error:
                broken = connection_broken(conn)
                self._release(conn)
                if last or not broken:
                    raise to_domain_error(error, "begin a transaction") from error
                self._pool.check()
            else:
                return conn
        raise AssertionError("the second attempt returns or raises")  # pragma: no cover

    def _borrow(self) -> Connection:
        with database_errors("borrow a PostgreSQL connection"):
            conn = self._pool.getconn()
        # Set client-side only: the connection is idle in the pool.
        conn.autocommit = True
        return conn

    def _begin(self, conn: Connection) -> None:
        """Open the transaction (and set its timeout) in one round trip."""
        begin = "BEGIN READ ONLY" if self._read_only else "BEGIN"
        if self._local_ms is not None:
            # Without parameters psycopg sends the simple protocol's one
            # message, which may hold several statements; the value is an int.
            begin += f"; SET LOCAL statement_timeout = {self._local_ms}"
        conn.execute(begin.encode())

    @property
    def connection(self) -> Connection:
        """The borrowed connection, for adapters that must join this transaction."""
        return self._require_conn()

    def commit(self) -> None:
        """Commit everything written in this unit of work so far.

        Statements after a commit run in a new transaction with the same
        timeout: psycopg opens it on the next statement when the session's
        timeout is the one wanted; otherwise it is opened (and its timeout
        set) here, in one round trip.
        """
        conn = self._require_conn()
        if self._read_only:
            return
        with database_errors("commit"):
            self.committed_event_ids = self._events.commit()
        self._reopen(conn)

    def rollback(self) -> None:
        """Discard everything written since the last commit."""
        conn = self._require_conn()
        self._events.discard()
        with database_errors("roll back"):
            conn.rollback()
        self._reopen(conn)

    def _reopen(self, conn: Connection) -> None:
        if self._read_only:
            return
        if self._local_ms is None:
            conn.autocommit = False
            return
        with database_errors("begin a transaction"):
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
            del self.records, self.operations, self.events, self._events, self.job_marks
            self.connection_broke = connection_broken(conn)
            self._release(conn)

    def _release(self, conn: Connection) -> None:
        try:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
            if not conn.closed:
                conn.autocommit = False
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
    explicit `timeout`; None leaves them at the session's. `session_timeout`
    is the `statement_timeout` the pool's connections start with.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        default_timeout: timedelta | None = None,
        session_timeout: timedelta = SESSION_STATEMENT_TIMEOUT,
    ) -> None:
        if default_timeout is not None:
            timeout_ms(default_timeout)
        timeout_ms(session_timeout)
        self._pool = pool
        self._default_timeout = default_timeout
        self._session_timeout = session_timeout

    def __call__(self, *, timeout: timedelta | None = None) -> PostgresUnitOfWork:
        """Return a new (not yet entered) unit of work."""
        return self._unit(timeout, read_only=False)

    def read(self, work: Callable[[UnitOfWork], T], *, timeout: timedelta | None = None) -> T:
        """Run `work`, a read of one statement, in autocommit; retried once on a
        fresh connection when the connection it got was broken."""
        unit = self._unit(timeout, read_only=True)
        try:
            with unit:
                return work(unit)
        except ServiceUnavailable:
            if not unit.connection_broke:
                raise
        self._pool.check()
        with self._unit(timeout, read_only=True) as again:
            return work(again)

    def _unit(self, timeout: timedelta | None, *, read_only: bool) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(
            self._pool,
            timeout=timeout if timeout is not None else self._default_timeout,
            session_timeout=self._session_timeout,
            read_only=read_only,
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
