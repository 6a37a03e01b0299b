"""The game lease port: per-game mutual exclusion across threads, processes and
replicas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from rtmanager.domain.explanation import LeaseHolder


@dataclass(frozen=True)
class Lease:
    """A held game lease: the game and the token that proves holding it.

    The token is unguessable and names its holder's instance; only the
    whole token proves holding the lease.
    """

    game_id: str
    token: str


class GameLeases(Protocol):
    """Per-game mutual exclusion across threads, processes and replicas.

    Each lease names the instance (`RTMANAGER_INSTANCE_ID`) that took it,
    so anyone can tell who holds a game (`holder`).
    """

    def acquire(self, game_id: str, ttl: timedelta) -> Lease | None:
        """Take the game's lease for `ttl`; return None when another holder has it."""
        ...

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        """Extend a held lease; False when it expired or another holder has it."""
        ...

    def release(self, lease: Lease) -> bool:
        """Release a held lease; False when it was no longer ours (nothing is deleted)."""
        ...

    def holder(self, game_id: str) -> LeaseHolder | None:
        """Who holds the game's lease now and its time left; None when nobody does."""
        ...
