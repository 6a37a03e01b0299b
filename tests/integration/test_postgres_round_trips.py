"""Round trips to PostgreSQL per read and per write, counted in a libpq trace.

Every message the client sends is in the trace; a round trip is a run of
messages sent together that asks for an answer (a simple `Query`, the
`Sync` that ends an extended-protocol exchange or a pipeline, a `Flush`),
waited for before anything else is sent. The counts below are what `GetRuntime`,
`ListRuntimes` (both as served, on the event loop's reader, and through a
unit of work), `ListOperations` and an operation's commit cost, so a
change that adds a statement to the hot path fails here.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from psycopg.pq import Trace
from psycopg.rows import TupleRow

from rtmanager.adapters.postgres.loop_reads import PostgresRecordReader
from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.pool import Pool, create_pool, database_errors
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.deadlines import deadline_scope
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.domain.jobs import JobKind, JobMark, LobbyJob
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.queries import RuntimeQueries, RuntimeReads
from rtmanager.lifecycle.recorder import JobSettled, OperationRecorder, load_record
from rtmanager.ports import OperationFilter, UnitOfWork
from rtmanager.telemetry import Telemetry
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
R = TypeVar("R")


def record(game_id: str = "g-1") -> RuntimeRecord:
    return RuntimeRecord(
        game_id=game_id,
        status=RuntimeStatus.RUNNING,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/{game_id}",
        docker_network="galaxy-net",
        last_op_at=T0,
        created_at=T0,
        current_container_id="c" * 64,
        current_image_ref="galaxy/engine:1.0.0",
        started_at=T0,
    )


def entry(game_id: str = "g-1") -> OperationEntry:
    return OperationEntry(
        id=0,
        game_id=game_id,
        op_kind=OpKind.START,
        op_source=OpSource.GM_REST,
        outcome=Outcome.SUCCESS,
        started_at=T0,
        finished_at=T0,
    )


@dataclass
class Traced:
    """A pool of one connection whose every sent message lands in a trace file."""

    pool: Pool
    units: PostgresUnitOfWorkFactory
    trace: Path
    schema: str

    def round_trips(self, action: Callable[[], R]) -> tuple[int, R]:
        """Run `action`; return how many round trips it made, and its result."""
        before = self._count()
        result = action()
        return self._count() - before, result

    def _count(self) -> int:
        return _sent_round_trips(self.trace)


def _sent_round_trips(trace: Path) -> int:
    """Runs of consecutive client messages that ask for an answer: the client
    waits for the server after each such run (a pipeline's closing `Sync` and
    `Flush` are sent together: one)."""
    sent = 0
    asking = False
    for line in trace.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        if fields[0] == "F":
            asking = asking or fields[2] in ("Query", "Sync", "Flush")
        elif asking:
            sent += 1
            asking = False
    return sent + asking


@pytest.fixture
def traced(pg_schema: str) -> Iterator[Traced]:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=1, timeout=10)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "libpq.trace"
        sink = trace.open("w", buffering=1)
        try:
            pool.wait(timeout=10)
            with pool.connection() as conn:
                conn.pgconn.trace(sink.fileno())
                conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
            units = PostgresUnitOfWorkFactory(pool)
            with units() as work:
                work.records.upsert(record())
                work.operations.append(entry())
                work.commit()
            yield Traced(pool, units, trace, pg_schema)
        finally:
            pool.close()
            sink.close()


def test_each_read_rpc_is_one_round_trip(traced: Traced) -> None:
    queries = RuntimeQueries(traced.units)
    reads: dict[str, Callable[[], object]] = {
        "get": lambda: queries.get_runtime("g-1"),
        "list": lambda: queries.list_runtimes(status=None, page_size=100, page_token=""),
        "operations": lambda: queries.list_operations(
            OperationFilter(), page_size=100, page_token=""
        ),
    }
    with traced.pool.connection() as conn:
        threshold = conn.prepare_threshold
    assert threshold is not None
    trips: dict[str, list[int]] = {name: [] for name in reads}
    for _ in range(threshold + 4):
        for name, read in reads.items():
            trips[name].append(traced.round_trips(read)[0])
    # One round trip each, but for the one call that prepares the statement
    # (psycopg does so on the run after `prepare_threshold`; Parse is its own
    # exchange).
    prepare_at = threshold
    for name, counts in trips.items():
        expected = [1] * len(counts)
        expected[prepare_at] = 2
        assert counts == expected, name


def test_a_lifecycle_reads_its_record_in_one_round_trip(traced: Traced) -> None:
    # Stop, cleanup, restart and start read the game's record through the
    # recorder before they act, and the reconciler re-reads it per step.
    recorder = OperationRecorder(traced.units, Telemetry())
    with deadline_scope(30.0):
        trips, got = traced.round_trips(lambda: recorder.read(lambda uow: uow.records.get("g-1")))
    assert got.game_id == "g-1"
    assert trips == 1
    missing, none = traced.round_trips(lambda: recorder.read(lambda uow: load_record(uow, "g-9")))
    assert (missing, none) == (1, None)


def test_a_lobby_jobs_watermark_check_is_one_round_trip(traced: Traced) -> None:
    # Every Lobby job is checked against its game's watermark under the
    # lease before it acts; only a job found settled also reads the record.
    recorder = OperationRecorder(traced.units, Telemetry())

    def job(entry_id: str) -> LobbyJob:
        return LobbyJob(JobKind.STOP, "stop_jobs", entry_id)

    def check(entry_id: str) -> int:
        operation = recorder.begin(
            game_id="g-1",
            op_kind=OpKind.STOP,
            op_source=OpSource.LOBBY_STREAM,
            source_ref=entry_id,
            job=job(entry_id),
        )
        with deadline_scope(30.0):
            return traced.round_trips(lambda: recorder.check_job(operation))[0]

    assert check("1000-0") == 1  # no watermark yet
    with traced.units() as work:
        mark = JobMark("g-1", job("2000-0"), Outcome.SUCCESS, applied_at=datetime.now(UTC))
        assert work.job_marks.advance(mark)
        work.commit()
    assert check("3000-0") == 1  # newer than the watermark: applied
    settled_op = recorder.begin(
        game_id="g-1", op_kind=OpKind.STOP, op_source=OpSource.LOBBY_STREAM, job=job("2000-0")
    )

    def settled_check() -> JobSettled:
        with pytest.raises(JobSettled) as caught:
            recorder.check_job(settled_op)
        return caught.value

    with deadline_scope(30.0):
        trips, settled = traced.round_trips(settled_check)
    assert trips == 2  # the watermark, then the record to answer with
    assert settled.mark == mark
    assert settled.record is not None and settled.record.game_id == "g-1"


def test_a_client_deadline_near_the_session_timeout_costs_nothing(traced: Traced) -> None:
    queries = RuntimeQueries(traced.units)
    with deadline_scope(9.5):
        trips, _ = traced.round_trips(lambda: queries.get_runtime("g-1"))
    assert trips == 1


def test_a_short_client_deadline_bounds_the_read_in_its_own_transaction(traced: Traced) -> None:
    queries = RuntimeQueries(traced.units)
    with deadline_scope(2.0):
        trips, _ = traced.round_trips(lambda: queries.get_runtime("g-1"))
    assert trips == 3  # BEGIN with SET LOCAL; SELECT; ROLLBACK


def test_an_operation_commit_is_begin_its_statements_and_commit(traced: Traced) -> None:
    def operation() -> list[int]:
        with traced.units(timeout=timedelta(seconds=10)) as work:
            work.records.upsert(record("g-2"))
            appended = work.operations.append(entry("g-2"))
            trips, _ = traced.round_trips(lambda: work.events.append(appended, record("g-2")))
            assert trips == 0  # staged for the commit
            trips, _ = traced.round_trips(work.commit)
            assert trips == 1  # the event (lock, insert, notify) and COMMIT in one pipeline
        return work.committed_event_ids

    trips, ids = traced.round_trips(operation)
    assert trips == 4  # BEGIN, upsert, append, event with COMMIT: nothing on leaving
    with traced.pool.connection() as conn:
        row = conn.execute("SELECT id FROM runtime_events").fetchone()
    assert row is not None and ids == [row[0]]


def test_a_read_on_a_broken_connection_is_retried_on_a_fresh_one(traced: Traced) -> None:
    queries = RuntimeQueries(traced.units)
    _terminate_pooled_backend(traced.pool)
    assert queries.get_runtime("g-1").game_id == "g-1"


def test_a_write_on_a_broken_connection_begins_on_a_fresh_one(traced: Traced) -> None:
    _terminate_pooled_backend(traced.pool)
    with traced.units() as work:
        work.records.upsert(record("g-3"))
        work.commit()
    assert RuntimeQueries(traced.units).get_runtime("g-3").game_id == "g-3"


def test_a_statement_timeout_is_not_retried(traced: Traced) -> None:
    def sleep(work: UnitOfWork) -> None:
        with database_errors("sleep"):
            work.connection.execute("SELECT pg_sleep(1)")  # type: ignore[attr-defined]

    def read() -> None:
        with pytest.raises(ServiceUnavailable, match="timed out"):
            traced.units.read(sleep, timeout=timedelta(milliseconds=50))

    trips, _ = traced.round_trips(read)
    assert trips == 3  # BEGIN with SET LOCAL; the sleep; ROLLBACK: once


def _terminate_pooled_backend(pool: Pool) -> None:
    """Kill the pooled connection's server process, as a PostgreSQL restart would."""
    with pool.connection() as conn:
        pid = conn.info.backend_pid
    _terminate(pid)


