"""Cleanup: remove a stopped runtime's container and record it removed.

Called by admins and by the TTL worker. A running runtime is a conflict
unless `force`, which stops it first (an inner stop under the same lease,
whose row names the cleanup as its parent). A removed runtime is an
idempotent success. The state directory is kept unless the deployment is
configured to remove it: game data is never lost by default.

The state directory is removed only once the runtime's removal is
committed (a failed cleanup keeps the data: the runtime may be started
again). So when something in it cannot be removed (an immutable file, a
read-only file system), the runtime is already removed and its
`cleanup_container` row already written; the operation then ends as a
failure with code `internal` and a second `cleanup_container` row, whose
message says that the runtime was removed and which paths remain. A
failure, not a success with a note: whoever asked for the cleanup, and the
operation metrics, must not be told "removed" while the game's data is
still on the host. Retrying does not help (the runtime is removed); the
paths must be dealt with by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from rtmanager.domain.errors import Conflict, InternalError, RuntimeManagerError
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.common import (
    LifecycleDeps,
    LifecycleService,
    new_correlation_id,
    op_time,
    ours_to_act_on,
)
from rtmanager.lifecycle.recorder import Operation, OperationResult
from rtmanager.lifecycle.state_dirs import remove_state_dir
from rtmanager.lifecycle.stop import StopService
from rtmanager.ports import StatusChange

log = logging.getLogger(__name__)

# Paths left behind named in a failure's message; the log line has them all.
_LEFTOVERS_SHOWN = 10


@dataclass(frozen=True)
class CleanupRequest:
    """Remove the container of `game_id`; `force` stops a running one first."""

    game_id: str
    op_source: OpSource
    force: bool = False
    source_ref: str = ""
    # The TTL worker's guard: only a runtime still stopped since before this.
    stale_before: datetime | None = None


class CleanupService(LifecycleService):
    """The cleanup lifecycle (SPEC §3 Cleanup)."""

    def __init__(
        self,
        deps: LifecycleDeps,
        *,
        stop: StopService,
    ) -> None:
        super().__init__(deps)
        self._stop = stop

    def handle(self, request: CleanupRequest) -> OperationResult:
        """Validate, take the game's lease and clean up; never raises."""
        operation = self._recorder.admit(
            game_id=request.game_id,
            op_kind=OpKind.CLEANUP_CONTAINER,
            op_source=request.op_source,
            source_ref=request.source_ref,
        )
        if isinstance(operation, OperationResult):
            return operation
        game_id = operation.game_id

        def body(op: Operation) -> OperationResult:
            with self._lock.hold(game_id):
                return self._recorder.attempt(op, lambda op: self._cleanup(op, request))

        return self._recorder.run(operation, body)

    def _cleanup(self, op: Operation, request: CleanupRequest) -> OperationResult:
        record = self._recorder.read(lambda uow: uow.records.get(op.game_id))
        op.image_ref = record.current_image_ref
        op.container_id = record.current_container_id
        if record.status is RuntimeStatus.REMOVED:
            return op.commit(record=record)
        if request.stale_before is not None and (
            record.status is not RuntimeStatus.STOPPED or record.last_op_at >= request.stale_before
        ):
            raise Conflict(f"runtime of game {op.game_id} is no longer expired")
        if record.status is RuntimeStatus.RUNNING:
            if not request.force:
                raise Conflict(
                    f"runtime of game {op.game_id} is running; stop it first or use force"
                )
            op.source_ref = op.source_ref or new_correlation_id()
            stopped = self._stop.run(op)
            if not stopped.ok:
                assert stopped.failure is not None
                raise RuntimeManagerError.from_failure(
                    stopped.failure, prefix="inner stop failed: "
                )
        container_id = record.current_container_id
        if ours_to_act_on(self._engine, container_id):
            self._lock.check(op.game_id)
            self._engine.remove(container_id, force=True)
        change = StatusChange(
            game_id=op.game_id,
            expected_from=RuntimeStatus.STOPPED,
            to=RuntimeStatus.REMOVED,
            now=op_time(self._clock, record),
            expected_container_id=container_id,
            container_id="",
        )
        result = op.commit(lambda uow: uow.records.update_status(change))
        # Only once the removal is committed: a failed cleanup keeps the data.
        # A backend keeping state in storage of its own manages it itself.
        if self._settings.remove_state_on_cleanup and self._engine.capabilities.host_state_dirs:
            self._remove_state(op.game_id)
        return result

    def _remove_state(self, game_id: str) -> None:
        """Remove the game's state directory; raise `InternalError` naming what remains."""
        state_dir = self._settings.state_dir(game_id)
        leftovers = remove_state_dir(state_dir)
        if not leftovers:
            return
        log.error(
            "state directory not fully removed",
            extra={"game_id": game_id, "state_path": str(state_dir), "leftovers": leftovers},
        )
        shown = "; ".join(leftovers[:_LEFTOVERS_SHOWN])
        more = len(leftovers) - _LEFTOVERS_SHOWN
        raise InternalError(
            f"the runtime was removed, but not all of its state directory {state_dir}: "
            f"{len(leftovers)} path(s) could not be removed: {shown}"
            f"{f' (and {more} more, in the log)' if more > 0 else ''}; remove them by hand",
            metadata={"state_path": str(state_dir), "leftovers": str(len(leftovers))},
        )
