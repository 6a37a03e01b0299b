"""Holding a game's lease for the length of an operation, renewing it as it runs.

`GameLock.hold(game_id)` takes the lease or raises `ConcurrentModification`
(the game is busy), keeps it alive while the operation runs (pulls and slow
stops may outlast the TTL) and releases it by token when the block ends, even
on failure. One renewer thread serves every held lease of the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from rtmanager.domain.errors import ConcurrentModification, RuntimeManagerError
from rtmanager.ports import GameLeases, Lease

log = logging.getLogger(__name__)

LatencyObserver = Callable[[float], None]


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
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def held_games(self) -> list[str]:
        """Games whose lease this process holds right now."""
        with self._lock:
            return sorted(lease.game_id for lease in self._held.values())

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
        self._register(lease)
        try:
            yield lease
        finally:
            self._unregister(lease)
            self._release(lease)

    def _register(self, lease: Lease) -> None:
        with self._lock:
            self._held[lease.token] = lease
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="lease-renewer", daemon=True
                )
                self._renewer.start()

    def _unregister(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(lease.token, None)

    def _release(self, lease: Lease) -> None:
        try:
            if not self._leases.release(lease):
                log.warning(
                    "game lease had expired before release", extra={"game_id": lease.game_id}
                )
        except RuntimeManagerError as error:
            # The lease expires on its own after its TTL.
            log.warning(
                "could not release game lease",
                extra={"game_id": lease.game_id, "problem": str(error)},
            )

    def _still_held(self, lease: Lease) -> bool:
        with self._lock:
            return lease.token in self._held

    def _renew_forever(self) -> None:
        interval = max(self._ttl.total_seconds() / 3, 0.05)
        while True:
            self._wake.wait(interval)
            with self._lock:
                leases = list(self._held.values())
                if not leases:
                    self._renewer = None
                    return
            for lease in leases:
                if not self._still_held(lease):
                    continue
                try:
                    if not self._leases.renew(lease, self._ttl) and self._still_held(lease):
                        log.error(
                            "lost a game lease while its operation runs",
                            extra={"game_id": lease.game_id},
                        )
                except RuntimeManagerError as error:
                    log.warning(
                        "could not renew game lease",
                        extra={"game_id": lease.game_id, "problem": str(error)},
                    )
