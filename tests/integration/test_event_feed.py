"""The watch feed against real PostgreSQL: start-up, retention, concurrency, restarts.

Each test runs watches through `WatchService` over a real `PostgresRuntimeFeed`
and compares what they delivered with what `runtime_events` holds: every
committed event once, in id order. The restart test runs a private
PostgreSQL (`tests.support.private_postgres`), never the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from psycopg import sql

from rtmanager.adapters.postgres.event_feed import PostgresRuntimeFeed
from rtmanager.adapters.postgres.events import insert_event, prune_events, pruned_through
from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.pool import Pool, create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWork, PostgresUnitOfWorkFactory
from rtmanager.domain.errors import RuntimeManagerError, ServiceUnavailable
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.watch import Bookmark, ChangeEvent, WatchEnded, WatchRequest, WatchService
from rtmanager.ports import RuntimeEvent
from rtmanager.telemetry import Telemetry
from tests.conftest import POSTGRES_DSN
from tests.support.private_postgres import PrivatePostgres, private_postgres

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HEARTBEAT = timedelta(seconds=1)
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)
EVERYTHING = 2**62


# --- helpers ------------------------------------------------------------------------


@dataclass
class Database:
    """One migrated schema: its DSN, a pool and units of work on it."""

    dsn: str
    schema: str
    pool: Pool
    uow: PostgresUnitOfWorkFactory

    def raw(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection of its own in the schema."""
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def stored_ids(self) -> list[int]:
        with self.raw() as conn:
            rows = conn.execute("SELECT id FROM runtime_events ORDER BY id").fetchall()
        return [int(str(row[0])) for row in rows]


@contextlib.contextmanager
def migrated(dsn: str, schema: str) -> Iterator[Database]:
    apply_migrations(dsn, schema, MIGRATIONS)
    pool = create_pool(dsn, schema, max_size=8, timeout=10)
    try:
        yield Database(dsn, schema, pool, PostgresUnitOfWorkFactory(pool))
    finally:
        pool.close()


@pytest.fixture
def db(pg_schema: str) -> Iterator[Database]:
    with migrated(POSTGRES_DSN, pg_schema) as database:
        yield database


@contextlib.contextmanager
def running_feed(db: Database, **options: object) -> Iterator[PostgresRuntimeFeed]:
    feed = PostgresRuntimeFeed(
        dsn=db.dsn,
        schema=db.schema,
        pool=db.pool,
        max_subscribers=50,
        **options,  # type: ignore[arg-type]
    )
    feed.start()
    try:
        yield feed
    finally:
        feed.stop(10.0)


def entry(game_id: str) -> OperationEntry:
    return OperationEntry(
        game_id=game_id,
        op_kind=OpKind.START,
        op_source=OpSource.ADMIN_REST,
        outcome=Outcome.SUCCESS,
        started_at=T0,
        finished_at=T0,
        image_ref="galaxy/engine:1.2.3",
        container_id="c1",
    )


def record(game_id: str) -> RuntimeRecord:
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


def append_now(work: PostgresUnitOfWork, game_id: str) -> int:
    """Append one operation and insert its event at once in `work`'s transaction
    (not committed): the event is drawn and the writers' lock held."""
    stored = work.operations.append(entry(game_id))
    return insert_event(work.connection, stored, record(game_id))


def write(db: Database, game_id: str = "g") -> int:
    """Commit one change (operation row + event) the way the recorder does."""
    with db.uow() as work:
        work.events.append(work.operations.append(entry(game_id)), record(game_id))
        work.commit()
    [event_id] = work.committed_event_ids
    return event_id


def age_events(db: Database, through: int) -> None:
    """Make the events up to `through` look a day old (for retention)."""
    with db.raw() as conn:
        conn.execute(
            "UPDATE runtime_events SET committed_at = now() - interval '1 day' WHERE id <= %s",
            (through,),
        )


