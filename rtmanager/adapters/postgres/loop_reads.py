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
trip: when it passes, a cancel request stops the statement in PostgreSQL
and the read ends with its cancellation. Only a timeout longer than the
session's needs the server's consent: a `BEGIN; SET LOCAL
statement_timeout` (and a `ROLLBACK`). Borrowing does not probe: a read
whose connection turns out broken has the pool check its idle connections
and runs once more on a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
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

log = logging.getLogger(__name__)

# How long a cancel request may take to reach PostgreSQL.
_CANCEL_TIMEOUT_SECONDS = 5.0
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
            await pool.check()
        raise AssertionError("the second attempt returns or raises")  # pragma: no cover


async def _run(conn: AsyncConnection, fetch: Rows[T], local_ms: int | None, session_ms: int) -> T:
    """The read alone in autocommit, bounded by `local_ms` if given: from the
    loop when that is shorter than the session's timeout (see `_cancelled_after`),
    by PostgreSQL in a transaction of its own when it is longer."""
    if local_ms is None:
        return await fetch(conn)
    if local_ms < session_ms:
        return await _cancelled_after(local_ms / 1000, conn, fetch)
    # Without parameters psycopg sends the simple protocol's one message,
    # which may hold several statements; the value is an int.
    try:
        await conn.execute(f"BEGIN READ ONLY; SET LOCAL statement_timeout = {local_ms}".encode())
        return await fetch(conn)
    finally:
        await _end_transaction(conn)


async def _cancelled_after(seconds: float, conn: AsyncConnection, fetch: Rows[T]) -> T:
    """`fetch`, its statement cancelled in PostgreSQL once `seconds` have passed.

    A timer sends the cancel request (psycopg's `cancel_safe`) from a task
    of its own, so the read is not interrupted: it ends with the statement's
    `QueryCanceled` (a `ServiceUnavailable` for the caller). Cancelling the
    read's task instead would leave the statement running in PostgreSQL
    whenever gRPC cancels the task again at the caller's deadline, in the
    middle of psycopg's own cancel request. The connection goes back to the
    pool only once a sent cancel request has been handled, so that it cannot
    reach the next statement on this connection; if that wait is itself
    interrupted, the connection is closed instead.
    """
    cancelling: asyncio.Task[None] | None = None

    def cancel() -> None:
        nonlocal cancelling
        cancelling = asyncio.ensure_future(_cancel(conn))

    timer = asyncio.get_running_loop().call_later(seconds, cancel)
    try:
        return await fetch(conn)
    finally:
        timer.cancel()
        if cancelling is not None:
            try:
                await asyncio.shield(cancelling)
            except BaseException:
                conn.pgconn.finish()  # broken: the pool drops it
                raise


async def _cancel(conn: AsyncConnection) -> None:
    try:
        await conn.cancel_safe(timeout=_CANCEL_TIMEOUT_SECONDS)
    except psycopg.Error as error:
        # The statement runs on, to the session's statement_timeout at most.
        log.warning("could not cancel a read past its deadline", extra={"problem": str(error)})


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
