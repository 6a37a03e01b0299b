"""The PostgreSQL connection pool and the one place database errors are mapped.

Every pooled connection works in the service's schema (`search_path`), reads
and writes timestamps at UTC (`TimeZone`) and has a session-wide
`statement_timeout`, all three set by the connection's startup `options`, so
a new connection costs no extra round trip and a unit of work needs no
`SET` unless it wants another timeout. Connections rest with autocommit off.
The pool opens without waiting: building it never blocks or fails when the
database is down; borrowing a connection then fails with
`ServiceUnavailable` after the pool timeout.

Borrowing does not probe the connection (that would be one more round trip
per call): a connection broken by a database restart is found by the
statement that fails on it; the unit of work then has the pool check its
idle connections and, where nothing can have been done yet, goes on with a
fresh one (see `unit_of_work`).

Every connection the service opens (pooled or dedicated, such as the event
feed's LISTEN connection) takes its libpq parameters from `connect_kwargs`:
TCP keepalives and `tcp_user_timeout` make a half-open connection (the
server's host gone, a network partition) fail within seconds instead of
hanging until the kernel gives up after many minutes; `statement_timeout`
cannot help there, since it runs on the server that is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from rtmanager.domain.errors import (
    ConcurrentModification,
    InternalError,
    InvalidRequest,
    RuntimeManagerError,
    ServiceUnavailable,
)

Connection = psycopg.Connection[TupleRow]
"""A pooled connection (rows are tuples unless a cursor asks otherwise)."""

Pool = ConnectionPool[Connection]
"""The pool `create_pool` returns."""

T = TypeVar("T")

# Idle connections are probed after 10 s, then every 3 s; 3 unanswered
# probes close them (about 19 s after the peer vanished). Data sent and
# not acknowledged for 20 s closes a busy connection. PostgreSQL itself
# never goes quiet that long on a healthy connection.
KEEPALIVES_IDLE_SECONDS = 10
KEEPALIVES_INTERVAL_SECONDS = 3
KEEPALIVES_COUNT = 3
TCP_USER_TIMEOUT_MS = 20_000

SESSION_STATEMENT_TIMEOUT = timedelta(seconds=10)
"""The `statement_timeout` every pooled connection starts with."""

TIMEOUT_SLACK = timedelta(seconds=1)
"""How much shorter than the session's a timeout may be and still not be `SET`."""

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_schema_name(schema: str) -> str:
    """Return `schema` when it is a lower-case SQL identifier; raise ValueError otherwise."""
    if not isinstance(schema, str) or _SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError(
            f"schema name {schema!r} is invalid: expected a lower-case SQL identifier "
            "(a-z, 0-9, '_', not starting with a digit, at most 63 characters)"
        )
    return schema


def timeout_ms(timeout: timedelta) -> int:
    """A positive timeout in whole milliseconds (at least 1: 0 would mean none)."""
    if timeout <= timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")
    return max(1, round(timeout.total_seconds() * 1000))


def session_options(schema: str, statement_timeout: timedelta | None = None) -> str:
    """The libpq `options` that put a new session in `schema`, at UTC.

    With `statement_timeout`, the session's statements are bounded by it.
    The schema name is validated first, so it needs no quoting here.
    """
    validate_schema_name(schema)
    options = f"-c search_path={schema} -c TimeZone=UTC"
    if statement_timeout is not None:
        options += f" -c statement_timeout={timeout_ms(statement_timeout)}"
    return options


def session_setup(conn: psycopg.Connection[TupleRow], schema: str) -> None:
    """Point a connection opened without `session_options` at `schema` and UTC."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    conn.execute("SET TimeZone TO 'UTC'")
    conn.commit()


def connect_kwargs(*, connect_timeout: float, application_name: str) -> dict[str, Any]:
    """The libpq parameters of every connection the service opens.

    `connect_timeout` bounds each connection attempt (libpq wants whole
    seconds: at least 1, since 0 would mean "forever"). The keepalive and
    `tcp_user_timeout` parameters apply to TCP connections; libpq ignores
    them on Unix-domain sockets, where a dead server is seen at once.
    """
    return {
        "connect_timeout": max(1, round(connect_timeout)),
        "application_name": application_name[:63],
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE_SECONDS,
        "keepalives_interval": KEEPALIVES_INTERVAL_SECONDS,
        "keepalives_count": KEEPALIVES_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
    }


def pooled_connection_kwargs(
    schema: str,
    *,
    statement_timeout: timedelta,
    connect_timeout: float,
    name: str,
    autocommit: bool,
) -> dict[str, Any]:
    """The connection parameters of a pool's connections (this module's and
    the event loop's read pool): `schema`, UTC, the session's
    `statement_timeout`, and `connect_kwargs`."""
    return {
        "autocommit": autocommit,
        "options": session_options(schema, statement_timeout),
        **connect_kwargs(connect_timeout=connect_timeout, application_name=name),
    }


def pool_timeout_seconds(timeout: float | timedelta) -> float:
    """A pool's borrow timeout in seconds; ValueError unless positive."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if seconds <= 0:
        raise ValueError(f"pool timeout must be positive, got {seconds} s")
    return seconds