@dataclass
class Watcher:
    """One watch through `WatchService`, on an event loop in a thread of its own."""

    ids: list[int] = field(default_factory=list)
    events: list[RuntimeEvent] = field(default_factory=list)
    bookmarks: list[int] = field(default_factory=list)
    ended: WatchEnded | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None
    _seen: threading.Condition = field(default_factory=threading.Condition)
    _cancel: Callable[[], object] | None = None
    _started: threading.Event = field(default_factory=threading.Event)

    def run(self, feed: PostgresRuntimeFeed, request: WatchRequest) -> Watcher:
        service = WatchService(feed, heartbeat=HEARTBEAT)

        async def read() -> None:
            loop, task = asyncio.get_running_loop(), asyncio.current_task()
            assert task is not None
            self._cancel = lambda: loop.call_soon_threadsafe(task.cancel)
            self._started.set()
            try:
                async for item in service.watch(request):
                    if isinstance(item, ChangeEvent):
                        with self._seen:
                            self.ids.append(item.event.id)
                            self.events.append(item.event)
                            self._seen.notify_all()
                    elif isinstance(item, Bookmark):
                        self.bookmarks.append(item.cursor)
            except WatchEnded as ended:
                self.ended = ended
            except asyncio.CancelledError:
                pass
            except BaseException as error:
                self.error = error
            finally:
                with self._seen:
                    self._seen.notify_all()

        self.thread = threading.Thread(target=lambda: asyncio.run(read()), daemon=True)
        self.thread.start()
        self._started.wait(10)
        return self

    def wait_for(self, predicate: Callable[[list[int]], bool], within: float = 30) -> list[int]:
        """Wait until the delivered ids satisfy `predicate` (or the watch ends)."""
        deadline = time.monotonic() + within
        with self._seen:
            while not predicate(self.ids):
                assert self.thread is not None
                if not self.thread.is_alive():
                    raise AssertionError(f"watch ended: {self.ended or self.error!r}")
                left = deadline - time.monotonic()
                assert left > 0, f"not delivered within {within}s; have {self.ids}"
                self._seen.wait(left)
            return list(self.ids)

    def wait_ended(self, within: float = 30) -> WatchEnded:
        assert self.thread is not None
        self.thread.join(within)
        assert not self.thread.is_alive(), "the watch did not end"
        assert self.ended is not None, self.error
        return self.ended

    def stop(self) -> None:
        if self._cancel is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._cancel()
        if self.thread is not None:
            self.thread.join(10)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.stop()


def watch(
    watchers: list[Watcher], feed: PostgresRuntimeFeed, request: WatchRequest | None = None
) -> Watcher:
    watcher = Watcher().run(feed, request or WatchRequest())
    watchers.append(watcher)
    return watcher


def eventually(probe: Callable[[], bool], within: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def has_all(expected: list[int]) -> Callable[[list[int]], bool]:
    return lambda ids: len(ids) >= len(expected)


# --- start-up -----------------------------------------------------------------------


def waiting_for_events_lock(db: Database) -> bool:
    """Whether some session waits for the schema's event lock in shared mode."""
    with db.raw() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND mode = 'ShareLock'"
            " AND ((classid::bigint << 32) | objid::bigint)"
            "   = hashtextextended('rtmanager.events:' || current_schema(), 0)"
        ).fetchone()
    return bool(row and row[0])


def test_a_feed_started_while_a_writer_holds_the_lock_delivers_that_event(
    db: Database, watchers: list[Watcher]
) -> None:
    before = write(db, "g-before")
    with db.uow() as pending:
        held = append_now(pending, "g-held")  # drawn under the lock, not committed
        with running_feed(db) as feed:
            # The start position must not be read past the uncommitted event.
            eventually(lambda: waiting_for_events_lock(db), what="the feed to wait for the writer")
            resumed = watch(watchers, feed, WatchRequest(since=before))
            pending.commit()
            assert resumed.wait_for(has_all([held])) == [held]
            later = write(db, "g-after")
            assert resumed.wait_for(has_all([held, later])) == [held, later]
            fresh = watch(watchers, feed)
            eventually(lambda: feed.subscribers == 2, what="the second watcher")
            last = write(db, "g-last")
            assert fresh.wait_for(has_all([last])) == [last]


