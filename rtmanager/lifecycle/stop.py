"""Stop: stop a game's engine gracefully and record it stopped.

`handle` takes the game's lease; `run` assumes the caller holds it (the
inner stop of restart, patch and forced cleanup).
"""

from __future__ import annotations

from dataclasses import dataclass

from rtmanager.domain.errors import Conflict
from rtmanager.domain.jobs import LobbyJob
from rtmanager.domain.operation import OpKind, OpSource, StopReason
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.common import LifecycleService, op_time, ours_to_act_on
from rtmanager.lifecycle.recorder import Operation, OperationResult
from rtmanager.ports import StatusChange


@dataclass(frozen=True)
class StopRequest:
    """Stop the engine of `game_id` for `reason`."""

    game_id: str
    op_source: OpSource
    reason: StopReason = StopReason.ADMIN_REQUEST
    source_ref: str = ""
    # The Lobby job asking for it; its game's job watermark then applies.
    job: LobbyJob | None = None


class StopService(LifecycleService):
    """The stop lifecycle (SPEC §3 Stop)."""

    def handle(self, request: StopRequest) -> OperationResult:
        """Validate, take the game's lease and stop; never raises."""
        operation = self._recorder.admit(
            game_id=request.game_id,
            op_kind=OpKind.STOP,
            op_source=request.op_source,
            source_ref=request.source_ref,
            job=request.job,
        )
        if isinstance(operation, OperationResult):
            return operation
        operation.log_fields["reason"] = str(request.reason)
        game_id = operation.game_id

        def stop_job(op: Operation) -> OperationResult:
            self._recorder.check_job(op)
            return self._stop(op)

        def body(op: Operation) -> OperationResult:
            with self._lock.hold(game_id):
                return self._recorder.attempt(op, stop_job)

        return self._recorder.run(operation, body)

    def run(self, parent: Operation) -> OperationResult:
        """The inner stop of `parent`, under the lease it holds: same game,
        source and source_ref, its row naming `parent`."""
        operation = self._recorder.begin_inner(parent, OpKind.STOP)
        return self._recorder.run(operation, self._stop)

    def _stop(self, op: Operation) -> OperationResult:
        record = self._recorder.read(lambda uow: uow.records.get(op.game_id))
        op.image_ref = record.current_image_ref
        op.container_id = record.current_container_id
        if record.status is RuntimeStatus.REMOVED:
            raise Conflict(f"runtime of game {op.game_id} is removed")
        if record.status is RuntimeStatus.STOPPED:
            return op.commit(record=record)
        container_id = record.current_container_id
        # A container already gone counts as stopped.
        if ours_to_act_on(self._engine, container_id):
            self._lock.check(op.game_id)
            self._engine.stop(container_id, self._settings.stop_timeout)
        change = StatusChange(
            game_id=op.game_id,
            expected_from=RuntimeStatus.RUNNING,
            to=RuntimeStatus.STOPPED,
            now=op_time(self._clock, record),
            expected_container_id=container_id,
        )
        return op.commit(lambda uow: uow.records.update_status(change))
