"""The watch use case over a fake feed: ordering, resume, filters, endings."""

from __future__ import annotations

import asyncio
import queue
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.watch import (
    Bookmark,
    ChangeEvent,
    SnapshotDone,
    SnapshotRecord,
    WatchEnded,
    WatchRequest,
    WatchService,
    parse_cursor,
    watch_request,
)
from rtmanager.ports import (
    EVERY_EVENT,
    CursorExpired,
    EventFilter,
    FeedClosed,
    RuntimeEvent,
    SubscriberOverflow,
    TooManyWatchers,
)
from rtmanager.telemetry import Telemetry

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(game_id: str, status: RuntimeStatus = RuntimeStatus.RUNNING) -> RuntimeRecord:
    return RuntimeRecord(
        game_id=game_id,
        status=status,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/s/{game_id}",
        docker_network="n",
        last_op_at=NOW,
        created_at=NOW,
        current_container_id="c",
        current_image_ref="galaxy/e:1.0.0",
        started_at=NOW,
        stopped_at=NOW if status is RuntimeStatus.STOPPED else None,
    )


def event(
    event_id: int, game_id: str = "g", status: RuntimeStatus = RuntimeStatus.RUNNING
) -> RuntimeEvent:
    return RuntimeEvent(
        id=event_id,
        operation_id=event_id,
        op_kind=OpKind.START,
        op_source=OpSource.GM_REST,
        outcome=Outcome.SUCCESS,
        record=record(game_id, status),
        committed_at=NOW,
    )


class FakeSubscription:
    def __init__(self, position: int, live: list[RuntimeEvent | int | Exception]) -> None:
        self.position = position
        self._live: queue.Queue[RuntimeEvent | int | Exception] = queue.Queue()
        for item in live:
            self._live.put(item)
        self.closed = False
        self.wanted = EVERY_EVENT

    async def get(self, timeout: float) -> RuntimeEvent | int:
        while True:
            item = self._live.get_nowait() if not self._live.empty() else FeedClosed("done")
            if isinstance(item, Exception):
                raise item
            # Like the real feed, hand over only what the watcher subscribed to.
            if isinstance(item, int) or self.wanted.wants(item.record):
                return item

    def close(self) -> None:
        self.closed = True


class FakeFeed:
    def __init__(
        self,
        stored: list[RuntimeEvent],
        subscription: FakeSubscription,
        *,
        records: list[RuntimeRecord] | None = None,
        snapshot_cursor: int = 0,
        expired_below: int = 0,
        full: bool = False,
    ) -> None:
        self.stored = stored
        self.subscription = subscription
        self.records = records or []
        self.snapshot_cursor = snapshot_cursor
        self.expired_below = expired_below
        self.full = full
        self.unsubscribed = False

    async def subscribe(self, wanted: EventFilter = EVERY_EVENT) -> FakeSubscription:
        if self.full:
            raise TooManyWatchers("full")
        self.subscription.wanted = wanted
        return self.subscription

    def unsubscribe(self, subscription: object) -> None:
        self.unsubscribed = True

    def snapshot(self) -> tuple[list[RuntimeRecord], int]:
        return self.records, self.snapshot_cursor

    def events_after(self, after_id: int, limit: int) -> list[RuntimeEvent]:
        return [e for e in self.stored if e.id > after_id][:limit]

    def check_cursor(self, cursor: int) -> None:
        if cursor < self.expired_below:
            raise CursorExpired("old")


def run(feed: FakeFeed, request: WatchRequest) -> tuple[list[object], WatchEnded | None]:
    service = WatchService(feed, heartbeat=timedelta(seconds=1))
    items: list[object] = []

    async def consume() -> WatchEnded | None:
        try:
            async for item in service.watch(request):
                items.append(item)
        except WatchEnded as ended:
            return ended
        return None

    return items, asyncio.run(consume())


def ids(items: list[object]) -> list[int]:
    return [i.event.id for i in items if isinstance(i, ChangeEvent)]


def test_resume_replays_stored_events_then_live_ones_without_repeats() -> None:
    stored = [event(i) for i in range(1, 6)]
    live: list[RuntimeEvent | int | Exception] = [event(4), event(5), event(6), 6]
    feed = FakeFeed(stored, FakeSubscription(position=5, live=live))
    items, ended = run(feed, WatchRequest(since=2))
    assert ids(items) == [3, 4, 5, 6]
    assert items[-1] == Bookmark(6)
    assert ended is not None and ended.kind == "unavailable" and ended.cursor == 6
    assert feed.unsubscribed


def test_snapshot_comes_first_with_its_cursor_then_later_events() -> None:
    feed = FakeFeed(
        [event(1), event(2)],
        FakeSubscription(position=1, live=[event(2), event(3)]),
        records=[record("a"), record("b", RuntimeStatus.STOPPED)],
        snapshot_cursor=2,
    )
    items, _ = run(
        feed, WatchRequest(initial_snapshot=True, statuses=frozenset({RuntimeStatus.RUNNING}))
    )
    assert items[0] == SnapshotRecord(record("a"))
    assert items[1] == SnapshotDone(2)
    assert ids(items) == [3]