# --- retention ----------------------------------------------------------------------


def test_pruning_deletes_a_prefix_and_raises_the_edge_together(db: Database) -> None:
    ids = [write(db) for _ in range(5)]
    age_events(db, ids[2])
    with db.raw() as conn:
        # The clock stepped back: a younger-looking event below an old one goes too.
        conn.execute("UPDATE runtime_events SET committed_at = now() WHERE id = %s", (ids[0],))
        assert prune_events(conn, datetime.now(UTC) - timedelta(hours=1), EVERYTHING) == 3
        assert pruned_through(conn) == ids[2]
    assert db.stored_ids() == ids[3:]


def test_pruning_never_goes_past_the_given_id(db: Database) -> None:
    ids = [write(db) for _ in range(4)]
    with db.raw() as conn:
        assert prune_events(conn, FAR_FUTURE, ids[1]) == 2
        assert pruned_through(conn) == ids[1]
        assert prune_events(conn, FAR_FUTURE, ids[0]) == 0
        assert pruned_through(conn) == ids[1], "the edge never moves back"
    assert db.stored_ids() == ids[2:]


def test_a_pruning_that_fails_deletes_nothing(db: Database) -> None:
    ids = [write(db) for _ in range(3)]
    with db.raw() as conn:
        # Fail the edge's update after the delete has run: both must be undone.
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'edge update refused'; END$$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON runtime_event_retention"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
        with pytest.raises(RuntimeManagerError):
            prune_events(conn, FAR_FUTURE, EVERYTHING)
        assert pruned_through(conn) == 0
        assert db.stored_ids() == ids
        conn.execute("DROP TRIGGER refuse ON runtime_event_retention")
        assert prune_events(conn, FAR_FUTURE, ids[1]) == 2
        assert pruned_through(conn) == ids[1]


@pytest.mark.parametrize(("offset", "replayed"), [(-1, None), (0, [3, 4]), (1, [4])])
def test_a_cursor_at_the_pruning_edge(
    db: Database, watchers: list[Watcher], offset: int, replayed: list[int] | None
) -> None:
    ids = [write(db) for _ in range(5)]
    with db.raw() as conn:
        prune_events(conn, FAR_FUTURE, ids[2])
    cursor = ids[2] + offset
    with running_feed(db) as feed:
        watcher = watch(watchers, feed, WatchRequest(since=cursor))
        if replayed is None:
            ended = watcher.wait_ended()
            assert (ended.kind, ended.cursor) == ("cursor_expired", cursor)
            assert watcher.ids == []
        else:
            expected = [ids[i] for i in replayed]
            assert watcher.wait_for(has_all(expected)) == expected
            newer = write(db)
            assert watcher.wait_for(has_all([*expected, newer])) == [*expected, newer]


def test_watchers_are_ended_when_retention_passes_the_feed(
    db: Database, watchers: list[Watcher]
) -> None:
    """Another replica pruned events this feed had not read: end, never skip."""
    first = write(db)
    with running_feed(db) as feed:
        watcher = watch(watchers, feed)
        eventually(lambda: feed.subscribers == 1, what="the watcher")
        with db.uow() as work:
            lost = append_now(work, "g-lost")
            prune_events(work.connection, FAR_FUTURE, EVERYTHING)
            work.commit()
        ended = watcher.wait_ended()
        assert (ended.kind, ended.cursor) == ("too_slow", first)
        resumed = watch(watchers, feed, WatchRequest(since=ended.cursor))
        assert resumed.wait_ended().kind == "cursor_expired"
        after = write(db)
        fresh = watch(watchers, feed, WatchRequest(since=lost))
        assert fresh.wait_for(has_all([after])) == [after]


# --- what an event says about its operation ----------------------------------------


