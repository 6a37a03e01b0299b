"""`RuntimeFeed` on PostgreSQL: one listener per process fans events out to watchers.

The listener thread LISTENs on the schema's channel on a dedicated
connection and, on every notification (and at least every
`poll_interval`, so a lost notification only delays), reads the events after
the last one it dispatched, in id order. Watchers live on asyncio event
loops (the gRPC server's): the listener hands each batch of events to each
loop that has watchers once, with one `call_soon_threadsafe`, and the loop
offers every event to the bounded queue of each of its watchers whose
filter wants it (watchers of named games are found through an index by game
id, so an event costs nothing for watchers of other games). Every queue gets
the same `RuntimeEvent` object, so whatever is derived from an event once
(its wire bytes, say) serves all its watchers. A subscriber whose queue is
full is marked overflowed and gets nothing more: the watch ends with its
last delivered cursor instead of skipping silently. Batches, overflows and
closes reach a loop in the order the listener made them.

Changes made through any replica reach every replica's watchers, because
they all read the same table.

What makes it exact (the writer's protocol is in `events.py`):

- the start position is `committed_position`: no event at or below it can
  still commit, so nothing committed after start-up is below the position;
- each read of "the events after the position" is a READ COMMITTED
  statement, which sees a gap-free prefix of the committed events, and the
  position only moves to an event so read;
- each read also returns the retention edge, from the same statement and
  so the same snapshot (a pruning is one transaction), and the feed checks
  that retention has not passed its position (retention may be run by
  another replica): if it has, events may be missing from the read, so
  every current watcher is ended as if it overflowed (it resumes from its
  cursor and is told the cursor expired) rather than skipping them;
- a lost connection (PostgreSQL restarted, say) is re-opened with backoff
  and the feed reads on from its position: watchers stay subscribed and
  miss nothing.

Retention runs on the same thread: events older than `retention` are pruned
once a minute, never past the position this feed has dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import psycopg
from psycopg import sql

from rtmanager.adapters.postgres.events import (
    channel_name,
    check_cursor,
    committed_position,
    events_after,
    events_after_with_edge,
    prune_events,
    read_snapshot,
)
from rtmanager.adapters.postgres.pool import Pool, connect_kwargs, read_on_pool, session_setup
from rtmanager.backoff import Backoff
from rtmanager.domain.errors import RuntimeManagerError
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.domain.timeutil import utc_now
from rtmanager.ports import (
    EVERY_EVENT,
    EventFilter,
    FeedClosed,
    RuntimeEvent,
    SubscriberOverflow,
    TooManyWatchers,
)
from rtmanager.telemetry import Telemetry

log = logging.getLogger(__name__)

_RECONNECT = Backoff(timedelta(milliseconds=500), timedelta(seconds=10))

_BATCH = 500
_PRUNE_EVERY = 60.0


class _Subscription:
    """One watcher's queue of the events it wants, on its event loop.

    Filled by its loop's `_LoopFeed` (never by another thread), so it needs
    no lock: at most one watcher task waits on it.

    A wait costs one future. The heartbeat's timer is not made per wait:
    one timer, armed at a wait's deadline, serves every wait until it fires,
    so a busy watcher arms about one per `timeout` instead of one per event.
    A wait woken by a timer armed for an earlier deadline waits on.
    """

    def __init__(self, hub: _LoopFeed, wanted: EventFilter, capacity: int) -> None:
        self.hub = hub
        self._items: deque[RuntimeEvent] = deque()
        self._capacity = capacity
        self._start = hub.position
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.wanted = wanted
        self.overflowed = False
        self.closed = False

    @property
    def position(self) -> int:
        return self._start

    def offer(self, event: RuntimeEvent) -> None:
        """Queue an event; past `capacity` waiting events, overflow instead."""
        if self.overflowed or self.closed:
            return
        if len(self._items) >= self._capacity:
            self.overflow()
            return
        self._items.append(event)
        self._wake()

    def overflow(self) -> None:
        """Give this watcher nothing more: once its queue is drained, `get` raises
        `SubscriberOverflow`."""
        self.overflowed = True
        self._wake()

    def close(self) -> None:
        """End the watch: once its queue is drained, `get` raises `FeedClosed`."""
        self.closed = True
        self._wake()

    def release(self) -> None:
        """Drop the heartbeat's timer (the watcher is gone)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float) -> RuntimeEvent | int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # What was queued before an overflow or close is delivered first.
            if self._items:
                return self._items.popleft()
            if self.overflowed:
                raise SubscriberOverflow("the watcher fell too far behind")
            if self.closed:
                raise FeedClosed("the server is shutting down")
            if loop.time() >= deadline:
                # Nothing queued: every wanted event dispatched to this loop
                # so far has been handed over.
                return self.hub.position
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._heartbeat_due)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _heartbeat_due(self) -> None:
        self._timer = None
        self._wake()


