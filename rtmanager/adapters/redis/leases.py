"""Per-game leases in Redis: `SET NX PX` to take, token-checked scripts to keep or drop.

One key per game, `{prefix}lease:game:{game_id}`, holding the token of its
holder: `{instance_id}/{random}`, the holder's `RTMANAGER_INSTANCE_ID` and
an unguessable part (just the random part when no instance id is given).
Only the holder of the whole token can renew or release the lease, so a
holder whose lease expired and was taken over can never extend or delete the
new holder's lease; the instance id only tells operators who holds a game.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

import redis

from rtmanager.adapters.redis.client import DELETE_IF_OURS, RENEW_IF_OURS, UNAVAILABLE_ERRORS
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.domain.explanation import LeaseHolder
from rtmanager.ports import Lease

if TYPE_CHECKING:
    from rtmanager.ports import GameLeases

_ONE_MICROSECOND = timedelta(microseconds=1)
# Between the holder's instance id and the random part of a lease token.
HOLDER_SEPARATOR = "/"


class RedisGameLeases:
    """`GameLeases` on Redis, safe across threads, processes and replicas.

    `prefix` namespaces every key (`RTMANAGER_REDIS_PREFIX`); `instance_id`
    (`RTMANAGER_INSTANCE_ID`) is written into the token of every lease taken
    here. Every method raises `ServiceUnavailable` when Redis is unreachable
    or times out.

    A lease whose `acquire` call timed out may have been taken anyway (a
    paused Redis runs the queued SET when it resumes) under a token nobody
    holds, which would block the game for a whole TTL. The tokens of such
    attempts are remembered, every one of them (two operations of one game
    may time out at once, and either SET may be the one that lands): the
    next `acquire` of that game adopts the lease if one of them holds it,
    and any later successful call drops the other games' leftovers by
    compare-and-delete.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "", instance_id: str = "") -> None:
        self._client = client
        self._prefix = prefix
        self._token_head = f"{instance_id}{HOLDER_SEPARATOR}" if instance_id else ""
        self._renew = client.register_script(RENEW_IF_OURS)
        self._release = client.register_script(DELETE_IF_OURS)
        # Tokens of acquires that failed without an answer, by game id.
        self._unanswered: dict[str, list[str]] = {}
        self._unanswered_lock = threading.Lock()

    def key(self, game_id: str) -> str:
        """Return the Redis key of a game's lease."""
        return f"{self._prefix}lease:game:{game_id}"

    def acquire(self, game_id: str, ttl: timedelta) -> Lease | None:
        """Take the game's lease for `ttl`; return None when another holder has it.

        Raises `ValueError` for a ttl that is not positive.
        """
        ttl_ms = _ttl_milliseconds(ttl)
        key = self.key(game_id)
        with self._unanswered_lock:
            earlier = self._unanswered.pop(game_id, [])
        # Reusing the token of an unanswered attempt makes a SET of it that
        # landed after all ours now.
        tokens = earlier or [self._token_head + secrets.token_urlsafe(24)]
        try:
            with self._unavailable_as_error("acquire", game_id):
                if self._client.set(key, tokens[0], nx=True, px=ttl_ms):
                    lease = Lease(game_id=game_id, token=tokens[0])
                # The holder may be ours: an unanswered attempt's SET that
                # landed, or the first SET of this call when the client
                # retried it after its connection broke.
                elif (holder := _as_text(self._client.get(key))) in tokens:
                    self._renew(keys=[key], args=[holder, ttl_ms])
                    lease = Lease(game_id=game_id, token=holder)
                else:
                    lease = None
        except ServiceUnavailable:
            with self._unanswered_lock:
                self._unanswered.setdefault(game_id, []).extend(tokens)
            raise
        self._drop_unanswered()
        return lease

    def _drop_unanswered(self) -> None:
        """Delete leftovers of unanswered acquires of other games, best effort.

        Each leftover is taken out of the map before its key is deleted, so
        an acquire of that game running meanwhile uses a fresh token.
        """
        while True:
            with self._unanswered_lock:
                if not self._unanswered:
                    return
                game_id, tokens = self._unanswered.popitem()
            for done, token in enumerate(tokens):
                try:
                    self._release(keys=[self.key(game_id)], args=[token])
                except UNAVAILABLE_ERRORS:
                    with self._unanswered_lock:  # Redis is away again: later
                        self._unanswered.setdefault(game_id, []).extend(tokens[done:])
                    return

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        """Extend a held lease to `ttl` from now; False when it is no longer ours.

        Raises `ValueError` for a ttl that is not positive.
        """
        ttl_ms = _ttl_milliseconds(ttl)
        with self._unavailable_as_error("renew", lease.game_id):
            renewed = self._renew(keys=[self.key(lease.game_id)], args=[lease.token, ttl_ms])
        return bool(renewed)

    def release(self, lease: Lease) -> bool:
        """Release a held lease; False when it was no longer ours (nothing is deleted)."""
        with self._unavailable_as_error("release", lease.game_id):
            released = self._release(keys=[self.key(lease.game_id)], args=[lease.token])
        return bool(released)

    def holder(self, game_id: str) -> LeaseHolder | None:
        """Who holds the game's lease (from its token) and its time left; None when free."""
        key = self.key(game_id)
        with (
            self._unavailable_as_error("read", game_id),
            self._client.pipeline(transaction=True) as pipe,
        ):
            pipe.get(key)
            pipe.pttl(key)
            token, ttl_ms = pipe.execute()
        text = _as_text(token)
        if text is None:
            return None
        ttl = timedelta(milliseconds=ttl_ms) if isinstance(ttl_ms, int) and ttl_ms >= 0 else None
        return LeaseHolder(instance_id=instance_of_token(text), ttl=ttl)

    @contextmanager
    def _unavailable_as_error(self, action: str, game_id: str) -> Iterator[None]:
        try:
            yield
        except UNAVAILABLE_ERRORS as error:
            raise ServiceUnavailable(
                f"redis unavailable: cannot {action} the lease of game {game_id}: "
                f"{type(error).__name__}: {error}",
                metadata={"game_id": game_id, "dependency": "redis"},
            ) from error


def instance_of_token(token: str) -> str:
    """The instance id a lease token names ("" for a token that names none).

    The random part never contains the separator (it is URL-safe base64),
    so an instance id that does is still read whole.
    """
    instance_id, separator, _ = token.rpartition(HOLDER_SEPARATOR)
    return instance_id if separator else ""


def _ttl_milliseconds(ttl: timedelta) -> int:
    """Return `ttl` in whole milliseconds, rounded up; raise `ValueError` unless positive."""
    if ttl <= timedelta(0):
        raise ValueError(f"lease ttl must be positive, got {ttl}")
    microseconds = ttl // _ONE_MICROSECOND
    return max(1, -(-microseconds // 1000))  # ceiling division


def _as_text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


if TYPE_CHECKING:

    def _implements_port(client: redis.Redis) -> GameLeases:
        # mypy checks here that the adapter satisfies the port.
        return RedisGameLeases(client)
