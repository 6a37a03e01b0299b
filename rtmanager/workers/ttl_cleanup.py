"""TTL cleanup: removes the containers of runtimes stopped for longer than the TTL.

Each expired runtime goes through the cleanup lifecycle with op_source
`auto_ttl`; the cleanup re-checks, under the game's lease, that the runtime
is still stopped and still expired. State directories are kept unless the
deployment says otherwise (`RTMANAGER_REMOVE_STATE_ON_CLEANUP`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from rtmanager.domain.operation import OpSource
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.cleanup import CleanupRequest, CleanupService
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.ports import UnitOfWorkFactory

log = logging.getLogger(__name__)

_BATCH = 100


class TtlCleanup:
    """One pass of the TTL worker (scheduled by `PeriodicWorker`)."""

    def __init__(
        self,
        units_of_work: UnitOfWorkFactory,
        cleanup: CleanupService,
        *,
        ttl: timedelta,
        clock: Callable[[], datetime] = utc_now,
        db_timeout: timedelta = timedelta(seconds=10),
    ) -> None:
        self._units_of_work = units_of_work
        self._cleanup = cleanup
        self._ttl = ttl
        self._clock = clock
        self._db_timeout = db_timeout

    def run_once(self) -> list[OperationResult]:
        """Clean up every runtime stopped before now - TTL; return the results."""
        cutoff = self._clock() - self._ttl
        results: list[OperationResult] = []
        while True:
            with self._units_of_work(timeout=self._db_timeout) as uow:
                expired = uow.records.list_stopped_before(cutoff, _BATCH)
            batch = [
                self._cleanup.handle(
                    CleanupRequest(
                        game_id=record.game_id,
                        op_source=OpSource.AUTO_TTL,
                        source_ref="ttl",
                        stale_before=cutoff,
                    )
                )
                for record in expired
            ]
            results += batch
            # A full batch of successes means more may be waiting; failures
            # (a busy game, say) are retried on the next pass instead.
            if len(expired) < _BATCH or not all(result.ok for result in batch):
                break
        if results:
            log.info(
                "ttl cleanup pass",
                extra={
                    "cleaned": sum(r.ok for r in results),
                    "failed": sum(not r.ok for r in results),
                },
            )
        return results