def local_timeout_ms(timeout: timedelta | None, session: timedelta) -> int | None:
    """The statement timeout, in ms, that a read or transaction must keep instead of
    the session's, or None.

    None when `timeout` is None or close enough to the session's default
    (`session`): at most `TIMEOUT_SLACK` shorter and not longer. A statement
    bounded at 9.6 s instead of 10 s changes nothing anyone can observe, and
    every read under a 10 s client deadline would otherwise pay for a `SET`.
    """
    if timeout is None:
        return None
    wanted = timeout_ms(timeout)
    if timeout > session or timeout < session - TIMEOUT_SLACK:
        return wanted
    return None


def create_pool(
    dsn: str,
    schema: str,
    *,
    max_size: int,
    min_size: int = 1,
    timeout: float | timedelta,
    name: str = "rtmanager-postgres",
    statement_timeout: timedelta = SESSION_STATEMENT_TIMEOUT,
) -> Pool:
    """Return an opened pool of connections working in `schema`.

    `timeout` bounds how long borrowing a connection may wait (and each
    connection attempt); `statement_timeout` is every session's default
    (units of work made by a `PostgresUnitOfWorkFactory` must be told the
    same value). The pool is opened with `wait=False`, so this never blocks
    on the database.
    """
    if min_size < 0 or max_size < max(min_size, 1):
        raise ValueError(f"pool sizes are invalid: min_size={min_size}, max_size={max_size}")
    seconds = pool_timeout_seconds(timeout)
    pool: Pool = ConnectionPool(
        dsn,
        kwargs=pooled_connection_kwargs(
            schema,
            statement_timeout=statement_timeout,
            connect_timeout=seconds,
            name=name,
            autocommit=False,
        ),
        min_size=min_size,
        max_size=max_size,
        timeout=seconds,
        name=name,
        open=False,
    )
    pool.open(wait=False)
    return pool


def connection_broken(conn: Connection) -> bool:
    """Whether `conn` is closed or lost its server (a statement found it broken)."""
    return conn.closed or conn.broken


def read_on_pool(pool: Pool, read: Callable[[Connection], T], *, timeout: float) -> T:
    """Run `read`, idempotent, on a pooled connection, and return its result.

    When it fails because the connection it got was broken (PostgreSQL
    restarted since it was pooled; borrowing does not probe), the pool
    checks its idle connections and `read` runs once more on a fresh one.
    """
    broke = False

    def attempt() -> T:
        nonlocal broke
        with pool.connection(timeout=timeout) as conn:
            try:
                return read(conn)
            finally:
                broke = connection_broken(conn)

    try:
        return attempt()
    except (psycopg.Error, RuntimeManagerError):
        if not broke:
            raise
    pool.check()
    return attempt()


def to_domain_error(error: psycopg.Error, action: str) -> RuntimeManagerError:
    """Translate a psycopg (or pool) error raised while doing `action`.

    - unreachable database, pool timeout, statement timeout, shutdown
      (`OperationalError`) -> `ServiceUnavailable`;
    - serialization failure or deadlock -> `ConcurrentModification` (a race:
      retrying may succeed);
    - a CHECK violation -> `InternalError` naming the constraint (the adapters
      validate first, so this is a bug);
    - a value PostgreSQL cannot store (`DataError`, e.g. a NUL character)
      -> `InvalidRequest`;
    - anything else -> `InternalError`.
    """
    detail = str(error).strip() or type(error).__name__
    if isinstance(error, psycopg.errors.CheckViolation):
        constraint = error.diag.constraint_name or "(unknown)"
        return InternalError(
            f"{action}: the row breaks database constraint {constraint}: {detail}",
            metadata={"constraint": constraint},
        )
    if isinstance(error, psycopg.errors.TransactionRollback):
        return ConcurrentModification(f"{action}: concurrent transaction conflict: {detail}")
    if isinstance(error, psycopg.errors.QueryCanceled):
        return ServiceUnavailable(f"{action}: PostgreSQL statement timed out or was canceled")
    if isinstance(error, psycopg.OperationalError):
        return ServiceUnavailable(f"{action}: PostgreSQL is unavailable: {detail}")
    if isinstance(error, psycopg.DataError):
        return InvalidRequest(f"{action}: value rejected by PostgreSQL: {detail}")
    return InternalError(f"{action}: unexpected PostgreSQL error: {detail}")


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Re-raise psycopg errors of the block as domain errors (see `to_domain_error`)."""
    try:
        yield
    except psycopg.Error as error:
        raise to_domain_error(error, action) from error