def test_events_carry_their_operations_source_ref_and_parent_live_and_replayed(
    db: Database, watchers: list[Watcher]
) -> None:
    def described(events: list[RuntimeEvent]) -> list[tuple[object, ...]]:
        return [(e.op_kind, e.source_ref, e.parent_op_kind, e.parent_operation_id) for e in events]

    with running_feed(db) as feed:
        live = watch(watchers, feed)
        eventually(lambda: feed.subscribers == 1, what="the live watcher")
        # A restart as the recorder writes it: its id drawn first, its inner
        # stop committed (with its event), then its own row and event.
        with db.uow() as work:
            outer_id = work.operations.reserve_id()
        with db.uow() as work:
            inner = work.operations.append(
                replace(
                    entry("g"),
                    op_kind=OpKind.STOP,
                    source_ref="corr-1",
                    parent_op_kind=OpKind.RESTART,
                    parent_operation_id=outer_id,
                )
            )
            work.events.append(inner, record("g"))
            work.commit()
        with db.uow() as work:
            outer = work.operations.append(
                replace(entry("g"), op_kind=OpKind.RESTART, source_ref="corr-1"),
                reserved_id=outer_id,
            )
            work.events.append(outer, record("g"))
            work.commit()
        write(db)  # a plain start: no source_ref, no parent
        expected = [
            (OpKind.STOP, "corr-1", OpKind.RESTART, outer_id),
            (OpKind.RESTART, "corr-1", None, 0),
            (OpKind.START, "", None, 0),
        ]
        live.wait_for(lambda ids: len(ids) >= 3)
        assert described(live.events) == expected
        assert [e.operation_id for e in live.events[:2]] == [inner.id, outer_id]
        replayed = watch(watchers, feed, WatchRequest(since=0))
        replayed.wait_for(lambda ids: len(ids) >= 3)
        assert described(replayed.events) == expected
        assert replayed.ids == live.ids == db.stored_ids()


def test_events_and_the_snapshot_carry_the_node_of_the_record(db: Database) -> None:
    placed = replace(record("g"), node_id="node-7x2k9q4w1e5r8t3y6u0", node_hostname="worker-2")
    with db.uow() as work:
        work.records.upsert(placed)
        work.events.append(work.operations.append(entry("g")), placed)
        work.commit()
    write(db, "h")  # a record of the single host: no node

    with running_feed(db) as feed:
        stored = feed.events_after(0, 10)
        records, _ = feed.snapshot()

    assert [(e.record.node_id, e.record.node_hostname) for e in stored] == [
        ("node-7x2k9q4w1e5r8t3y6u0", "worker-2"),
        ("", ""),
    ]
    assert records == [placed]


# --- the commit that writes the events -----------------------------------------------


def test_events_are_written_by_the_commit_and_discarded_without_one(db: Database) -> None:
    before = db.stored_ids()
    with db.uow() as work:
        work.events.append(work.operations.append(entry("g-gone")), record("g-gone"))
        assert db.stored_ids() == before  # staged: nothing drawn, no lock taken
    assert db.stored_ids() == before
    with db.uow() as work:
        work.events.append(work.operations.append(entry("g-a")), record("g-a"))
        work.events.append(work.operations.append(entry("g-b")), record("g-b"))
        work.commit()
    assert db.stored_ids() == before + work.committed_event_ids
    assert len(work.committed_event_ids) == 2
    assert work.committed_event_ids == sorted(work.committed_event_ids)


def test_a_commit_whose_event_cannot_be_written_commits_nothing(db: Database) -> None:
    """The event's statement fails inside the commit's pipeline (its lock wait
    outlasts the statement timeout): the COMMIT behind it is not applied, the
    error is the unit of work's, and the connection serves the next one."""
    before = db.stored_ids()
    with (
        contextlib.closing(create_pool(db.dsn, db.schema, max_size=1, timeout=10)) as one,
        db.raw() as holder,
    ):
        units = PostgresUnitOfWorkFactory(one)  # every unit of work on the same connection
        with holder.transaction():
            holder.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('rtmanager.events:' || %s, 0))",
                (db.schema,),
            )
            with (
                pytest.raises(ServiceUnavailable, match="timed out"),
                units(timeout=timedelta(milliseconds=300)) as work,
            ):
                work.records.upsert(record("g-failed"))
                work.events.append(work.operations.append(entry("g-failed")), record("g-failed"))
                work.commit()
        with units() as work:
            work.events.append(work.operations.append(entry("g-next")), record("g-next"))
            work.commit()
        [after] = work.committed_event_ids
    with db.raw() as conn:
        rows = conn.execute(
            "SELECT (SELECT count(*) FROM runtime_records WHERE game_id = 'g-failed'),"
            " (SELECT count(*) FROM operation_log WHERE game_id = 'g-failed')"
        ).fetchone()
    assert rows == (0, 0)
    assert db.stored_ids() == [*before, after]


