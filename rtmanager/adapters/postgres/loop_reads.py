"""`RecordReader` on psycopg's asyncio API: the reads served on the server's event loop.

`GetRuntime` and `ListRuntimes` run as coroutines on the gRPC server's loop
(see `rtmanager.api.server`). Their statement goes to PostgreSQL through an
`AsyncConnectionPool` of their own, opened and closed on that loop, so a
read waits for the database without holding a thread and without handing
the call to the thread pool and back.

The reads cost what the synchronous ones do (see `unit_of_work`), with the
same statements and row mapping (`records`): one round trip in autocommit,
the session's `statement_timeout` set once per connection by its startup
options. A caller's deadline shorter than that (by more than
`pool.TIMEOUT_SLACK`) is kept here, on the loop, and still costs one round
trip: when it passes, the read's task is cancelled and psycopg sends
PostgreSQL a cancel request and waits for the statement to end, so the
connection goes back to the pool idle. Only a timeout longer than the
session's needs the server's consent: a `BEGIN; SET LOCAL
statement_timeout` (and a `ROLLBACK`). Borrowing does not probe: a read
whose connection turns out broken has the pool check its idle connections
and runs once more on a fresh one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from rtmanager.adapters.postgres.pool import (
    SESSION_STATEMENT_TIMEOUT,
    local_timeout_ms,
    pool_timeout_seconds,
    pooled_connection_kwargs,
    statement_timed_out,
    timeout_ms,
    to_domain_error,
)
from rtmanager.adapters.postgres.records import (
    GET_QUERY,
    LIST_ACTION,
    get_action,
    list_query,
    micros_timestamps,
    page_of_rows,
    record_of_get,
)
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import Page, RecordReader

AsyncConnection = psycopg.AsyncConnection[TupleRow]
T = TypeVar("T")
Rows = Callable[[AsyncConnection], Awaitable[T]]


class PostgresRecordReader:
    """Runtime-record reads over an asyncio connection pool (`RecordReader`).

    Built anywhere; `open()` and `close()` run on the event loop that will
    await the reads (the pool's workers are tasks of that loop). `open`
    never waits for the database: a read while it is down fails with
    `ServiceUnavailable` after `timeout` (the wait for a connection).
    `configure`, if given, is awaited on each new connection before its
    first use (tests trace the connection's messages with it).
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        max_size: int,
        timeout: float | timedelta,
        session_timeout: timedelta = SESSION_STATEMENT_TIMEOUT,
        name: str = "rtmanager-postgres-reads",
        configure: Callable[[AsyncConnection], Awaitable[None]] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"read pool size must be at least 1, got {max_size}")
        self._session_ms = timeout_ms(session_timeout)
        self._dsn = dsn
        self._max_size = max_size
        self._timeout = pool_timeout_seconds(timeout)
        self._session_timeout = session_timeout
        self._kwargs = pooled_connection_kwargs(
            schema,
            statement_timeout=session_timeout,
            connect_timeout=self._timeout,
            name=name,
            autocommit=True,
        )
        # These connections run only the record reads below.
        self._kwargs["context"] = micros_timestamps()
        self._name = name
        self._configure = configure
        self._pool: AsyncConnectionPool[AsyncConnection] | None = None

    async def open(self) -> None:
        """Open the pool on the running loop (without waiting for a connection)."""
        if self._pool is not None:
            raise RuntimeError("the read pool is open already")
        pool: AsyncConnectionPool[AsyncConnection] = AsyncConnectionPool(
            self._dsn,
            kwargs=self._kwargs,
            min_size=1,
            max_size=self._max_size,
            timeout=self._timeout,
            name=self._name,
            configure=self._configure,
            open=False,
        )
        await pool.open(wait=False)
        self._pool = pool

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool and its connections (reads must have ended)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout)

    async def get(self, game_id: str, *, timeout: timedelta | None = None) -> RuntimeRecord:
        """Return the game's record; raise `NotFound` when there is none."""

        async def fetch(conn: AsyncConnection) -> tuple[Any, ...] | None:
            cur = await conn.execute(GET_QUERY, (game_id,), binary=True)
            return await cur.fetchone()

        row = await self._read(get_action(game_id), fetch, timeout)
        return record_of_get(game_id, row)

    async def list(
        self,
        *,
        status: RuntimeStatus | None,
        page_size: int,
        page_token: str,
        timeout: timedelta | None = None,
    ) -> Page[RuntimeRecord]:
        """One page of records ordered by game id, optionally of one status."""
        query, params = list_query(status=status, page_size=page_size, page_token=page_token)

        async def fetch(conn: AsyncConnection) -> list[tuple[Any, ...]]:
            # Binary results: a page of records parses in about 3/4 of the time.
            cur = await conn.execute(query, params, binary=True)
            return await cur.fetchall()

        return page_of_rows(await self._read(LIST_ACTION, fetch, timeout), page_size)

    async def _read(self, action: str, fetch: Rows[T], timeout: timedelta | None) -> T:
        """Run `fetch` (idempotent) on a pooled connection; once more on a fresh
        one when the connection it got was broken."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the read pool is not open")
        local_ms = local_timeout_ms(timeout, self._session_timeout)
        for last in (False, True):
            broke = False
            try:
                async with pool.connection() as conn:
                    try:
                        return await _run(conn, fetch, local_ms, self._session_ms)
                    finally:
                        broke = conn.closed or conn.broken
            except psycopg.Error as error:
                if last or not broke:
                    raise to_domain_error(error, action) from error
            except TimeoutError as error:
                raise statement_timed_out(action) from error
            await pool.check()
        raise AssertionError("the second attempt returns or raises")  # pragma: no cover


async def _run(conn: AsyncConnection, fetch: Rows[T], local_ms: int | None, session_ms: int) -> T:
    """The read alone in autocommit, bounded by `local_ms` if given: here when
    that is shorter than the session's timeout (`TimeoutError` when it
    passes), by PostgreSQL in a transaction of its own when it is longer."""
    if local_ms is None:
        return await fetch(conn)
    if local_ms < session_ms:
        # Cancelled at the deadline: psycopg has the statement cancelled in
        # PostgreSQL and waits for it to end (or closes the connection).
        async with asyncio.timeout(local_ms / 1000):
            return await fetch(conn)
    # Without parameters psycopg sends the simple protocol's one message,
    # which may hold several statements; the value is an int.
    try:
        await conn.execute(f"BEGIN READ ONLY; SET LOCAL statement_timeout = {local_ms}".encode())
        return await fetch(conn)
    finally:
        await _end_transaction(conn)


async def _end_transaction(conn: AsyncConnection) -> None:
    try:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.rollback()
    except psycopg.Error:
        pass  # Broken, or a cancelled statement still running: the pool discards it.


if TYPE_CHECKING:
    # mypy proves the adapter satisfies the port structurally.
    def _conforms(reader: PostgresRecordReader) -> RecordReader:
        return reader
