"""The watch feed's port: the committed record changes, filtered and handed to
each watcher on its event loop."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Protocol

from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports.storage import RuntimeEvent


class CursorExpired(Exception):
    """A watch cursor older than the feed's retention."""


@dataclass(frozen=True)
class EventFilter:
    """Which changes a watcher wants: empty sets mean every game, every status."""

    game_ids: frozenset[str] = frozenset()
    statuses: frozenset[RuntimeStatus] = frozenset()

    def wants(self, record: RuntimeRecord) -> bool:
        """Whether a record (after a change) passes the filter."""
        return (not self.game_ids or record.game_id in self.game_ids) and (
            not self.statuses or record.status in self.statuses
        )


EVERY_EVENT = EventFilter()


class Subscription(Protocol):
    """One watcher's live view of the feed: the events it wants, in id order, as
    they commit.

    A subscription belongs to the asyncio event loop it was made on: `get`
    and `close` are called there, and the feed hands it events there.
    """

    @property
    def position(self) -> int:
        """The newest event id the feed had dispatched when this watcher subscribed."""
        ...

    async def get(self, timeout: float) -> RuntimeEvent | int:
        """The next wanted event, or, after `timeout` seconds without one, a
        bookmark: the id through which every dispatched event has been handed
        over or was not wanted.

        Raises `SubscriberOverflow` when the watcher fell too far behind and
        `FeedClosed` when the feed is shutting down or the watch was closed.
        """
        ...

    def close(self) -> None:
        """End this watch (on its event loop): a waiting `get` raises `FeedClosed` at once."""
        ...


class SubscriberOverflow(Exception):
    """The watcher did not keep up; events were not queued for it."""


class FeedClosed(Exception):
    """The feed is shutting down."""


class TooManyWatchers(Exception):
    """The process already serves as many watchers as configured."""


class RuntimeFeed(Protocol):
    """The durable, ordered stream of committed runtime changes (WatchRuntimes)."""

    async def subscribe(self, wanted: EventFilter = EVERY_EVENT) -> Subscription:
        """Register a watcher of the events `wanted` passes (filtered as they are
        queued, not by the watcher) on the running event loop; raise
        `TooManyWatchers` at the configured bound, `FeedClosed` when shutting down.

        The same `RuntimeEvent` object is handed to every watcher of an event.
        """
        ...

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a watcher (on its event loop; a second call does nothing)."""
        ...

    # The reads below block on the database: call them off the event loop.

    def snapshot(self) -> tuple[builtins.list[RuntimeRecord], int]:
        """Every record and the newest event id, read in one consistent snapshot."""
        ...

    def events_after(self, after_id: int, limit: int) -> builtins.list[RuntimeEvent]:
        """Up to `limit` stored events with id > `after_id`, in id order."""
        ...

    def check_cursor(self, cursor: int) -> None:
        """Raise `CursorExpired` when events after `cursor` were already pruned,
        `InvalidRequest` when the cursor was never issued."""
        ...
