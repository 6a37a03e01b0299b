"""Per-game order of the Lobby jobs one consumer holds.

Within one process, a game's jobs run one at a time in Lobby's order, so a
start and the stop that follows it both apply (instead of the stop
superseding a start still queued behind it) and the process never contends
with itself for the game's lease. Different games run in parallel. Across
replicas the order is kept by the games' job watermarks in PostgreSQL, not
by this queue: it only spares needless work.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from rtmanager.domain.jobs import JobPosition


class Queued(Protocol):
    """What a queued job must tell: which game it belongs to and where it stands."""

    @property
    def game_key(self) -> Hashable: ...

    @property
    def position(self) -> JobPosition: ...


J = TypeVar("J", bound=Queued)


class GameQueues(Generic[J]):
    """One queue per game: only its oldest job runs; the next waits for it to finish.

    The head of a game's queue is running (or waiting for its retry); jobs
    arriving later queue behind it by position, so a reclaimed older entry
    goes before younger ones still waiting. Not thread-safe: the caller locks.
    """

    def __init__(self) -> None:
        self._queues: dict[Hashable, list[J]] = {}

    def add(self, job: J) -> J | None:
        """Queue `job`; return it when it may run right away (its game was idle)."""
        waiting = self._queues.get(job.game_key)
        if waiting is None:
            self._queues[job.game_key] = [job]
            return job
        bisect.insort(waiting, job, lo=1, key=lambda queued: queued.position)
        return None

    def finish(self, job: J) -> J | None:
        """Drop the finished head `job`; return its game's next job to run, if any."""
        waiting = self._queues.get(job.game_key)
        if not waiting or waiting[0] is not job:
            raise ValueError("only the running head of a game's queue can finish")
        waiting.pop(0)
        if not waiting:
            del self._queues[job.game_key]
            return None
        return waiting[0]

    def discard(self, job: J) -> J | None:
        """Forget `job` wherever it waits; return the game's next job if it was the head."""
        waiting = self._queues.get(job.game_key)
        if not waiting or job not in waiting:
            return None
        if waiting[0] is job:
            return self.finish(job)
        waiting.remove(job)
        return None

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._queues.values())