class _Subscribers:
    """The registered watchers of one loop, indexed for dispatch.

    A watcher whose filter names games is found through each of them; the
    others are offered every event. Statuses are checked per watcher.
    """

    def __init__(self) -> None:
        self.all: set[_Subscription] = set()
        self._every_game: set[_Subscription] = set()
        self._by_game: dict[str, set[_Subscription]] = {}

    def __len__(self) -> int:
        return len(self.all)

    def __contains__(self, subscription: object) -> bool:
        return subscription in self.all

    def add(self, subscription: _Subscription) -> None:
        self.all.add(subscription)
        if not subscription.wanted.game_ids:
            self._every_game.add(subscription)
        for game_id in subscription.wanted.game_ids:
            self._by_game.setdefault(game_id, set()).add(subscription)

    def remove(self, subscription: _Subscription) -> None:
        self.all.discard(subscription)
        self._every_game.discard(subscription)
        for game_id in subscription.wanted.game_ids:
            watchers = self._by_game.get(game_id)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._by_game[game_id]

    def offer(self, event: RuntimeEvent) -> None:
        """Queue `event` for every watcher that wants it."""
        status = event.record.status
        for watchers in (self._every_game, self._by_game.get(event.record.game_id, ())):
            for subscription in watchers:
                statuses = subscription.wanted.statuses
                if not statuses or status in statuses:
                    subscription.offer(event)


class _LoopFeed:
    """The feed's side on one event loop: its watchers and how far it has dispatched.

    The listener thread hands each batch of events to the loop once
    (`deliver`, through `call_soon_threadsafe`); the loop offers it to its
    watchers there. Everything here runs on that loop, in the order the
    listener handed it over.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, position: int) -> None:
        self.loop = loop
        self.position = position
        self.subscribers = _Subscribers()

    def deliver(self, events: list[RuntimeEvent]) -> None:
        for event in events:
            self.subscribers.offer(event)
        self.position = events[-1].id

    def overflow_all(self, position: int) -> None:
        for subscription in self.subscribers.all:
            subscription.overflow()
        self.position = position

    def close_all(self) -> None:
        for subscription in self.subscribers.all:
            subscription.close()

    def call(self, callback: Callable[..., None], *args: object) -> None:
        """Run `callback(*args)` on the loop (from any thread); a closed loop has no watchers."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)


