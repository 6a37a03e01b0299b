"""WatchRuntimes: every committed runtime change, in commit order, resumable by cursor.

A watch runs on an asyncio event loop (the gRPC server's). It subscribes to
the feed first (so nothing committed from then on is missed), then
optionally sends a snapshot of the records with the cursor it was taken at,
replays stored events after the starting cursor, and finally follows the
live feed, skipping what it already sent. Live events are filtered by the
feed as it queues them (the watch subscribes with its filters), replayed
ones here. Quiet periods produce bookmarks carrying the
latest cursor. A cursor is the id of the last event covered, as a decimal
string; it stays valid across restarts and replicas until retention prunes
the events after it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.ids import parse_game_id
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import (
    CursorExpired,
    EventFilter,
    FeedClosed,
    RuntimeEvent,
    RuntimeFeed,
    SubscriberOverflow,
    TooManyWatchers,
)

_BACKFILL_BATCH = 500
_MAX_CURSOR_DIGITS = 19
_MAX_GAME_FILTERS = 1000


@dataclass(frozen=True)
class WatchRequest:
    """What a watcher wants: empty filters mean everything."""

    game_ids: frozenset[str] = frozenset()
    statuses: frozenset[RuntimeStatus] = frozenset()
    since: int | None = None
    initial_snapshot: bool = False

    @functools.cached_property
    def filter(self) -> EventFilter:
        """The filters, as the feed applies them when it queues live events."""
        return EventFilter(self.game_ids, self.statuses)

    def wants(self, record: RuntimeRecord) -> bool:
        """Whether a record (after a change) passes the filters."""
        return self.filter.wants(record)


@dataclass(frozen=True)
class SnapshotRecord:
    """One record of the initial snapshot."""

    record: RuntimeRecord


@dataclass(frozen=True)
class SnapshotDone:
    """The snapshot is complete; events follow from `cursor`."""

    cursor: int


@dataclass(frozen=True)
class ChangeEvent:
    """One committed change."""

    event: RuntimeEvent


@dataclass(frozen=True)
class Bookmark:
    """Everything through `cursor` has been sent (or filtered out)."""

    cursor: int


WatchItem = SnapshotRecord | SnapshotDone | ChangeEvent | Bookmark


class WatchEnded(Exception):
    """The watch cannot go on; `kind` says why, `cursor` is the last one covered."""

    def __init__(self, kind: str, message: str, cursor: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.cursor = cursor


def parse_cursor(text: str) -> int | None:
    """A cursor from its text; empty means none. Raises `InvalidRequest` if malformed."""
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_CURSOR_DIGITS:
        raise InvalidRequest(
            "since must be a cursor from an event or bookmark", metadata={"field": "since"}
        )
    return int(text)


def format_cursor(cursor: int) -> str:
    """The text form of a cursor."""
    return str(cursor)


def watch_request(
    game_ids: list[str], statuses: list[RuntimeStatus], since: str, initial_snapshot: bool
) -> WatchRequest:
    """Validate a watch request's fields."""
    if len(game_ids) > _MAX_GAME_FILTERS:
        raise InvalidRequest(
            f"at most {_MAX_GAME_FILTERS} game ids", metadata={"field": "game_ids"}
        )
    for game_id in game_ids:
        parse_game_id(game_id)
    return WatchRequest(
        game_ids=frozenset(game_ids),
        statuses=frozenset(statuses),
        since=parse_cursor(since),
        initial_snapshot=initial_snapshot,
    )


class WatchService:
    """Serves watches from a `RuntimeFeed`, on the event loop the caller runs on."""

    def __init__(self, feed: RuntimeFeed, *, heartbeat: timedelta) -> None:
        self._feed = feed
        self._heartbeat = heartbeat.total_seconds()

    async def watch(self, request: WatchRequest) -> AsyncIterator[WatchItem]:
        """Yield the watch's items until the caller stops; raise `WatchEnded` to end it.

        The caller ends a watch by cancelling the task iterating it (or by
        closing the iterator): the subscription is released at once. The
        feed's blocking reads (snapshot, replay) run in a worker thread.
        """
        try:
            subscription = await self._feed.subscribe(request.filter)
        except TooManyWatchers as error:
            raise WatchEnded("too_many_watchers", str(error)) from None
        except FeedClosed as error:
            raise WatchEnded("unavailable", str(error)) from None
        try:
            if request.initial_snapshot:
                records, cursor = await asyncio.to_thread(self._feed.snapshot)
                for record in records:
                    if request.wants(record):
                        yield SnapshotRecord(record)
                yield SnapshotDone(cursor)
            elif request.since is not None:
                cursor = request.since
                through = subscription.position
                while True:
                    events, last_page = await asyncio.to_thread(self._replay_page, cursor)
                    for event in events:
                        cursor = event.id
                        if request.wants(event.record):
                            yield ChangeEvent(event)
                    if last_page or cursor >= through:
                        break
            else:
                cursor = subscription.position
            while True:
                try:
                    item = await subscription.get(self._heartbeat)
                except SubscriberOverflow:
                    raise WatchEnded(
                        "too_slow",
                        "the watcher fell too far behind; resume from the cursor",
                        cursor,
                    ) from None
                except FeedClosed:
                    raise WatchEnded("unavailable", "the server is shutting down", cursor) from None
                if isinstance(item, int):
                    cursor = max(cursor, item)
                    yield Bookmark(cursor)
                    continue
                # The feed queues only what the filters want; what it skipped
                # is covered by the bookmarks it hands over when quiet.
                if item.id > cursor:
                    cursor = item.id
                    yield ChangeEvent(item)
        finally:
            self._feed.unsubscribe(subscription)

    def _replay_page(self, cursor: int) -> tuple[list[RuntimeEvent], bool]:
        """Stored events after `cursor` (one page) and whether they were the last page.

        The cursor is checked after the page is read, before any of it is
        sent: retention only moves forward and prunes atomically, so if it has
        not passed `cursor` at the check it had not when the page was read, and
        the page is whole. Checked before the read instead, a prune in between
        would make the page skip events silently.
        """
        events = self._feed.events_after(cursor, _BACKFILL_BATCH)
        try:
            self._feed.check_cursor(cursor)
        except CursorExpired as error:
            raise WatchEnded("cursor_expired", str(error), cursor) from None
        return events, len(events) < _BACKFILL_BATCH
