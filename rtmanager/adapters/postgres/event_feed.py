"""`RuntimeFeed` on PostgreSQL: one listener per process fans events out to watchers.

The listener thread LISTENs on the schema's channel on a dedicated
connection and, on every notification (and at least every
`poll_interval`, so a lost notification only delays), reads the events after
the last one it dispatched, in id order, and hands each to every
subscriber's bounded queue. A subscriber whose queue is full is marked
overflowed and gets nothing more: the watch ends with its last delivered
cursor instead of skipping silently. Changes made through any replica reach
every replica's watchers, because they all read the same table.

What makes it exact (the writer's protocol is in `events.py`):

- the start position is `committed_position`: no event at or below it can
  still commit, so nothing committed after start-up is below the position;
- each read of "the events after the position" is a READ COMMITTED
  statement, which sees a gap-free prefix of the committed events, and the
  position only moves to an event so read;
- after each read the feed checks that retention has not passed its
  position (retention may be run by another replica): if it has, events may
  be missing from the read, so every current watcher is ended as if it
  overflowed (it resumes from its cursor and is told the cursor expired)
  rather than skipping them;
- a lost connection (PostgreSQL restarted, say) is re-opened with backoff
  and the feed reads on from its position: watchers stay subscribed and
  miss nothing.

Retention runs on the same thread: events older than `retention` are pruned
once a minute, never past the position this feed has dispatched.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from datetime import timedelta

import psycopg
from psycopg import sql

from rtmanager.adapters.postgres.events import (
    channel_name,
    check_cursor,
    committed_position,
    events_after,
    prune_events,
    pruned_through,
    read_snapshot,
)
from rtmanager.adapters.postgres.pool import Pool, connect_kwargs, session_setup
from rtmanager.backoff import Backoff
from rtmanager.domain.errors import RuntimeManagerError
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.domain.timeutil import utc_now
from rtmanager.ports import (
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
    """One watcher's queue; filled by the listener thread under the feed's lock."""

    def __init__(self, position: int, capacity: int, lock: threading.Lock) -> None:
        # One slot more than the capacity, for the wake-up token of close().
        self._queue: queue.Queue[RuntimeEvent | None] = queue.Queue(maxsize=capacity + 1)
        self._capacity = capacity
        self._start = position
        self._dispatched = position
        self._lock = lock
        self.overflowed = False
        self.closed = False

    @property
    def position(self) -> int:
        return self._start

    def offer(self, event: RuntimeEvent) -> None:
        """Queue an event (caller holds the feed's lock)."""
        if self.overflowed or self.closed:
            return
        if self._queue.qsize() >= self._capacity:
            self.overflow()
            return
        self._queue.put_nowait(event)

    def overflow(self) -> None:
        """Give this watcher nothing more: once its queue is drained, `get` raises
        `SubscriberOverflow` (caller holds the feed's lock)."""
        self.overflowed = True
        self._wake()

    def close(self) -> None:
        """End the watch: wake its reader, which then raises `FeedClosed`."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def advance(self, position: int) -> None:
        """Note how far the feed has dispatched (caller holds the feed's lock)."""
        self._dispatched = position

    def get(self, timeout: float) -> RuntimeEvent | int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                # What was queued before an overflow or close is delivered first.
                wait = (
                    0 if (self.overflowed or self.closed) else max(deadline - time.monotonic(), 0)
                )
                item = self._queue.get(timeout=wait)
                if item is not None:
                    return item
                continue  # a wake-up token: look at the flags again
            except queue.Empty:
                if self.overflowed:
                    raise SubscriberOverflow("the watcher fell too far behind") from None
                if self.closed:
                    raise FeedClosed("the server is shutting down") from None
            with self._lock:
                # Read together: nothing queued means everything dispatched
                # up to here has been handed over.
                if self._queue.empty():
                    return self._dispatched


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
        self._subscribers: set[_Subscription] = set()
        self._lock = threading.Lock()
        self._position = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- RuntimeFeed -----------------------------------------------------------------

    def subscribe(self) -> _Subscription:
        """Register a watcher at the feed's current position."""
        if not self._ready.wait(self._timeout):
            raise FeedClosed("the event feed is not connected to PostgreSQL")
        with self._lock:
            if self._stop.is_set():
                raise FeedClosed("the server is shutting down")
            if len(self._subscribers) >= self._max_subscribers:
                raise TooManyWatchers(
                    f"this server already serves {self._max_subscribers} watchers"
                )
            subscription = _Subscription(self._position, self._capacity, self._lock)
            self._subscribers.add(subscription)
            self._telemetry.watch_subscribed()
            return subscription

    def unsubscribe(self, subscription: object) -> None:
        """Forget a watcher (a second call for the same one does nothing)."""
        if not isinstance(subscription, _Subscription):
            return
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.discard(subscription)
                self._telemetry.watch_unsubscribed()

    @property
    def subscribers(self) -> int:
        """How many watchers are registered."""
        with self._lock:
            return len(self._subscribers)

    def snapshot(self) -> tuple[list[RuntimeRecord], int]:
        """Every record and the newest event id, from one consistent snapshot."""
        return read_snapshot(self._pool, self._timeout)

    def events_after(self, after_id: int, limit: int) -> list[RuntimeEvent]:
        """Stored events after `after_id`, in id order."""
        with self._pool.connection(timeout=self._timeout) as conn:
            return events_after(conn, after_id, limit)

    def check_cursor(self, cursor: int) -> None:
        """Raise `CursorExpired` / `InvalidRequest` for a cursor that cannot resume."""
        with self._pool.connection(timeout=self._timeout) as conn:
            check_cursor(conn, cursor)

    # -- the listener thread ---------------------------------------------------------

    def start(self) -> None:
        """Start the listener thread."""
        self._thread = threading.Thread(target=self._run, name="event-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop listening and end every watcher's stream."""
        self._stop.set()
        with self._lock:
            for subscription in self._subscribers:
                subscription.close()
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
            events = events_after(conn, self._position, _BATCH)
            # Read after the page: if retention has not passed the position
            # now, it had not when the page was read, so the page is whole.
            edge = pruned_through(conn)
            with self._lock:
                if edge > self._position:
                    self._lost_to_retention(edge)
                    continue
                for event in events:
                    for subscription in self._subscribers:
                        subscription.offer(event)
                    self._position = event.id
                for subscription in self._subscribers:
                    subscription.advance(self._position)
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
        for subscription in self._subscribers:
            subscription.overflow()
        self._position = edge

    def _prune(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        # Never past what this feed has dispatched: its own retention cannot
        # take an event away from its watchers.
        pruned = prune_events(conn, utc_now() - self._retention, self._position)
        if pruned:
            log.info("pruned runtime events", extra={"count": pruned})
