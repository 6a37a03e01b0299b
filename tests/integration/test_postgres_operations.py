"""The PostgreSQL operation log, the unit of work and the pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.pq import TransactionStatus

from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.operations import PostgresOperationLog
from rtmanager.adapters.postgres.paging import encode_records_token
from rtmanager.adapters.postgres.pool import Pool, create_pool, database_errors
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.domain.errors import InternalError, InvalidRequest, NotFound, ServiceUnavailable
from rtmanager.domain.operation import (
    InvalidOperationEntry,
    OperationEntry,
    OpKind,
    OpSource,
    Outcome,
)
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import OperationFilter, UnitOfWorkFactory
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def pool(pg_schema: str) -> Iterator[Pool]:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=4, timeout=10)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def uow(pool: Pool) -> PostgresUnitOfWorkFactory:
    return PostgresUnitOfWorkFactory(pool, default_timeout=timedelta(seconds=10))


@pytest.fixture
def raw(pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A connection of its own, outside any unit of work."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        yield conn


def entry(game_id: str = "g1", minute: int = 0, **changes: object) -> OperationEntry:
    started = T0 + timedelta(minutes=minute)
    base = OperationEntry(
        game_id=game_id,
        op_kind=OpKind.START,
        op_source=OpSource.LOBBY_STREAM,
        outcome=Outcome.SUCCESS,
        started_at=started,
        finished_at=started + timedelta(seconds=3),
        source_ref="1700000000000-0",
        image_ref="galaxy/engine:1.2.3",
        container_id="c1",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def record(game_id: str = "g1") -> RuntimeRecord:
    return RuntimeRecord(
        game_id=game_id,
        status=RuntimeStatus.RUNNING,
        current_container_id="c1",
        current_image_ref="galaxy/engine:1.2.3",
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/games/{game_id}",
        docker_network="galaxy-engines",
        started_at=T0,
        last_op_at=T0,
        created_at=T0,
    )


def append_all(uow: PostgresUnitOfWorkFactory, *entries: OperationEntry) -> list[OperationEntry]:
    with uow() as work:
        stored = [work.operations.append(e) for e in entries]
        work.commit()
    return stored


def list_all(
    uow: PostgresUnitOfWorkFactory, filters: OperationFilter, page_size: int = 100
) -> list[OperationEntry]:
    found: list[OperationEntry] = []
    token = ""
    with uow() as work:
        while True:
            page = work.operations.list(filters, page_size=page_size, page_token=token)
            found.extend(page.items)
            token = page.next_page_token
            if not token:
                return found


def closed_log() -> PostgresOperationLog:
    """An operation log whose connection is closed: any statement would fail."""
    conn = psycopg.connect(POSTGRES_DSN)
    conn.close()
    return PostgresOperationLog(conn)


# --- append ---------------------------------------------------------------


def test_append_assigns_increasing_ids(uow: PostgresUnitOfWorkFactory) -> None:
    stored = append_all(uow, entry(minute=0), entry(minute=1), entry(minute=2))
    ids = [e.id for e in stored]
    assert ids == sorted(ids) and len(set(ids)) == 3 and ids[0] > 0
    assert [replace(e, id=0) for e in stored] == [entry(minute=m) for m in range(3)]


def test_appended_entries_round_trip_with_nulls(uow: PostgresUnitOfWorkFactory) -> None:
    minimal = OperationEntry(
        game_id="g1",
        op_kind=OpKind.CLEANUP_CONTAINER,
        op_source=OpSource.AUTO_TTL,
        outcome=Outcome.FAILURE,
        started_at=T0,
        error_code="service_unavailable",
    )
    full = entry(
        outcome=Outcome.FAILURE,
        error_code="container_start_failed",
        error_message="engine exited: boom",
    )
    stored = append_all(uow, minimal, full)
    assert list_all(uow, OperationFilter()) == list(reversed(stored))
    assert stored[0].finished_at is None and stored[0].source_ref == ""


@pytest.mark.parametrize(
    "bad",
    [
        entry(outcome=Outcome.FAILURE),
        entry(outcome=Outcome.FAILURE, error_code="oops"),
        entry(error_code="conflict"),
        entry(game_id="  "),
        entry(started_at=datetime(2025, 1, 1)),
        entry(finished_at=T0 - timedelta(seconds=1)),
        entry(id=7),
    ],
)
def test_invalid_entry_is_rejected_before_the_database(bad: OperationEntry) -> None:
    with pytest.raises(InvalidOperationEntry):
        closed_log().append(bad)


# --- reserved ids and parents (composite operations) ------------------------


def inner_of(outer_id: int, minute: int = 1, **changes: object) -> OperationEntry:
    """An inner stop of a restart whose row id is `outer_id`."""
    return entry(
        minute=minute,
        op_kind=OpKind.STOP,
        parent_op_kind=OpKind.RESTART,
        parent_operation_id=outer_id,
        **changes,  # type: ignore[arg-type]
    )


def test_an_outer_row_is_appended_with_the_id_drawn_before_its_inner_rows(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    with uow() as work:  # drawn and never committed: the id stays drawn
        outer_id = work.operations.reserve_id()
    (inner,) = append_all(uow, inner_of(outer_id))
    outer = append_reserved(uow, entry(op_kind=OpKind.RESTART), outer_id)
    (later,) = append_all(uow, entry(minute=5))

    assert outer.id == outer_id < inner.id < later.id
    assert (inner.parent_op_kind, inner.parent_operation_id) == (OpKind.RESTART, outer_id)
    listed = list_all(uow, OperationFilter())
    assert listed == [later, inner, outer]
    assert (listed[1].parent_op_kind, listed[1].parent_operation_id) == (OpKind.RESTART, outer_id)
    assert (listed[2].parent_op_kind, listed[2].parent_operation_id) == (None, 0)


def append_reserved(
    uow: PostgresUnitOfWorkFactory, new: OperationEntry, reserved_id: int
) -> OperationEntry:
    with uow() as work:
        stored = work.operations.append(new, reserved_id=reserved_id)
        work.commit()
    return stored


def test_a_reserved_id_is_appended_once_but_again_after_a_rollback(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    with uow() as work:
        reserved = work.operations.reserve_id()
    with uow() as work:  # rolled back: the id is free again
        work.operations.append(entry(op_kind=OpKind.RESTART), reserved_id=reserved)
    append_reserved(uow, entry(op_kind=OpKind.RESTART), reserved)

    with pytest.raises(InternalError, match="unexpected PostgreSQL error"):
        append_reserved(uow, entry(op_kind=OpKind.PATCH), reserved)


def test_concurrent_reservations_and_appends_never_share_an_id(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    drawn: list[int] = []
    lock = threading.Lock()

    def draw_and_append() -> None:
        for _ in range(20):
            with uow() as work:
                reserved = work.operations.reserve_id()
                plain = work.operations.append(entry()).id
                work.commit()
            with lock:
                drawn.extend([reserved, plain])

    workers = [threading.Thread(target=draw_and_append) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(drawn) == 160 and len(set(drawn)) == 160


@pytest.mark.parametrize(
    "statement",
    [
        # A kind without an id, an id without a kind.
        "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, started_at,"
        " parent_op_kind) VALUES ('g1', 'stop', 'gm_rest', 'success', now(), 'restart')",
        "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, started_at,"
        " parent_operation_id) VALUES ('g1', 'stop', 'gm_rest', 'success', now(), 7)",
        # Only composite operations are parents, only stops and starts inner steps.
        "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, started_at,"
        " parent_op_kind, parent_operation_id)"
        " VALUES ('g1', 'stop', 'gm_rest', 'success', now(), 'start', 7)",
        "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, started_at,"
        " parent_op_kind, parent_operation_id)"
        " VALUES ('g1', 'restart', 'gm_rest', 'success', now(), 'patch', 7)",
        "INSERT INTO operation_log (id, game_id, op_kind, op_source, outcome, started_at,"
        " parent_op_kind, parent_operation_id)"
        " VALUES (7, 'g1', 'stop', 'gm_rest', 'success', now(), 'restart', 7)",
    ],
)
def test_the_table_refuses_a_parent_that_breaks_a_rule(
    uow: PostgresUnitOfWorkFactory, raw: psycopg.Connection[tuple[object, ...]], statement: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        raw.execute(statement.encode())


def test_a_negative_reserved_id_is_refused_before_the_database() -> None:
    with pytest.raises(InvalidOperationEntry, match="never drawn"):
        closed_log().append(entry(), reserved_id=-3)


# --- list -----------------------------------------------------------------


def test_list_is_newest_first_with_pagination(uow: PostgresUnitOfWorkFactory) -> None:
    stored = append_all(uow, *(entry(minute=m) for m in range(25)))

    pages = []
    token = ""
    with uow() as work:
        while True:
            page = work.operations.list(OperationFilter(), page_size=10, page_token=token)
            pages.append(list(page.items))
            token = page.next_page_token
            if not token:
                break

    assert [len(p) for p in pages] == [10, 10, 5]
    assert [e for p in pages for e in p] == list(reversed(stored))


def test_list_filters(uow: PostgresUnitOfWorkFactory) -> None:
    stored = append_all(
        uow,
        entry("g1", 0),
        entry("g2", 1, op_kind=OpKind.STOP, op_source=OpSource.GM_REST),
        entry("g1", 2, op_kind=OpKind.PATCH, outcome=Outcome.FAILURE, error_code="conflict"),
        entry("g3", 3, op_kind=OpKind.STOP, op_source=OpSource.ADMIN_REST),
        entry("g1", 4, op_source=OpSource.AUTO_RECONCILE, op_kind=OpKind.RECONCILE_ADOPT),
    )

    def ids(**filters: object) -> list[int]:
        return [e.id for e in list_all(uow, OperationFilter(**filters), page_size=2)]  # type: ignore[arg-type]

    newest_first = [e.id for e in reversed(stored)]
    assert ids() == newest_first
    assert ids(game_id="g1") == [stored[4].id, stored[2].id, stored[0].id]
    assert ids(game_id="nobody") == []
    assert ids(op_kind=OpKind.STOP) == [stored[3].id, stored[1].id]
    assert ids(op_source=OpSource.GM_REST) == [stored[1].id]
    assert ids(outcome=Outcome.FAILURE) == [stored[2].id]
    assert ids(game_id="g1", op_kind=OpKind.START) == [stored[0].id]
    # since is inclusive, until exclusive (both on started_at).
    assert ids(since=T0 + timedelta(minutes=1)) == newest_first[:4]
    assert ids(until=T0 + timedelta(minutes=1)) == [stored[0].id]
    assert ids(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == [
        stored[2].id,
        stored[1].id,
    ]
    assert ids(since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=3)) == []


@pytest.mark.parametrize(
    "filters",
    [
        OperationFilter(game_id=""),
        OperationFilter(op_kind="explode"),  # type: ignore[arg-type]
        OperationFilter(op_source="cron"),  # type: ignore[arg-type]
        OperationFilter(outcome="maybe"),  # type: ignore[arg-type]
        OperationFilter(since=datetime(2025, 1, 1)),
        OperationFilter(until=datetime(2025, 1, 1)),
    ],
)
def test_bad_filters_are_invalid_request(
    uow: PostgresUnitOfWorkFactory, filters: OperationFilter
) -> None:
    with uow() as work, pytest.raises(InvalidRequest):
        work.operations.list(filters)


@pytest.mark.parametrize("token", ["garbage!", encode_records_token("g1"), "eyJiZWZvcmVfaWQiOjB9"])
def test_malformed_page_token_is_invalid_request(
    uow: PostgresUnitOfWorkFactory, token: str
) -> None:
    # The last token is {"before_id":0}: ids start at 1.
    with uow() as work, pytest.raises(InvalidRequest, match="page_token"):
        work.operations.list(OperationFilter(), page_token=token)


@pytest.mark.parametrize("page_size", [0, 1001])
def test_page_size_out_of_range_is_invalid_request(
    uow: PostgresUnitOfWorkFactory, page_size: int
) -> None:
    with uow() as work, pytest.raises(InvalidRequest, match="page_size"):
        work.operations.list(OperationFilter(), page_size=page_size)


# --- unit of work ---------------------------------------------------------


def test_factory_satisfies_the_port(uow: PostgresUnitOfWorkFactory) -> None:
    factory: UnitOfWorkFactory = uow
    with factory() as work:
        assert work.records.list().items == []


def test_uncommitted_work_is_rolled_back_on_exception(
    uow: PostgresUnitOfWorkFactory, raw: psycopg.Connection[tuple[object, ...]]
) -> None:
    class BoomError(Exception):
        pass

    with pytest.raises(BoomError), uow() as work:
        work.records.upsert(record())
        work.operations.append(entry())
        raise BoomError

    assert raw.execute("SELECT count(*) FROM runtime_records").fetchone() == (0,)
    assert raw.execute("SELECT count(*) FROM operation_log").fetchone() == (0,)


def test_leaving_without_commit_rolls_back(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work:
        work.records.upsert(record())
        work.operations.append(entry())
        # Visible inside the unit of work...
        assert work.records.get("g1") == record()
    # ...and gone after it.
    with uow() as work:
        with pytest.raises(NotFound):
            work.records.get("g1")
        assert work.operations.list(OperationFilter()).items == []


def test_committed_work_is_visible_to_other_connections(
    uow: PostgresUnitOfWorkFactory, raw: psycopg.Connection[tuple[object, ...]]
) -> None:
    with uow() as work:
        work.records.upsert(record())
        appended = work.operations.append(entry())
        assert raw.execute("SELECT count(*) FROM runtime_records").fetchone() == (0,)
        work.commit()

    assert raw.execute("SELECT game_id, status FROM runtime_records").fetchall() == [
        ("g1", "running")
    ]
    assert raw.execute("SELECT id, game_id FROM operation_log").fetchall() == [(appended.id, "g1")]


def test_statement_timeout_is_service_unavailable(uow: PostgresUnitOfWorkFactory) -> None:
    started = time.monotonic()
    with (
        uow(timeout=timedelta(milliseconds=100)) as work,
        pytest.raises(ServiceUnavailable, match="timed out"),
        database_errors("sleep"),
    ):
        work.connection.execute("SELECT pg_sleep(30)")
    assert time.monotonic() - started < 10  # cut at 100 ms, far from the 30 s asked for

    # The connection went back healthy: the pool keeps serving.
    with uow() as work:
        assert work.records.list().items == []


def test_statement_timeout_survives_commit(uow: PostgresUnitOfWorkFactory) -> None:
    with uow(timeout=timedelta(milliseconds=100)) as work:
        work.operations.append(entry())
        work.commit()
        with pytest.raises(ServiceUnavailable), database_errors("sleep"):
            work.connection.execute("SELECT pg_sleep(2)")
    assert len(list_all(uow, OperationFilter())) == 1


def test_store_statement_blocked_past_the_timeout_is_service_unavailable(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    with uow() as setup:
        setup.records.upsert(record())
        setup.commit()
    started = time.monotonic()
    with uow() as holder:
        holder.records.get_for_update("g1")
        with (
            uow(timeout=timedelta(milliseconds=150)) as blocked,
            pytest.raises(ServiceUnavailable),
        ):
            blocked.records.upsert(replace(record(), docker_network="elsewhere"))
    assert time.monotonic() - started < 10  # without the timeout it would wait for ever


def test_unit_of_work_without_timeout_has_the_sessions(pool: Pool) -> None:
    with PostgresUnitOfWorkFactory(pool)() as work:
        assert work.connection.execute("SHOW statement_timeout").fetchone() == ("10s",)


def test_pool_connections_use_the_schema_and_utc(pool: Pool, pg_schema: str) -> None:
    with PostgresUnitOfWorkFactory(pool)() as work:
        conn = work.connection
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
        assert conn.execute("SELECT current_schema()").fetchone() == (pg_schema,)


def test_unreachable_database_is_service_unavailable_quickly(pg_schema: str) -> None:
    started = time.monotonic()
    pool = create_pool(
        "postgresql://rtmanager:rtmanager@127.0.0.1:1/rtmanager", pg_schema, max_size=2, timeout=1
    )
    try:
        assert time.monotonic() - started < 0.5, "building the pool must not wait"
        factory = PostgresUnitOfWorkFactory(pool)
        with pytest.raises(ServiceUnavailable), factory():
            pass
        assert time.monotonic() - started < 3
    finally:
        pool.close(timeout=1)
