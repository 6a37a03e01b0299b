"""Holding a game's lease for the length of an operation, renewing it as it runs.

`GameLock.hold(game_id)` takes the lease or raises `ConcurrentModification`
(the game is busy), keeps it alive while the operation runs (pulls and slow
stops may outlast the TTL) and releases it by token when the block ends, even
on failure.

A lease can be lost while its operation runs: another holder took it after
it expired (Redis was paused, renewals failed for a whole TTL), or it was
deleted behind our back. `GameLock.check(game_id)` says so: the lifecycles
call it before every Docker change and the recorder before every commit, so
an operation that lost its game stops there (`LeaseLost`) instead of acting
alongside the new holder.

A release that Redis cannot take (it is restarting, or unreachable) is
tried again in the background, by one thread per `GameLock`, until it lands
or the lease would have expired anyway: left alone, the lease would keep
its game busy for the rest of its TTL (a minute by default) after a Redis
blip of a second. A late release is safe: it deletes the lease only while
the lease still holds this operation's token.

A lease is first renewed a third of its TTL after it was taken. Most
operations end long before that, so a lease gets its renewer thread only
when that first renewal falls due: one thread per `GameLock` waits for the
due times and starts the renewers, and never calls Redis itself. From then
on each held lease has its own renewer thread, so one slow renewal (a Redis
call waiting out its timeout) never delays another game's.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from rtmanager.domain.errors import (
    ConcurrentModification,
    RuntimeManagerError,
    ServiceUnavailable,
)
from rtmanager.ports import GameLeases, Lease

log = logging.getLogger(__name__)

# Pauses between the background attempts to release a lease Redis could not
# take back; the last repeats until the lease would have expired.
_RELEASE_RETRY_SECONDS = (0.25, 0.5, 1.0, 2.0)

LatencyObserver = Callable[[float], None]


class LeaseLost(ConcurrentModification):
    """The operation's game lease is no longer held; it must not act any further."""


class LeaseUnconfirmed(ServiceUnavailable):
    """The operation's lease could not be renewed before its TTL ran out (Redis unreachable)."""


@dataclass(eq=False)
class _Held:
    """One lease this process holds, and what its renewer knows of it."""

    lease: Lease
    # Monotonic time until which the lease is surely ours: measured from
    # before the call that last set its TTL.
    valid_until: float
    # The operation's context: the renewer's log lines carry its trace ids.
    context: contextvars.Context
    # Monotonic time of its first renewal; its renewer thread starts then.
    renew_at: float = 0.0
    lost: str = ""  # why it is lost; "" while held
    done: threading.Event = field(default_factory=threading.Event)