def test_filters_drop_other_games_but_the_cursor_still_advances() -> None:
    feed = FakeFeed([], FakeSubscription(position=0, live=[event(1, "x"), event(2, "y"), 2]))
    items, ended = run(feed, WatchRequest(game_ids=frozenset({"y"})))
    assert ids(items) == [2]
    assert ended is not None and ended.cursor == 2


def test_a_slow_watcher_ends_with_its_last_cursor() -> None:
    feed = FakeFeed([], FakeSubscription(position=0, live=[event(1), SubscriberOverflow("slow")]))
    items, ended = run(feed, WatchRequest())
    assert ids(items) == [1]
    assert ended is not None and (ended.kind, ended.cursor) == ("too_slow", 1)


def test_an_expired_cursor_and_a_full_server_end_the_watch() -> None:
    feed = FakeFeed([], FakeSubscription(0, []), expired_below=10)
    _, ended = run(feed, WatchRequest(since=3))
    assert ended is not None and (ended.kind, ended.cursor) == ("cursor_expired", 3)
    _, ended = run(FakeFeed([], FakeSubscription(0, []), full=True), WatchRequest())
    assert ended is not None and ended.kind == "too_many_watchers"


@pytest.mark.parametrize("text", ["abc", "-1", "1.5", "9" * 20, "١٢"])
def test_malformed_cursors_are_invalid(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_cursor(text)


def test_watch_request_validates_game_ids() -> None:
    assert parse_cursor("") is None
    with pytest.raises(InvalidRequest):
        watch_request(["../etc"], [], "", False)
    assert watch_request(["g1"], [RuntimeStatus.STOPPED], "7", True) == WatchRequest(
        frozenset({"g1"}), frozenset({RuntimeStatus.STOPPED}), 7, True
    )


class PruningFeed(FakeFeed):
    """Retention prunes through `through` just before the `at`-th page is read."""

    def __init__(self, stored: list[RuntimeEvent], *, at: int, through: int, position: int) -> None:
        super().__init__(stored, FakeSubscription(position, []))
        self._reads = 0
        self._at = at
        self._through = through

    def events_after(self, after_id: int, limit: int) -> list[RuntimeEvent]:
        self._reads += 1
        if self._reads == self._at:
            self.stored = [e for e in self.stored if e.id > self._through]
            self.expired_below = self._through
        return super().events_after(after_id, limit)


def test_a_prune_before_the_first_replay_page_ends_the_watch_instead_of_skipping() -> None:
    feed = PruningFeed([event(i) for i in range(1, 6)], at=1, through=4, position=5)
    items, ended = run(feed, WatchRequest(since=2))
    assert ids(items) == []
    assert ended is not None and (ended.kind, ended.cursor) == ("cursor_expired", 2)


def test_a_prune_between_replay_pages_ends_the_watch_at_the_last_whole_page() -> None:
    feed = PruningFeed([event(i) for i in range(1, 1201)], at=2, through=700, position=1200)
    items, ended = run(feed, WatchRequest(since=0))
    assert ids(items) == list(range(1, 501))
    assert ended is not None and (ended.kind, ended.cursor) == ("cursor_expired", 500)


def test_replay_runs_through_every_page_up_to_the_subscription_position() -> None:
    stored = [event(i) for i in range(1, 1201)]
    feed = FakeFeed(stored, FakeSubscription(position=1200, live=[event(1200), event(1201)]))
    items, _ = run(feed, WatchRequest(since=100))
    assert ids(items) == list(range(101, 1202))


def test_the_subscriber_gauge_goes_down_when_watchers_leave() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(MeterProvider(metric_readers=[reader]).get_meter("test"))

    def subscribers() -> int:
        data = reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "rtmanager_watch_subscribers":
                        return sum(int(getattr(p, "value", 0)) for p in metric.data.data_points)
        raise AssertionError("no rtmanager_watch_subscribers metric")

    telemetry.watch_subscribed()
    telemetry.watch_subscribed()
    assert subscribers() == 2
    telemetry.watch_unsubscribed()
    assert subscribers() == 1
    telemetry.watch_unsubscribed()
    assert subscribers() == 0


def test_a_cancelled_watch_unsubscribes_at_once() -> None:
    class Waiting(FakeSubscription):
        async def get(self, timeout: float) -> RuntimeEvent | int:
            await asyncio.Event().wait()  # nothing ever comes
            raise AssertionError("unreachable")

    feed = FakeFeed([], Waiting(position=0, live=[]))
    service = WatchService(feed, heartbeat=timedelta(seconds=1))

    async def watch_then_cancel() -> None:
        async def consume() -> None:
            async for _ in service.watch(WatchRequest()):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert not feed.unsubscribed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert feed.unsubscribed

    asyncio.run(watch_then_cancel())