# --- order under concurrent writers -------------------------------------------------


def test_concurrent_writers_reach_every_watcher_once_in_id_order(
    db: Database, watchers: list[Watcher]
) -> None:
    writers, per_writer = 4, 40
    with running_feed(db) as feed:
        live = watch(watchers, feed)
        eventually(lambda: feed.subscribers == 1, what="the live watcher")
        start = threading.Barrier(writers + 1)
        failures: list[BaseException] = []

        def writer(n: int) -> None:
            start.wait()
            try:
                for i in range(per_writer):
                    with db.uow() as work:
                        if i % 5 == 4:  # every fifth draws an id and rolls back: a gap
                            append_now(work, f"g{n}")
                        else:  # as the recorder does: the event goes with the commit
                            stored = work.operations.append(entry(f"g{n}"))
                            work.events.append(stored, record(f"g{n}"))
                            work.commit()
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        start.wait()
        # A resume while the writers run: replay hands over to the live queue.
        resumed = watch(watchers, feed, WatchRequest(since=0))
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        stored = db.stored_ids()
        assert len(stored) == writers * per_writer * 4 // 5
        for watcher in (live, resumed):
            assert watcher.wait_for(has_all(stored)) == stored
        write(db)
        final = db.stored_ids()
        for watcher in (live, resumed):
            assert watcher.wait_for(has_all(final)) == final


# --- telemetry ----------------------------------------------------------------------


def test_the_subscriber_gauge_follows_watchers_coming_and_going(db: Database) -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]).get_meter("test"))

    def gauge() -> int:
        data = reader.get_metrics_data()
        assert data is not None
        return sum(
            int(getattr(point, "value", 0))
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "rtmanager_watch_subscribers"
            for point in metric.data.data_points
        )

    async def come_and_go(feed: PostgresRuntimeFeed) -> None:
        first, second = await feed.subscribe(), await feed.subscribe()
        assert gauge() == 2
        feed.unsubscribe(first)
        feed.unsubscribe(first)
        assert (gauge(), feed.subscribers) == (1, 1)
        feed.unsubscribe(second)
        assert gauge() == 0

    with running_feed(db, telemetry=telemetry) as feed:
        asyncio.run(come_and_go(feed))


# --- PostgreSQL restarted under connected watchers ----------------------------------


@pytest.fixture
def private_db() -> Iterator[tuple[PrivatePostgres, Database]]:
    with private_postgres() as server, migrated(server.dsn, "rtm") as database:
        yield server, database