class GameLock:
    """Per-game mutual exclusion on top of the `GameLeases` port."""

    def __init__(
        self,
        leases: GameLeases,
        ttl: timedelta,
        *,
        on_acquire_latency: LatencyObserver | None = None,
    ) -> None:
        self._leases = leases
        self._ttl = ttl
        self._on_latency = on_acquire_latency
        self._interval = max(ttl.total_seconds() / 3, 0.05)
        self._held: dict[str, _Held] = {}  # by game id
        self._lock = threading.Lock()
        # Held leases not renewed yet, in the order of their first renewal.
        self._unrenewed: deque[_Held] = deque()
        self._renewal_due = threading.Condition(self._lock)
        self._starter: threading.Thread | None = None
        # Released leases whose release Redis could not take, and the
        # thread that tries again; `_releases_done` is notified when it ends.
        self._unreleased: list[_Held] = []
        self._releaser: threading.Thread | None = None
        self._releases_done = threading.Condition(self._lock)

    @property
    def held_games(self) -> list[str]:
        """Games whose lease this process holds right now."""
        with self._lock:
            return sorted(self._held)

    @contextmanager
    def hold(self, game_id: str) -> Iterator[Lease]:
        """Hold the game's lease for the block; raise `ConcurrentModification` if busy.

        Raises `ServiceUnavailable` when Redis cannot be reached.
        """
        started = time.monotonic()
        lease = self._leases.acquire(game_id, self._ttl)
        if self._on_latency is not None:
            self._on_latency(time.monotonic() - started)
        if lease is None:
            raise ConcurrentModification(
                f"another operation is in progress for game {game_id}",
                metadata={"game_id": game_id},
            )
        held = _Held(
            lease,
            valid_until=started + self._ttl.total_seconds(),
            context=contextvars.copy_context(),
        )
        with self._lock:
            self._held[game_id] = held
            self._schedule_renewal(held)
        try:
            yield lease
        finally:
            held.done.set()
            with self._lock:
                if self._held.get(game_id) is held:
                    del self._held[game_id]
            self._release(held)

    def check(self, game_id: str) -> None:
        """Raise unless the lease this process holds on the game is still surely held.

        `LeaseLost` (a `conflict`) when another holder has it or it expired;
        `LeaseUnconfirmed` (`service_unavailable`) when Redis could not
        confirm it within its TTL. A game whose lease this process does not
        hold at all passes: the check guards operations inside `hold`.
        """
        with self._lock:
            held = self._held.get(game_id)
        if held is None:
            return
        if held.lost:
            raise LeaseLost(
                f"lost the lease of game {game_id}: {held.lost}; stopped before acting further",
                metadata={"game_id": game_id, "lease": "lost"},
            )
        if time.monotonic() >= held.valid_until:
            raise LeaseUnconfirmed(
                f"the lease of game {game_id} could not be renewed before it expired; "
                "stopped before acting further",
                metadata={"game_id": game_id, "dependency": "redis", "lease": "lost"},
            )

    def _schedule_renewal(self, held: _Held) -> None:
        """Have `held`'s renewer started when its first renewal falls due (under `_lock`).

        Due times follow the order of this call (a fixed interval from it),
        so a queue keeps them in order. Leases already released are dropped
        from its front here, so a steady run of short operations leaves it
        short.
        """
        self._drop_released()
        held.renew_at = time.monotonic() + self._interval
        self._unrenewed.append(held)
        self._starter = _running(self._starter, self._start_renewers, "lease-renewals")

    def _start_renewers(self) -> None:
        """Start each held lease's renewer thread when its first renewal falls due.

        Ends once no lease waits for one; `_schedule_renewal` starts it again.
        """
        while True:
            with self._renewal_due:
                self._drop_released()
                if not self._unrenewed:
                    self._starter = None
                    return
                held = self._unrenewed[0]
                wait = held.renew_at - time.monotonic()
                if wait > 0:
                    self._renewal_due.wait(wait)
                    continue
                self._unrenewed.popleft()
            threading.Thread(
                target=held.context.run,
                args=(self._renew_until_done, held),
                name=f"lease-{held.lease.game_id}",
                daemon=True,
            ).start()

    def _drop_released(self) -> None:
        """Drop the leases already released from the front of the queue (under `_lock`)."""
        while self._unrenewed and self._unrenewed[0].done.is_set():
            self._unrenewed.popleft()

    def _renew_until_done(self, held: _Held) -> None:
        """Renew `held` now and then every interval until its block ends or it is lost."""
        game_id = held.lease.game_id
        while not held.done.is_set():
            started = time.monotonic()
            try:
                renewed = self._leases.renew(held.lease, self._ttl)
            except RuntimeManagerError as error:
                log.warning(
                    "could not renew game lease",
                    extra={"game_id": game_id, "problem": str(error)},
                )
            else:
                if held.done.is_set():
                    return
                if not renewed:
                    held.lost = "it expired or another holder took it"
                    log.error(
                        "lost a game lease while its operation runs", extra={"game_id": game_id}
                    )
                    return
                held.valid_until = started + self._ttl.total_seconds()
            held.done.wait(self._interval)

    def _release(self, held: _Held) -> None:
        """Release `held` by its token; when Redis cannot take the release,
        have it tried again in the background (see `_release_late`)."""
        lease = held.lease
        try:
            if not self._leases.release(lease):
                log.warning(
                    "game lease had expired before release", extra={"game_id": lease.game_id}
                )
            return
        except RuntimeManagerError as error:
            log.warning(
                "could not release game lease; trying again until it would expire",
                extra={"game_id": lease.game_id, "problem": str(error)},
            )
        with self._lock:
            self._unreleased.append(held)
            self._releaser = _running(self._releaser, self._release_late, "lease-releases")

    def _release_late(self) -> None:
        """Try the releases Redis could not take again, pausing longer each
        round, until each lands or its lease would have expired.

        Ends once none is left; `_release` starts it again.
        """
        rounds = 0
        while True:
            time.sleep(_RELEASE_RETRY_SECONDS[min(rounds, len(_RELEASE_RETRY_SECONDS) - 1)])
            rounds += 1
            with self._lock:
                pending = list(self._unreleased)
            ended = [held for held in pending if self._released_late(held, rounds)]
            with self._lock:
                self._unreleased = [held for held in self._unreleased if held not in ended]
                if not self._unreleased:
                    self._releaser = None
                    self._releases_done.notify_all()
                    return

    def finish_releases(self, timeout: float) -> list[str]:
        """Wait up to `timeout` seconds for the releases being tried again in
        the background; return the games whose release is still pending.

        For a shutdown: the releases still pending when the process exits are
        left to their leases' TTL.
        """
        with self._releases_done:
            self._releases_done.wait_for(lambda: self._releaser is None, timeout)
            return sorted(held.lease.game_id for held in self._unreleased)

    def _released_late(self, held: _Held, rounds: int) -> bool:
        """One more attempt at releasing `held`; True once there is nothing left to try."""
        game_id = held.lease.game_id
        if time.monotonic() >= held.valid_until:
            held.context.run(
                log.warning,
                "game lease left to expire: Redis did not take its release in time",
                extra={"game_id": game_id},
            )
            return True
        try:
            self._leases.release(held.lease)
        except RuntimeManagerError:
            return False
        held.context.run(
            log.info, "released game lease late", extra={"game_id": game_id, "rounds": rounds}
        )
        return True


def _running(
    worker: threading.Thread | None, target: Callable[[], None], name: str
) -> threading.Thread:
    """`worker`, or when there is none a daemon thread started on `target`.

    For the threads a `GameLock` starts when work arrives for them and that
    end, setting their attribute back to None under the lock, once none is
    left; called under that lock.
    """
    if worker is None:
        worker = threading.Thread(target=target, name=name, daemon=True)
        worker.start()
    return worker