def _terminate(pid: int) -> None:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


# The reads as served: coroutines on the event loop, through the reader's
# own asyncio pool (one connection here, traced from its first use).


@dataclass
class LoopTraced:
    """The event loop's reader on a pool of one traced connection."""

    reads: RuntimeReads
    reader: PostgresRecordReader
    trace: Path
    pid: list[int]
    prepare_threshold: int

    async def round_trips(self, action: Callable[[], Awaitable[R]]) -> tuple[int, R]:
        before = _sent_round_trips(self.trace)
        result = await action()
        return _sent_round_trips(self.trace) - before, result


@contextmanager
def loop_traced(traced: Traced) -> Iterator[Callable[[], AsyncContextManager[LoopTraced]]]:
    """Yields a factory of the traced reader, to be opened inside the test's loop."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "loop.trace"
        sink = trace.open("w", buffering=1)
        pid: list[int] = []
        threshold: list[int | None] = []

        async def configure(conn: psycopg.AsyncConnection[TupleRow]) -> None:
            conn.pgconn.trace(sink.fileno())
            conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
            pid.append(conn.info.backend_pid)
            threshold.append(conn.prepare_threshold)

        @asynccontextmanager
        async def opened() -> AsyncIterator[LoopTraced]:
            reader = PostgresRecordReader(
                POSTGRES_DSN, traced.schema, max_size=1, timeout=10, configure=configure
            )
            await reader.open()
            try:
                await reader.get("g-1")  # the connection is made, traced from here
                (prepare_threshold,) = threshold
                assert prepare_threshold is not None
                yield LoopTraced(RuntimeReads(reader), reader, trace, pid, prepare_threshold)
            finally:
                await reader.close()

        try:
            yield opened
        finally:
            sink.close()


def test_each_read_on_the_loop_is_one_round_trip(traced: Traced) -> None:
    async def run(
        opened: Callable[[], AsyncContextManager[LoopTraced]],
    ) -> tuple[int, dict[str, list[int]]]:
        async with opened() as loop:
            reads: dict[str, Callable[[], Awaitable[object]]] = {
                "get": lambda: loop.reads.get_runtime("g-1"),
                "list": lambda: loop.reads.list_runtimes(status=None, page_size=100, page_token=""),
            }
            trips: dict[str, list[int]] = {name: [] for name in reads}
            for _ in range(loop.prepare_threshold + 4):
                for name, read in reads.items():
                    trips[name].append((await loop.round_trips(read))[0])
            return loop.prepare_threshold, trips

    with loop_traced(traced) as opened:
        threshold, trips = asyncio.run(run(opened))
    # One round trip each, but for the one call that prepares the statement
    # (Parse is its own exchange). The get on opening was the first run of
    # its statement: it is prepared one call earlier than the list's.
    expected_get = [1] * (threshold + 4)
    expected_get[threshold - 1] = 2
    expected_list = [1] * (threshold + 4)
    expected_list[threshold] = 2
    assert trips == {"get": expected_get, "list": expected_list}


def test_a_client_deadline_costs_the_loop_read_no_round_trip(traced: Traced) -> None:
    # A deadline shorter than the session's timeout is kept on the loop (the
    # statement is cancelled when it passes): no transaction, no SET.
    async def run(opened: Callable[[], AsyncContextManager[LoopTraced]]) -> tuple[int, ...]:
        async with opened() as loop:
            trips = []
            for seconds in (9.5, 2.0, 0.5):
                with deadline_scope(seconds):
                    trips.append((await loop.round_trips(lambda: loop.reads.get_runtime("g-1")))[0])
            return tuple(trips)

    with loop_traced(traced) as opened:
        trips = asyncio.run(run(opened))
    assert trips == (1, 1, 1)


def test_a_loop_read_allowed_longer_than_the_session_timeout_sets_its_own(traced: Traced) -> None:
    async def run(opened: Callable[[], AsyncContextManager[LoopTraced]]) -> int:
        async with opened() as loop:
            longer = timedelta(seconds=30)
            trips, _ = await loop.round_trips(lambda: loop.reader.get("g-1", timeout=longer))
            return trips

    with loop_traced(traced) as opened:
        assert asyncio.run(run(opened)) == 3  # BEGIN with SET LOCAL; SELECT; ROLLBACK


def test_a_loop_read_on_a_broken_connection_is_retried_on_a_fresh_one(traced: Traced) -> None:
    async def run(opened: Callable[[], AsyncContextManager[LoopTraced]]) -> tuple[str, int]:
        async with opened() as loop:
            _terminate(loop.pid[-1])
            record = await loop.reads.get_runtime("g-1")
            return record.game_id, len(set(loop.pid))

    with loop_traced(traced) as opened:
        game_id, connections = asyncio.run(run(opened))
    assert (game_id, connections) == ("g-1", 2)