def write_through_outage(db: Database, game_id: str) -> None:
    """Commit one change, retrying while PostgreSQL is away (as a client would)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            write(db, game_id)
            return
        except RuntimeManagerError:
            # Down, or the commit's outcome is unknown: the table says later.
            assert time.monotonic() < deadline, "PostgreSQL did not come back"
            time.sleep(0.1)


def pause_for_a_while(server: PrivatePostgres) -> None:
    server.pause()
    try:
        time.sleep(3)  # writes and the listener's reads hang meanwhile
    finally:
        server.resume()


FAULTS: dict[str, Callable[[PrivatePostgres], None]] = {
    "restart": lambda server: server.restart("fast"),
    "crash": lambda server: server.restart("immediate"),
    "pause": pause_for_a_while,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_connected_watchers_miss_and_repeat_nothing_across_a_postgres_fault(
    private_db: tuple[PrivatePostgres, Database], watchers: list[Watcher], fault: str
) -> None:
    server, db = private_db
    first = write(db)
    with running_feed(db) as feed:
        live = watch(watchers, feed)
        resumed = watch(watchers, feed, WatchRequest(since=first))
        eventually(lambda: feed.subscribers == 2, what="both watchers")
        stop_writing = threading.Event()

        def keep_writing() -> None:
            n = 0
            while not stop_writing.is_set():
                write_through_outage(db, f"g{n % 7}")
                n += 1
                time.sleep(0.02)

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            before = len(db.stored_ids())
            eventually(lambda: len(db.stored_ids()) > before + 10, what="writes")
            FAULTS[fault](server)
            after = len(db.stored_ids())
            eventually(lambda: len(db.stored_ids()) > after + 10, what="writes after the fault")
        finally:
            stop_writing.set()
            writer.join(90)
        stored = db.stored_ids()
        assert len(stored) > before + 20
        assert live.wait_for(has_all(stored[1:])) == stored[1:]
        assert resumed.wait_for(has_all(stored[1:])) == stored[1:]
        assert live.ended is None and resumed.ended is None, "the watches stayed open"


# --- filters ------------------------------------------------------------------------


def test_each_watcher_is_queued_only_the_events_its_filters_want(
    db: Database, watchers: list[Watcher]
) -> None:
    # Queues of 10 would overflow if the 30 events of another game were
    # queued for the watchers of named games or of stopped runtimes.
    with running_feed(db, queue_capacity=10) as feed:
        of_a = watch(watchers, feed, WatchRequest(game_ids=frozenset({"a"})))
        of_a_b = watch(watchers, feed, WatchRequest(game_ids=frozenset({"a", "b"})))
        of_stopped = watch(
            watchers, feed, WatchRequest(statuses=frozenset({RuntimeStatus.STOPPED}))
        )
        of_running_c = watch(
            watchers,
            feed,
            WatchRequest(game_ids=frozenset({"c"}), statuses=frozenset({RuntimeStatus.RUNNING})),
        )
        eventually(lambda: feed.subscribers == 4, what="the watchers")
        written = {game: [write(db, game) for _ in range(3)] for game in ("a", "b")}
        others = [write(db, "other") for _ in range(30)]
        written["a"].append(write(db, "a"))
        assert of_a.wait_for(has_all(written["a"])) == written["a"]
        both = sorted(written["a"] + written["b"])
        assert of_a_b.wait_for(has_all(both)) == both
        # Nothing was queued for these two (every write is of a running
        # record), yet their bookmarks cover every event.
        newest = max(others + written["a"])
        for watcher in (of_stopped, of_running_c):
            eventually(lambda w=watcher: max(w.bookmarks, default=0) >= newest, what="a bookmark")  # type: ignore[misc]
            assert watcher.ids == []
        for watcher in (of_a, of_a_b, of_stopped, of_running_c):
            assert watcher.ended is None and watcher.error is None
        assert feed.subscribers == 4


def test_reads_of_a_watch_start_go_on_after_the_pooled_connection_broke(db: Database) -> None:
    first = write(db, "g")
    pool = create_pool(db.dsn, db.schema, max_size=1, timeout=10)
    feed = PostgresRuntimeFeed(dsn=db.dsn, schema=db.schema, pool=pool, max_subscribers=5)
    feed.start()
    try:
        pool.wait(timeout=10)

        def break_the_pooled_connection() -> None:
            """What a PostgreSQL restart does to it (borrowing does not probe)."""
            with pool.connection() as conn:
                pid = conn.info.backend_pid
            with db.raw() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

        break_the_pooled_connection()
        _records, newest = feed.snapshot()
        assert newest == first
        break_the_pooled_connection()
        assert [event.id for event in feed.events_after(0, 10)] == [first]
        break_the_pooled_connection()
        feed.check_cursor(first)
    finally:
        feed.stop(10.0)
        pool.close()