class PostgresRuntimeFeed:
    """The event feed of one process (see the module docstring)."""

    def __init__(
        self,
        *,
        dsn: str,
        schema: str,
        pool: Pool,
        max_subscribers: int,
        queue_capacity: int = 1000,
        poll_interval: timedelta = timedelta(seconds=1),
        retention: timedelta = timedelta(days=7),
        timeout: timedelta = timedelta(seconds=10),
        telemetry: Telemetry | None = None,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pool = pool
        self._max_subscribers = max_subscribers
        self._capacity = queue_capacity
        self._poll = poll_interval.total_seconds()
        self._retention = retention
        self._timeout = timeout.total_seconds()
        self._telemetry = telemetry or Telemetry()
        # The loops that have watchers, and how many watchers in all.
        self._loops: dict[asyncio.AbstractEventLoop, _LoopFeed] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._position = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- RuntimeFeed -----------------------------------------------------------------

    async def subscribe(self, wanted: EventFilter = EVERY_EVENT) -> _Subscription:
        """Register a watcher of the events `wanted` passes, on the running loop, at
        the position dispatched to that loop."""
        if not self._ready.is_set() and not await asyncio.to_thread(
            self._ready.wait, self._timeout
        ):
            raise FeedClosed("the event feed is not connected to PostgreSQL")
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stop.is_set():
                raise FeedClosed("the server is shutting down")
            if self._count >= self._max_subscribers:
                raise TooManyWatchers(
                    f"this server already serves {self._max_subscribers} watchers"
                )
            hub = self._loops.get(loop)
            if hub is None:
                # From here on every batch dispatched after `_position` goes to this loop.
                hub = self._loops[loop] = _LoopFeed(loop, self._position)
            self._count += 1
        subscription = _Subscription(hub, wanted, self._capacity)
        hub.subscribers.add(subscription)
        self._telemetry.watch_subscribed()
        return subscription

    def unsubscribe(self, subscription: object) -> None:
        """Forget a watcher (a second call for the same one does nothing)."""
        if not isinstance(subscription, _Subscription):
            return
        hub = subscription.hub
        if subscription not in hub.subscribers:
            return
        hub.subscribers.remove(subscription)
        subscription.release()
        with self._lock:
            self._count -= 1
            if not hub.subscribers and self._loops.get(hub.loop) is hub:
                del self._loops[hub.loop]
        self._telemetry.watch_unsubscribed()

    @property
    def subscribers(self) -> int:
        """How many watchers are registered."""
        with self._lock:
            return self._count

    def snapshot(self) -> tuple[list[RuntimeRecord], int]:
        """Every record and the newest event id, from one consistent snapshot."""
        return read_on_pool(self._pool, read_snapshot, timeout=self._timeout)

    def events_after(self, after_id: int, limit: int) -> list[RuntimeEvent]:
        """Stored events after `after_id`, in id order."""
        return read_on_pool(
            self._pool, lambda conn: events_after(conn, after_id, limit), timeout=self._timeout
        )

    def check_cursor(self, cursor: int) -> None:
        """Raise `CursorExpired` / `InvalidRequest` for a cursor that cannot resume."""
        read_on_pool(self._pool, lambda conn: check_cursor(conn, cursor), timeout=self._timeout)

    # -- the listener thread ---------------------------------------------------------

    def start(self) -> None:
        """Start the listener thread."""
        self._thread = threading.Thread(target=self._run, name="event-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop listening and end every watcher's stream."""
        with self._lock:
            self._stop.set()
            for hub in self._loops.values():
                hub.call(hub.close_all)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        failures = 0
        next_prune = 0.0
        while not self._stop.is_set():
            try:
                options = connect_kwargs(connect_timeout=5, application_name="rtmanager-feed")
                with psycopg.connect(self._dsn, autocommit=True, **options) as conn:
                    session_setup(conn, self._schema)
                    conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(self._schema)))
                    )
                    if not self._ready.is_set():
                        self._position = committed_position(conn, self._timeout)
                        self._ready.set()
                    failures = 0
                    while not self._stop.is_set():
                        self._dispatch(conn)
                        if time.monotonic() >= next_prune:
                            self._prune(conn)
                            next_prune = time.monotonic() + _PRUNE_EVERY
                        # Wake on the first notification or after the poll interval.
                        for _ in conn.notifies(timeout=self._poll, stop_after=1):
                            pass
            except (psycopg.Error, RuntimeManagerError) as error:
                failures += 1
                log.warning(
                    "event feed lost PostgreSQL; reconnecting",
                    extra={"problem": str(error), "failures": failures},
                )
            except Exception:
                failures += 1
                log.exception("event feed failed; reconnecting")
            if self._stop.wait(_RECONNECT.delay(failures)):
                return

    def _dispatch(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        while True:
            # The page and the retention edge in one statement (one snapshot,
            # one round trip): if retention had not passed the position in
            # it, the page is whole.
            events, edge = events_after_with_edge(conn, self._position, _BATCH)
            with self._lock:
                if edge > self._position:
                    self._lost_to_retention(edge)
                    continue
                if events:
                    # Once per batch and loop, not per watcher: the loop fans it out.
                    for hub in self._loops.values():
                        hub.call(hub.deliver, events)
                    self._position = events[-1].id
            if len(events) < _BATCH:
                return

    def _lost_to_retention(self, edge: int) -> None:
        """Retention (of another replica) deleted events this feed had not read yet.

        The current watchers may have missed some: end each of them at its
        last delivered cursor (which then reads as expired) instead of
        skipping; new watchers start at the edge. Caller holds the lock.
        """
        log.warning(
            "event retention passed the feed's position; ending its watchers",
            extra={"position": self._position, "pruned_through": edge},
        )
        for hub in self._loops.values():
            hub.call(hub.overflow_all, edge)
        self._position = edge

    def _prune(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        # Never past what this feed has dispatched: its own retention cannot
        # take an event away from its watchers.
        pruned = prune_events(conn, utc_now() - self._retention, self._position)
        if pruned:
            log.info("pruned runtime events", extra={"count": pruned})
