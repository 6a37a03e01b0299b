"""The event loop's record reader (`PostgresRecordReader`) against real PostgreSQL:
the same answers and errors as the record store, deadlines as statement
timeouts. Its round trips are counted in `test_postgres_round_trips`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from rtmanager.adapters.postgres.loop_reads import PostgresRecordReader
from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.deadlines import deadline_scope
from rtmanager.domain.errors import InvalidRequest, NotFound, ServiceUnavailable
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.queries import RuntimeQueries, RuntimeReads
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
R = TypeVar("R")


def record(game_id: str, status: RuntimeStatus = RuntimeStatus.RUNNING) -> RuntimeRecord:
    running = status is RuntimeStatus.RUNNING
    return RuntimeRecord(
        game_id=game_id,
        status=status,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/{game_id}",
        docker_network="galaxy-net",
        last_op_at=T0 + timedelta(minutes=1),
        created_at=T0,
        current_container_id="c" * 64,
        current_image_ref="galaxy/engine:1.0.0",
        started_at=T0,
        stopped_at=None if running else T0 + timedelta(minutes=1),
    )


@pytest.fixture
def seeded(pg_schema: str) -> RuntimeQueries:
    """The schema with five records; the synchronous queries over it."""
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=1, timeout=10)
    units = PostgresUnitOfWorkFactory(pool)
    with units() as work:
        for n in range(5):
            status = RuntimeStatus.RUNNING if n % 2 else RuntimeStatus.STOPPED
            work.records.upsert(record(f"g-{n}", status))
        work.commit()
    return RuntimeQueries(units)


@asynccontextmanager
async def opened(schema: str, dsn: str = POSTGRES_DSN) -> AsyncIterator[RuntimeReads]:
    reader = PostgresRecordReader(dsn, schema, max_size=2, timeout=2)
    await reader.open()
    try:
        yield RuntimeReads(reader)
    finally:
        await reader.close()


def on_loop(schema: str, read: Callable[[RuntimeReads], Awaitable[R]]) -> R:
    async def run() -> R:
        async with opened(schema) as reads:
            return await read(reads)

    return asyncio.run(run())


def test_reads_on_the_loop_answer_what_the_record_store_answers(
    seeded: RuntimeQueries, pg_schema: str
) -> None:
    async def read_all(reads: RuntimeReads) -> tuple[object, ...]:
        first = await reads.list_runtimes(status=None, page_size=2, page_token="")
        second = await reads.list_runtimes(
            status=None, page_size=2, page_token=first.next_page_token
        )
        running = await reads.list_runtimes(
            status=RuntimeStatus.RUNNING, page_size=0, page_token=""
        )
        return await reads.get_runtime("g-3"), first, second, running

    got, first, second, running = on_loop(pg_schema, read_all)
    expected_first = seeded.list_runtimes(status=None, page_size=2, page_token="")
    expected_second = seeded.list_runtimes(
        status=None, page_size=2, page_token=expected_first.next_page_token
    )
    assert got == seeded.get_runtime("g-3")
    assert (first, second) == (expected_first, expected_second)
    assert [r.game_id for r in running.items] == ["g-1", "g-3"]  # type: ignore[attr-defined]


def test_timestamps_read_on_the_loop_keep_every_microsecond_and_are_utc(pg_schema: str) -> None:
    # The loop's connections load a timestamptz as its integer (microseconds
    # since 2000-01-01 UTC); the record store's as a datetime. Both must
    # give the same instants, before 2000 too, as UTC datetimes.
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=1, timeout=10)
    stored = replace(
        record("g-old", RuntimeStatus.STOPPED),
        created_at=datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        started_at=datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        stopped_at=datetime(2025, 3, 1, 12, 0, 0, 123_456, tzinfo=UTC),
        last_op_at=datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        removed_at=None,
    )
    try:
        units = PostgresUnitOfWorkFactory(pool)
        with units() as work:
            work.records.upsert(stored)
            work.commit()
        from_store = RuntimeQueries(units).get_runtime("g-old")
    finally:
        pool.close()

    got = on_loop(pg_schema, lambda reads: reads.get_runtime("g-old"))
    listed = on_loop(
        pg_schema, lambda reads: reads.list_runtimes(status=None, page_size=0, page_token="")
    )
    assert got == from_store == stored
    assert listed.items == [stored]
    for value in (got.created_at, got.started_at, got.stopped_at, got.last_op_at):
        assert value is not None and value.tzinfo is UTC


def test_an_unknown_game_is_not_found_and_a_malformed_id_is_invalid(
    seeded: RuntimeQueries, pg_schema: str
) -> None:
    with pytest.raises(NotFound) as missing:
        on_loop(pg_schema, lambda reads: reads.get_runtime("g-99"))
    assert missing.value.metadata == {"game_id": "g-99"}
    with pytest.raises(InvalidRequest):
        on_loop(pg_schema, lambda reads: reads.get_runtime("../etc"))
    with pytest.raises(InvalidRequest):
        on_loop(
            pg_schema,
            lambda reads: reads.list_runtimes(status=None, page_size=10, page_token="junk"),
        )


def test_a_short_deadline_bounds_the_statement_and_the_connection_stays_usable(
    seeded: RuntimeQueries, pg_schema: str
) -> None:
    table = f'"{pg_schema}".runtime_records'

    async def blocked_then_free(reads: RuntimeReads) -> tuple[float, int, str]:
        locker = await psycopg.AsyncConnection.connect(POSTGRES_DSN)
        try:
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with deadline_scope(0.3), pytest.raises(ServiceUnavailable, match="timed out"):
                await reads.get_runtime("g-1")
            waited = time.monotonic() - started
            # Still locked: a statement only abandoned by the client would
            # still be waiting for the lock in PostgreSQL.
            cur = await locker.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted",
                (table,),
            )
            (still_waiting,) = await cur.fetchone() or (None,)
        finally:
            await locker.rollback()
            await locker.close()
        after = await reads.get_runtime("g-1")
        return waited, still_waiting, after.game_id

    waited, still_waiting, game_id = on_loop(pg_schema, blocked_then_free)
    assert waited < 5.0  # the statement was cut at the deadline, not the session's 10 s
    assert still_waiting == 0  # and cancelled in PostgreSQL
    assert game_id == "g-1"


def test_reads_while_postgres_is_unreachable_are_unavailable(pg_schema: str) -> None:
    async def read() -> None:
        async with opened(pg_schema, dsn="postgresql://rtmanager@127.0.0.1:1/none") as reads:
            with pytest.raises(ServiceUnavailable):
                await reads.get_runtime("g-1")
            with pytest.raises(ServiceUnavailable):
                await reads.list_runtimes(status=None, page_size=10, page_token="")

    asyncio.run(read())
