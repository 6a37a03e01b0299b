"""Restart (and, through `RecreateService`, patch): recreate a game's engine.

Under one outer lease: load the record, stop it (inner stop), remove its
container, start it again (inner start) with the current image — or, for a
patch, the new one. The endpoint and hostname stay; the container id
changes. The correlation id (the request's source_ref, or a fresh one) is the
source_ref of the outer entry and of the inner stop and start entries, and
the inner entries name the outer one as their parent (its kind and id), so
the audit log and the watch feed link them. A failing step fails the outer
operation with the inner step's code.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtmanager.domain.errors import Conflict, RuntimeManagerError
from rtmanager.domain.images import ImageRef, check_patch_target, parse_image_ref
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.common import (
    LifecycleDeps,
    LifecycleService,
    allowed_image,
    forget_container,
    new_correlation_id,
    ours_to_act_on,
)
from rtmanager.lifecycle.recorder import Operation, OperationResult
from rtmanager.lifecycle.start import StartService
from rtmanager.lifecycle.stop import StopService
from rtmanager.ports import UnitOfWork


@dataclass(frozen=True)
class RestartRequest:
    """Recreate the engine of `game_id` with its current image."""

    game_id: str
    op_source: OpSource
    source_ref: str = ""


class RecreateService(LifecycleService):
    """Stop, remove and start again under one lease: restart and patch."""

    def __init__(
        self,
        deps: LifecycleDeps,
        *,
        stop: StopService,
        start: StartService,
    ) -> None:
        super().__init__(deps)
        self._stop = stop
        self._start = start

    def recreate(
        self,
        *,
        op_kind: OpKind,
        game_id: str,
        op_source: OpSource,
        source_ref: str,
        target_image_ref: str | None,
    ) -> OperationResult:
        """Recreate the engine; `target_image_ref` None keeps the current image."""
        operation = self._recorder.admit(
            game_id=game_id,
            op_kind=op_kind,
            op_source=op_source,
            source_ref=source_ref,
            image_ref=target_image_ref or "",
        )
        if isinstance(operation, OperationResult):
            return operation
        removed: list[str] = []

        def forget_removed_container(uow: UnitOfWork) -> RuntimeRecord | None:
            # The old container is gone but the new one did not start: the
            # stopped record must not point at a container that no longer exists.
            if not removed:
                return None
            return forget_container(uow, game_id, removed[0], self._clock())

        def body(op: Operation) -> OperationResult:
            target = (
                allowed_image(target_image_ref, self._settings)
                if target_image_ref is not None
                else None
            )
            with self._lock.hold(game_id):
                return self._recorder.attempt(
                    op,
                    lambda op: self._recreate(op, target, removed),
                    on_failure=forget_removed_container,
                )

        return self._recorder.run(operation, body, on_failure=forget_removed_container)

    def _recreate(
        self, op: Operation, target: ImageRef | None, removed: list[str]
    ) -> OperationResult:
        record = self._recorder.read(lambda uow: uow.records.get(op.game_id))
        op.container_id = record.current_container_id
        if record.status is RuntimeStatus.REMOVED:
            raise Conflict(f"runtime of game {op.game_id} is removed; it cannot be recreated")
        if target is not None:
            check_patch_target(parse_image_ref(record.current_image_ref), target)
        image_ref = str(target) if target is not None else record.current_image_ref
        op.image_ref = image_ref
        op.source_ref = op.source_ref or new_correlation_id()

        stopped = self._stop.run(op)
        _raise_unless_ok(stopped, "inner stop failed: ")
        container_id = record.current_container_id
        if ours_to_act_on(self._engine, container_id):
            self._lock.check(op.game_id)
            self._engine.remove(container_id, force=True)
        if container_id:
            removed.append(container_id)
        started = self._start.run(op, image_ref)
        _raise_unless_ok(started, "inner start failed: ")
        assert started.record is not None
        op.container_id = started.record.current_container_id
        return op.commit(record=started.record)


class RestartService:
    """The restart lifecycle (SPEC §3 Restart, seed 002)."""

    def __init__(self, recreate: RecreateService) -> None:
        self._recreate = recreate

    def handle(self, request: RestartRequest) -> OperationResult:
        """Recreate the engine with its current image; never raises."""
        return self._recreate.recreate(
            op_kind=OpKind.RESTART,
            game_id=request.game_id,
            op_source=request.op_source,
            source_ref=request.source_ref,
            target_image_ref=None,
        )


def _raise_unless_ok(result: OperationResult, prefix: str) -> None:
    if not result.ok:
        assert result.failure is not None
        raise RuntimeManagerError.from_failure(result.failure, prefix=prefix)
