"""The PostgreSQL runtime record store against its port contract."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.paging import encode_operations_token, encode_records_token
from rtmanager.adapters.postgres.pool import Pool, create_pool
from rtmanager.adapters.postgres.records import PostgresRuntimeRecordStore
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.domain.errors import (
    ConcurrentModification,
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from rtmanager.domain.ids import GAME_ID_PATTERN
from rtmanager.domain.runtime import (
    InvalidRuntimeRecord,
    InvalidTransition,
    RuntimeRecord,
    RuntimeStatus,
)
from rtmanager.ports import StatusChange
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
RUNNING = RuntimeStatus.RUNNING
STOPPED = RuntimeStatus.STOPPED
REMOVED = RuntimeStatus.REMOVED


@pytest.fixture
def pool(pg_schema: str) -> Iterator[Pool]:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=20, timeout=10)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def uow(pool: Pool) -> PostgresUnitOfWorkFactory:
    return PostgresUnitOfWorkFactory(pool, default_timeout=timedelta(seconds=10))


def running(game_id: str = "g1", *, at: datetime = T0, **changes: object) -> RuntimeRecord:
    record = RuntimeRecord(
        game_id=game_id,
        status=RUNNING,
        current_container_id=f"container-{game_id}",
        current_image_ref="galaxy/engine:1.2.3",
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/var/lib/galaxy/games/{game_id}",
        docker_network="galaxy-engines",
        started_at=at,
        last_op_at=at,
        created_at=at,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def stopped(game_id: str = "g1", *, at: datetime = T0, **changes: object) -> RuntimeRecord:
    return replace(running(game_id, at=at).with_status(STOPPED, at), **changes)  # type: ignore[arg-type]


def save(uow: PostgresUnitOfWorkFactory, *records: RuntimeRecord) -> None:
    with uow() as work:
        for record in records:
            work.records.upsert(record)
        work.commit()


def load(uow: PostgresUnitOfWorkFactory, game_id: str) -> RuntimeRecord:
    with uow() as work:
        return work.records.get(game_id)


def closed_store() -> PostgresRuntimeRecordStore:
    """A store whose connection is closed: any statement would fail."""
    conn = psycopg.connect(POSTGRES_DSN)
    conn.close()
    return PostgresRuntimeRecordStore(conn)


# --- get / upsert ---------------------------------------------------------


def test_get_of_unknown_game_is_not_found(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work, pytest.raises(NotFound, match="nope"):
        work.records.get("nope")


def test_get_for_update_of_unknown_game_is_none(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work:
        assert work.records.get_for_update("nope") is None


def test_upsert_inserts_then_overwrites_every_column(uow: PostgresUnitOfWorkFactory) -> None:
    first = running("g1", at=T0, stopped_at=T0 + timedelta(seconds=1))
    save(uow, first)
    assert load(uow, "g1") == first

    later = T0 + timedelta(hours=1)
    second = RuntimeRecord(
        game_id="g1",
        status=REMOVED,
        current_container_id="",
        current_image_ref="",
        engine_endpoint="http://galaxy-game-g1:9090",
        state_path="/srv/games/g1",
        docker_network="other-net",
        started_at=None,
        stopped_at=None,
        removed_at=later,
        last_op_at=later,
        created_at=T0 - timedelta(days=1),
    )
    save(uow, second)
    assert load(uow, "g1") == second


def test_a_record_keeps_its_node_through_upsert_get_list_and_status_changes(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    placed = running("g1", node_id="node-7x2k9q4w1e5r8t3y6u0", node_hostname="worker-2")
    save(uow, placed, running("g2"))
    assert load(uow, "g1") == placed
    with uow() as work:
        listed = work.records.list().items
        stopped_record = work.records.update_status(
            StatusChange("g1", RUNNING, STOPPED, T0 + timedelta(minutes=1))
        )
        work.commit()
    assert [(r.node_id, r.node_hostname) for r in listed] == [
        ("node-7x2k9q4w1e5r8t3y6u0", "worker-2"),
        ("", ""),
    ]
    assert (stopped_record.node_id, stopped_record.node_hostname) == (
        "node-7x2k9q4w1e5r8t3y6u0",
        "worker-2",
    )
    assert load(uow, "g1") == stopped_record
    # A later start on the single host clears it.
    save(uow, replace(placed, node_id="", node_hostname="", last_op_at=T0 + timedelta(minutes=2)))
    assert (load(uow, "g1").node_id, load(uow, "g1").node_hostname) == ("", "")


def test_a_node_hostname_without_a_node_id_is_refused(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work, pytest.raises(InvalidRuntimeRecord, match="node"):
        work.records.upsert(running("g1", node_hostname="worker-2"))


def test_upsert_rejects_an_invalid_record_before_the_database() -> None:
    broken = running("g1", current_container_id="")
    with pytest.raises(InvalidRuntimeRecord, match="container id"):
        closed_store().upsert(broken)


def test_upsert_of_invalid_record_writes_nothing(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work:
        with pytest.raises(InvalidRuntimeRecord):
            work.records.upsert(running("g1", last_op_at=T0 - timedelta(seconds=1)))
        work.commit()
    with uow() as work, pytest.raises(NotFound):
        work.records.get("g1")


def test_timestamps_come_back_as_utc(uow: PostgresUnitOfWorkFactory) -> None:
    save(uow, running("g1"))
    record = load(uow, "g1")
    assert record.created_at.tzinfo is UTC
    assert record.started_at is not None and record.started_at.tzinfo is UTC


def test_value_postgres_cannot_store_is_invalid_request(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work, pytest.raises(InvalidRequest, match="NUL"):
        work.records.upsert(running("g1", state_path="/games/\x00"))


def test_get_for_update_locks_the_row_until_the_unit_of_work_ends(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    save(uow, running("g1"))
    with uow() as holder:
        assert holder.records.get_for_update("g1") == running("g1")
        with (
            uow(timeout=timedelta(milliseconds=200)) as waiter,
            pytest.raises(ServiceUnavailable),
        ):
            waiter.records.get_for_update("g1")
    with uow(timeout=timedelta(milliseconds=500)) as later:
        assert later.records.get_for_update("g1") is not None


# --- update_status --------------------------------------------------------


def test_stop_derives_timestamps_like_with_status(uow: PostgresUnitOfWorkFactory) -> None:
    record = running("g1")
    save(uow, record)
    now = T0 + timedelta(minutes=5)

    with uow() as work:
        updated = work.records.update_status(
            StatusChange("g1", expected_from=RUNNING, to=STOPPED, now=now)
        )
        work.commit()

    assert updated == record.with_status(STOPPED, now)
    assert updated.stopped_at == now and updated.last_op_at == now
    assert updated.started_at == T0
    assert load(uow, "g1") == updated


def test_start_of_stopped_record_stamps_started_and_clears_stopped(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    record = stopped("g1", current_container_id="")
    save(uow, record)
    now = T0 + timedelta(minutes=5)

    with uow() as work:
        updated = work.records.update_status(
            StatusChange(
                "g1",
                expected_from=STOPPED,
                to=RUNNING,
                now=now,
                expected_container_id="",
                container_id="new-container",
            )
        )
        work.commit()

    assert updated == record.with_status(RUNNING, now, container_id="new-container")
    assert updated.started_at == now and updated.stopped_at is None
    assert updated.current_container_id == "new-container"
    assert load(uow, "g1") == updated


def test_remove_can_clear_the_container_id(uow: PostgresUnitOfWorkFactory) -> None:
    record = stopped("g1")
    save(uow, record)
    now = T0 + timedelta(minutes=5)

    with uow() as work:
        updated = work.records.update_status(
            StatusChange(
                "g1",
                expected_from=STOPPED,
                to=REMOVED,
                now=now,
                expected_container_id="container-g1",
                container_id="",
            )
        )
        work.commit()

    assert updated == record.with_status(REMOVED, now, container_id="")
    assert updated.removed_at == now and updated.stopped_at == T0
    assert load(uow, "g1").current_container_id == ""


def test_reconcile_dispose_of_running_record(uow: PostgresUnitOfWorkFactory) -> None:
    record = running("g1")
    save(uow, record)
    now = T0 + timedelta(minutes=5)
    with uow() as work:
        updated = work.records.update_status(
            StatusChange("g1", expected_from=RUNNING, to=REMOVED, now=now)
        )
    assert updated == record.with_status(REMOVED, now)


def test_wrong_expected_status_is_concurrent_modification(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    save(uow, stopped("g1"))
    change = StatusChange("g1", expected_from=RUNNING, to=STOPPED, now=T0 + timedelta(seconds=1))
    with uow() as work, pytest.raises(ConcurrentModification) as caught:
        work.records.update_status(change)
    assert "expected status running" in caught.value.message
    assert "found status stopped" in caught.value.message
    assert caught.value.race
    assert load(uow, "g1") == stopped("g1")


def test_wrong_expected_container_is_concurrent_modification(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    save(uow, running("g1"))
    change = StatusChange(
        "g1",
        expected_from=RUNNING,
        to=STOPPED,
        now=T0 + timedelta(seconds=1),
        expected_container_id="someone-elses",
    )
    with uow() as work, pytest.raises(ConcurrentModification) as caught:
        work.records.update_status(change)
    assert "someone-elses" in caught.value.message
    assert "container-g1" in caught.value.message
    assert load(uow, "g1") == running("g1")


def test_empty_expected_container_matches_only_null(uow: PostgresUnitOfWorkFactory) -> None:
    save(uow, stopped("g1"))
    change = StatusChange(
        "g1", expected_from=STOPPED, to=REMOVED, now=T0 + timedelta(1), expected_container_id=""
    )
    with uow() as work, pytest.raises(ConcurrentModification):
        work.records.update_status(change)


def test_forbidden_transition_fails_without_a_query() -> None:
    change = StatusChange("g1", expected_from=REMOVED, to=RUNNING, now=T0)
    # The store's connection is closed: reaching the database would be
    # ServiceUnavailable, not InvalidTransition.
    with pytest.raises(InvalidTransition):
        closed_store().update_status(change)


def test_start_without_a_container_is_refused(uow: PostgresUnitOfWorkFactory) -> None:
    save(uow, stopped("g1", current_container_id=""))
    change = StatusChange("g1", expected_from=STOPPED, to=RUNNING, now=T0 + timedelta(1))
    # An explicit empty container for a running record: refused up front.
    with pytest.raises(InvalidRuntimeRecord):
        closed_store().update_status(replace(change, container_id=""))
    # Keeping the stored NULL container breaks the running-record rule,
    # which only the table can see: a bug, reported with the constraint.
    with uow() as work, pytest.raises(InternalError, match="runtime_records_running_fields"):
        work.records.update_status(change)
    assert load(uow, "g1") == stopped("g1", current_container_id="")


def test_update_status_of_missing_record_is_not_found(uow: PostgresUnitOfWorkFactory) -> None:
    change = StatusChange("ghost", expected_from=RUNNING, to=STOPPED, now=T0)
    with uow() as work, pytest.raises(NotFound):
        work.records.update_status(change)


def test_concurrent_cas_has_exactly_one_winner(uow: PostgresUnitOfWorkFactory) -> None:
    save(uow, running("g1"))
    contenders = 16
    barrier = threading.Barrier(contenders)
    outcomes: dict[int, object] = {}

    def contend(index: int) -> None:
        now = T0 + timedelta(seconds=index + 1)
        try:
            with uow() as work:
                barrier.wait()
                updated = work.records.update_status(
                    StatusChange(
                        "g1",
                        expected_from=RUNNING,
                        to=STOPPED,
                        now=now,
                        expected_container_id="container-g1",
                    )
                )
                work.commit()
                outcomes[index] = updated
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    winners = {i: o for i, o in outcomes.items() if isinstance(o, RuntimeRecord)}
    losers = [o for o in outcomes.values() if isinstance(o, ConcurrentModification)]
    assert len(outcomes) == contenders
    assert len(winners) == 1, outcomes
    assert len(losers) == contenders - 1, outcomes
    [(index, winner)] = winners.items()
    assert load(uow, "g1") == winner
    assert winner.stopped_at == T0 + timedelta(seconds=index + 1)


# --- listings -------------------------------------------------------------


def _many(count: int) -> list[RuntimeRecord]:
    # Every third record is stopped; ids sort in creation order.
    return [
        stopped(f"game-{i:02d}") if i % 3 == 0 else running(f"game-{i:02d}") for i in range(count)
    ]


def test_pagination_returns_every_record_once_in_order(uow: PostgresUnitOfWorkFactory) -> None:
    records = _many(25)
    save(uow, *reversed(records))

    pages, token = [], ""
    with uow() as work:
        while True:
            page = work.records.list(page_size=10, page_token=token)
            pages.append(page.items)
            token = page.next_page_token
            if not token:
                break

    assert [len(items) for items in pages] == [10, 10, 5]
    assert [record for items in pages for record in items] == records


def test_last_full_page_has_no_next_token(uow: PostgresUnitOfWorkFactory) -> None:
    save(uow, *_many(20))
    with uow() as work:
        first = work.records.list(page_size=10)
        second = work.records.list(page_size=10, page_token=first.next_page_token)
        assert first.next_page_token
        assert len(second.items) == 10
        assert second.next_page_token == ""
        assert work.records.list().items == _many(20)


def test_listing_an_empty_table(uow: PostgresUnitOfWorkFactory) -> None:
    with uow() as work:
        page = work.records.list()
    assert list(page.items) == [] and page.next_page_token == ""


def test_status_filter_with_pagination(uow: PostgresUnitOfWorkFactory) -> None:
    records = _many(25)
    save(uow, *records)
    expected = [record for record in records if record.status is STOPPED]

    seen: list[RuntimeRecord] = []
    token = ""
    with uow() as work:
        while True:
            page = work.records.list(status=STOPPED, page_size=3, page_token=token)
            seen.extend(page.items)
            token = page.next_page_token
            if not token:
                break
        assert work.records.list(status=REMOVED).items == []

    assert seen == expected


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "not base64 at all",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"after_game_id": 5}').decode(),
        base64.urlsafe_b64encode(b'{"after_game_id": "../etc"}').decode(),
        base64.urlsafe_b64encode(b'{"after_game_id": "a", "x": 1}').decode(),
        base64.urlsafe_b64encode(b'["a"]').decode(),
        encode_operations_token(10),
        "A" * 1000,
        "ü",
    ],
)
def test_malformed_page_token_is_invalid_request(
    uow: PostgresUnitOfWorkFactory, token: str
) -> None:
    with uow() as work, pytest.raises(InvalidRequest, match="page_token"):
        work.records.list(page_token=token)


@pytest.mark.parametrize("page_size", [0, -1, 1001])
def test_page_size_out_of_range_is_invalid_request(
    uow: PostgresUnitOfWorkFactory, page_size: int
) -> None:
    with uow() as work, pytest.raises(InvalidRequest, match="page_size"):
        work.records.list(page_size=page_size)


def test_page_sizes_at_the_bounds_are_accepted(uow: PostgresUnitOfWorkFactory) -> None:
    save(uow, *_many(3))
    with uow() as work:
        assert len(work.records.list(page_size=1).items) == 1
        assert len(work.records.list(page_size=1000).items) == 3
        token = encode_records_token("game-00")
        assert [r.game_id for r in work.records.list(page_token=token).items] == [
            "game-01",
            "game-02",
        ]


def test_list_by_status_is_ordered_by_game_id(uow: PostgresUnitOfWorkFactory) -> None:
    records = _many(10)
    save(uow, *reversed(records))
    with uow() as work:
        assert work.records.list_by_status(RUNNING) == [r for r in records if r.status is RUNNING]
        assert work.records.list_by_status(STOPPED) == [r for r in records if r.status is STOPPED]
        assert work.records.list_by_status(REMOVED) == []


def test_list_stopped_before_returns_the_oldest_idle_stopped_records(
    uow: PostgresUnitOfWorkFactory,
) -> None:
    old = [stopped(f"old-{i}", at=T0 + timedelta(minutes=10 - i)) for i in range(5)]
    fresh = stopped("fresh", at=T0 + timedelta(hours=2))
    busy = running("busy", at=T0)
    gone = running("gone", at=T0).with_status(REMOVED, T0)
    save(uow, *old, fresh, busy, gone)
    cutoff = T0 + timedelta(hours=1)

    with uow() as work:
        everything = work.records.list_stopped_before(cutoff, 100)
        limited = work.records.list_stopped_before(cutoff, 2)
        boundary = work.records.list_stopped_before(T0 + timedelta(minutes=7), 100)
        with pytest.raises(InvalidRequest):
            work.records.list_stopped_before(cutoff, 0)
        with pytest.raises(InvalidRequest):
            work.records.list_stopped_before(datetime(2025, 1, 1), 10)

    by_age = sorted(old, key=lambda r: r.last_op_at)
    assert everything == by_age
    assert limited == by_age[:2]
    # old-3's last_op_at is exactly the cutoff: not "before" it.
    assert [r.game_id for r in boundary] == ["old-4"]


# --- property: any valid record survives a round trip ---------------------

_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=40,
).filter(lambda value: value.strip() != "")
_instants = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_offsets = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650))


@st.composite
def valid_records(draw: st.DrawFn) -> RuntimeRecord:
    status = draw(st.sampled_from(list(RuntimeStatus)))
    created_at = draw(_instants)
    started_at = created_at + draw(_offsets) if status is RUNNING else None
    if status is not RUNNING and draw(st.booleans()):
        started_at = created_at + draw(_offsets)
    stopped_at = None
    if status is STOPPED or draw(st.booleans()):
        stopped_at = (started_at or created_at) + draw(_offsets)
    removed_at = created_at + draw(_offsets) if status is REMOVED or draw(st.booleans()) else None
    needs_container = status is RUNNING
    node_id = draw(st.one_of(st.just(""), _text))
    needs_image = status is not REMOVED
    return RuntimeRecord(
        game_id=draw(st.from_regex(GAME_ID_PATTERN, fullmatch=True)),
        status=status,
        current_container_id=draw(_text if needs_container else st.one_of(st.just(""), _text)),
        current_image_ref=draw(_text if needs_image else st.one_of(st.just(""), _text)),
        engine_endpoint=draw(_text),
        state_path=draw(_text),
        docker_network=draw(_text),
        started_at=started_at,
        stopped_at=stopped_at,
        removed_at=removed_at,
        last_op_at=created_at + draw(_offsets),
        created_at=created_at,
        node_id=node_id,
        node_hostname=draw(st.one_of(st.just(""), _text)) if node_id else "",
    )


@pytest.fixture
def steady_uow(pg_schema: str) -> Iterator[PostgresUnitOfWorkFactory]:
    """A unit-of-work factory on a pool already at its fixed size.

    The pool opens connections in background threads that draw from
    `random` (jitter); a pool that never grows keeps them quiet while
    hypothesis generates examples.
    """
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, min_size=2, max_size=2, timeout=10)
    try:
        pool.wait(timeout=10)
        yield PostgresUnitOfWorkFactory(pool)
    finally:
        pool.close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(record=valid_records())
def test_any_valid_record_survives_upsert_and_get(
    steady_uow: PostgresUnitOfWorkFactory, record: RuntimeRecord
) -> None:
    record.validate()
    save(steady_uow, record)
    assert load(steady_uow, record.game_id) == record
