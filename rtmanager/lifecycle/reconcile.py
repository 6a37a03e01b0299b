"""The reconciler: makes runtime records agree with Docker again.

Rules (SPEC §4), over containers owned by this deployment only:

- an owned container without a live record gets a record (`reconcile_adopt`),
  running or stopped as Docker says;
- a running record whose container is missing becomes removed
  (`reconcile_dispose`);
- a running record whose container exited becomes stopped (op_kind `stop`);
- a stopped record whose game's container runs again becomes running
  (`reconcile_adopt`).

A pass first plans from one snapshot of Docker and the store, then applies
each step under the game's lease after re-checking that game with fresh
data; a busy game is skipped until the next pass. Every applied step is an
operation with op_source `auto_reconcile`, recorded like any other, and
every write is guarded: it commits only if the record is still what the
step was planned from (CAS), so a step never overwrites a change it did not
see.

Docker is asked as little as that allows. The snapshot is one listing of
the owned containers, with no inspects (a listing has everything the rules
look at). A step's re-check inspects the game's container by name, and the
record's container when it is another one (see `_fresh_containers`): Docker
looks those up in its index, while a listing, even one filtered by label,
walks every container on the host. A pass therefore costs one listing plus
one or two inspects per step; a container that needs nothing costs nothing.

This is a use case: the `Reconcile` RPC, the start-up pass, the periodic
trigger (`PeriodicWorker` in the composition root) and the Docker events
listener (`observe_exit`) all call it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from rtmanager.domain.errors import ConcurrentModification, RuntimeManagerError
from rtmanager.domain.ids import container_name, is_valid_game_id
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.common import LifecycleDeps, LifecycleService
from rtmanager.lifecycle.recorder import Operation, OperationResult, load_record
from rtmanager.ports import ContainerInfo, StatusChange, UnitOfWork
from rtmanager.telemetry import Telemetry

log = logging.getLogger(__name__)

# How often `observe_exit` re-reads a record while it waits.
_EXIT_POLL_SECONDS = 0.05


class ActionKind(StrEnum):
    """The reconciler's rules."""

    ADOPT = "adopt"
    DISPOSE = "dispose"
    MARK_STOPPED = "mark_stopped"
    MARK_RUNNING = "mark_running"


@dataclass(frozen=True)
class ReconcileAction:
    """One planned (or applied, or skipped) step of a pass."""

    kind: ActionKind
    game_id: str
    container_id: str = ""
    image_ref: str = ""
    container_running: bool = False
    exit_code: int | None = None
    applied: bool = False
    skipped_reason: str = ""
    # Where the container is placed, as the backend reported it (an
    # adoption writes it on the record; empty on a single host).
    node_id: str = ""
    node_hostname: str = ""
    # The backend's state of the container (e.g. `exited`, or `node-down`
    # for an engine whose cluster node was lost), for the audit row.
    container_state: str = ""


@dataclass(frozen=True)
class ReconcileReport:
    """What a pass planned and did."""

    dry_run: bool
    actions: tuple[ReconcileAction, ...]

    def count(self, kind: ActionKind) -> int:
        """How many steps of `kind` were applied (planned, in a dry run)."""
        return sum(1 for a in self.actions if a.kind is kind and (a.applied or self.dry_run))

    @property
    def skipped(self) -> int:
        """How many steps were not carried out although planned."""
        return sum(1 for a in self.actions if a.skipped_reason)


def plan_game(
    game_id: str, record: RuntimeRecord | None, containers: Iterable[ContainerInfo]
) -> ReconcileAction | None:
    """The step that makes one game's record agree with its containers, if any."""
    ours = list(containers)
    if record is not None and record.status is RuntimeStatus.REMOVED:
        # Removed is terminal; an owned container left behind is not adopted.
        return None
    current = next((c for c in ours if c.id and c.id == _cid(record)), None)
    other = next(
        (c for c in ours if c.running and c is not current),
        next((c for c in ours if c.name == container_name(game_id) and c is not current), None),
    )
    if record is None:
        chosen = other or current
        return _action(ActionKind.ADOPT, game_id, chosen) if chosen is not None else None
    if record.status is RuntimeStatus.RUNNING:
        if current is not None:
            if current.running:
                return None
            return _action(ActionKind.MARK_STOPPED, game_id, current)
        if other is not None:
            # The record lost track of its game's container: bind to it.
            return _action(ActionKind.ADOPT, game_id, other)
        return ReconcileAction(
            ActionKind.DISPOSE, game_id, container_id=record.current_container_id
        )
    # Stopped: a running container of the game makes it running again.
    running = current if current is not None and current.running else None
    running = running or (other if other is not None and other.running else None)
    if running is not None:
        return _action(ActionKind.MARK_RUNNING, game_id, running)
    if current is None and other is not None:
        # A container an interrupted start could not remove (Docker went
        # away): bind the record to it, so the next start or the cleanup
        # removes it instead of leaving it behind for good.
        return _action(ActionKind.ADOPT, game_id, other)
    return None


def _ending(exit_code: int | None, state: str) -> str:
    """How an engine ended, for an audit row: its exit code, else what the backend said.

    `exit=137`; without an exit code `exit=unknown`, followed by the
    container's state when the backend reported one (`exit=unknown:state=node-down`
    for an engine whose cluster node was lost).
    """
    if exit_code is not None:
        return f"exit={exit_code}"
    return f"exit=unknown:state={state}" if state else "exit=unknown"


def _cid(record: RuntimeRecord | None) -> str:
    return record.current_container_id if record is not None else ""


def _action(kind: ActionKind, game_id: str, container: ContainerInfo) -> ReconcileAction:
    return ReconcileAction(
        kind,
        game_id,
        container_id=container.id,
        image_ref=container.image_ref,
        container_running=container.running,
        exit_code=container.exit_code,
        node_id=container.node_id,
        node_hostname=container.node_hostname,
        container_state=container.state,
    )


class Reconciler(LifecycleService):
    """Plans and applies reconciliation passes; also handles observed engine exits."""

    def __init__(
        self,
        deps: LifecycleDeps,
        *,
        telemetry: Telemetry,
        exit_settle: timedelta = timedelta(milliseconds=250),
        exit_wait_max: timedelta = timedelta(seconds=60),
    ) -> None:
        """`exit_settle` and `exit_wait_max` shape `observe_exit` (see there)."""
        super().__init__(deps)
        self._telemetry = telemetry
        self._pass_lock = threading.Lock()
        self._exit_settle = exit_settle.total_seconds()
        self._exit_wait_max = exit_wait_max.total_seconds()

    def run_pass(self, *, dry_run: bool = False) -> ReconcileReport:
        """Plan from a snapshot, then (unless `dry_run`) apply each step under its lease.

        Raises `ServiceUnavailable` when Docker or the store cannot be read.
        """
        with self._pass_lock:
            plan, listed = self._plan()
            if dry_run:
                return ReconcileReport(True, tuple(plan))
            done = tuple(self._apply(action, listed.get(action.game_id, [])) for action in plan)
        for action in done:
            self._telemetry.reconcile_action(str(action.kind), action.applied)
        if done:
            log.info(
                "reconcile pass",
                extra={
                    "applied": sum(a.applied for a in done),
                    "skipped": sum(bool(a.skipped_reason) for a in done),
                },
            )
        return ReconcileReport(False, done)

    def observe_exit(
        self,
        game_id: str,
        container_id: str,
        *,
        event: str,
        exit_code: int | None,
        stop: threading.Event | None = None,
    ) -> OperationResult | None:
        """Mark a running record stopped after Docker reported its container died.

        Does nothing unless the record is running on exactly that container,
        and contends for the game's lease only when the exit is nobody
        else's to record. Most exits are caused by the service itself (a
        stop, restart, patch or forced cleanup): that operation holds the
        lease and records the exit itself, and its caller's next call must
        not find the lease taken by this listener. So:

        1. While this process holds the game's lease, wait without
           contending (polling the record, not the lease). The held check
           comes before each read: once an operation of this process has let
           the lease go it has committed, so the read that follows sees what
           it recorded.
        2. Read the record without the lease until it has claimed the dead
           container for `exit_settle`: an operation of another replica
           that caused the exit commits within that time, and the record
           then no longer claims the container.
        3. Only then take the lease, once. A busy lease means an operation
           is under way; it is not retried (a retry could take the turn of
           that operation's caller): the next reconcile pass covers a
           record left claiming a dead container.

        Under the lease the record and the container are checked again: a
        container that runs again is left to the reconciler's rules.
        Waiting ends early, doing nothing, when `stop` is set. Returns the
        result of the recorded `stop`, or None when nothing was recorded.
        """
        stop = stop or threading.Event()
        waiting_since = time.monotonic()
        while True:
            busy_here = game_id in self._lock.held_games
            record = self._recorder.read(lambda uow: load_record(uow, game_id))
            if not _claims(record, container_id):
                return None
            waited = time.monotonic() - waiting_since
            if not busy_here and waited >= self._exit_settle:
                break
            if waited >= self._exit_wait_max:
                log.info(
                    "engine exit left to the next reconcile pass: game busy here",
                    extra={"game_id": game_id, "container_id": container_id},
                )
                return None
            if stop.wait(_EXIT_POLL_SECONDS):
                return None
        try:
            with self._lock.hold(game_id):
                record = self._recorder.read(lambda uow: load_record(uow, game_id))
                if record is None or not _claims(record, container_id):
                    return None
                info = self._engine.inspect(container_id)
                if info is not None and info.running:
                    return None
                action = ReconcileAction(
                    ActionKind.MARK_STOPPED,
                    game_id,
                    container_id=container_id,
                    image_ref=record.current_image_ref,
                    exit_code=exit_code,
                )
                ending = _ending(exit_code, info.state if info is not None else "")
                return self._record(
                    action, basis=record, source_ref=f"docker-event:{event}:{ending}"
                )
        except ConcurrentModification:
            log.info(
                "engine exit left to the next reconcile pass: game busy",
                extra={"game_id": game_id, "container_id": container_id},
            )
            return None

    def _plan(self) -> tuple[list[ReconcileAction], dict[str, list[ContainerInfo]]]:
        """The steps of a pass, and the owned containers by game they were planned from."""
        containers: dict[str, list[ContainerInfo]] = {}
        for info in self._engine.list_owned():
            if is_valid_game_id(info.game_id):
                containers.setdefault(info.game_id, []).append(info)
        with self._recorder.unit_of_work() as uow:
            records = {
                record.game_id: record
                for status in (RuntimeStatus.RUNNING, RuntimeStatus.STOPPED)
                for record in uow.records.list_by_status(status)
            }
            for game_id in containers.keys() - records.keys():
                record = load_record(uow, game_id)
                if record is not None:
                    records[game_id] = record
        self._telemetry.runtimes(
            {
                status: sum(1 for r in records.values() if r.status is status)
                for status in (RuntimeStatus.RUNNING, RuntimeStatus.STOPPED)
            }
        )
        plan = []
        for game_id in sorted(containers.keys() | records.keys()):
            action = plan_game(game_id, records.get(game_id), containers.get(game_id, ()))
            if action is not None:
                plan.append(action)
        return plan, containers

    def _apply(self, planned: ReconcileAction, listed: list[ContainerInfo]) -> ReconcileAction:
        game_id = planned.game_id
        try:
            with self._lock.hold(game_id):
                record = self._recorder.read(lambda uow: load_record(uow, game_id))
                action = plan_game(game_id, record, self._fresh_containers(game_id, record, listed))
                if action is None:
                    return replace(planned, skipped_reason="already consistent")
                result = self._record(action, basis=record, source_ref="reconcile")
        except ConcurrentModification:
            return replace(planned, skipped_reason="game busy")
        except RuntimeManagerError as error:
            return replace(planned, skipped_reason=error.message)
        if not result.ok:
            assert result.failure is not None
            return replace(action, skipped_reason=result.failure.message)
        return replace(action, applied=True)

    def _fresh_containers(
        self, game_id: str, record: RuntimeRecord | None, listed: list[ContainerInfo]
    ) -> list[ContainerInfo]:
        """The game's containers as Docker has them now, for a step's re-check.

        Inspected one by one: the container named `galaxy-game-{game_id}`
        (the one rtmanager creates for the game, whoever created it since),
        the record's current container and those the pass listed for the
        game, each once (usually they are one container: one inspect).
        Docker finds each in its index, where a listing walks every
        container on the host, so a step costs the same however many
        containers there are. A container of the game made after the
        listing under another name, and not the record's, waits for the
        next pass (only a container made behind rtmanager's back can be).
        Only owned containers labelled with the game count, as in the
        listing.
        """
        fresh: dict[str, ContainerInfo] = {}
        asked: set[str] = set()
        for key in (container_name(game_id), _cid(record), *(c.id for c in listed)):
            if not key or key in asked:
                continue
            asked.add(key)
            info = self._engine.inspect(key)
            if info is None:
                continue
            asked.add(info.id)
            if info.owned and info.game_id == game_id:
                fresh.setdefault(info.id, info)
        return list(fresh.values())

    def _record(
        self, action: ReconcileAction, *, basis: RuntimeRecord | None, source_ref: str
    ) -> OperationResult:
        """Apply one step as an operation; `basis` is the record it was planned from."""
        kind = {
            ActionKind.ADOPT: OpKind.RECONCILE_ADOPT,
            ActionKind.MARK_RUNNING: OpKind.RECONCILE_ADOPT,
            ActionKind.DISPOSE: OpKind.RECONCILE_DISPOSE,
            ActionKind.MARK_STOPPED: OpKind.STOP,
        }[action.kind]
        if action.kind is ActionKind.MARK_STOPPED and source_ref == "reconcile":
            source_ref = f"reconcile:{_ending(action.exit_code, action.container_state)}"
        operation = self._recorder.begin(
            game_id=action.game_id,
            op_kind=kind,
            op_source=OpSource.AUTO_RECONCILE,
            source_ref=source_ref,
            image_ref=action.image_ref,
        )
        operation.container_id = action.container_id

        def body(op: Operation) -> OperationResult:
            return op.commit(lambda uow: self._change(uow, action, basis))

        return self._recorder.run(operation, body)

    def _change(
        self, uow: UnitOfWork, action: ReconcileAction, basis: RuntimeRecord | None
    ) -> RuntimeRecord:
        now = self._clock()
        if action.kind is ActionKind.DISPOSE:
            return uow.records.update_status(
                StatusChange(
                    game_id=action.game_id,
                    expected_from=RuntimeStatus.RUNNING,
                    to=RuntimeStatus.REMOVED,
                    now=now,
                    expected_container_id=action.container_id,
                    container_id="",
                )
            )
        if action.kind is ActionKind.MARK_STOPPED:
            return uow.records.update_status(
                StatusChange(
                    game_id=action.game_id,
                    expected_from=RuntimeStatus.RUNNING,
                    to=RuntimeStatus.STOPPED,
                    now=now,
                    expected_container_id=action.container_id,
                )
            )
        return self._bind(uow, basis, action, now)

    def _bind(
        self,
        uow: UnitOfWork,
        basis: RuntimeRecord | None,
        action: ReconcileAction,
        now: datetime,
    ) -> RuntimeRecord:
        """Adopt: write a record bound to the container, in Docker's state.

        CAS guard: the stored row, locked for the rest of the unit of work,
        must still have the status and container id of `basis`, the record
        the step was planned from (or still be absent when there was none);
        otherwise `ConcurrentModification`, and nothing is written. An
        adoption therefore never overwrites a change it did not see, such as
        a start or stop that committed after the plan (a lease lost to
        expiry, a second writer). A row inserted concurrently where none
        was planned cannot be locked before it exists; the insert then
        overwrites it, which the game's lease prevents in the first place.
        """
        record = uow.records.get_for_update(action.game_id)
        if _cas_state(record) != _cas_state(basis):
            raise ConcurrentModification(
                f"runtime record of game {action.game_id} changed since the reconciler "
                f"planned to adopt container {action.container_id[:12]}",
                metadata={"game_id": action.game_id},
            )
        status = RuntimeStatus.RUNNING if action.container_running else RuntimeStatus.STOPPED
        image_ref = action.image_ref or (record.current_image_ref if record else "")
        if record is None:
            adopted = RuntimeRecord(
                game_id=action.game_id,
                status=status,
                engine_endpoint=self._settings.endpoint(action.game_id),
                state_path=str(self._settings.state_dir(action.game_id)),
                docker_network=self._settings.engine_network,
                last_op_at=now,
                created_at=now,
                current_container_id=action.container_id,
                current_image_ref=image_ref,
                started_at=now,
                stopped_at=None if action.container_running else now,
                node_id=action.node_id,
                node_hostname=action.node_hostname,
            )
        elif record.status is status:
            adopted = replace(
                record,
                current_container_id=action.container_id,
                current_image_ref=image_ref,
                last_op_at=max(now, record.last_op_at),
                node_id=action.node_id,
                node_hostname=action.node_hostname,
            )
        else:
            adopted = replace(
                record.with_status(status, max(now, record.last_op_at)),
                current_container_id=action.container_id,
                current_image_ref=image_ref,
                node_id=action.node_id,
                node_hostname=action.node_hostname,
            )
        uow.records.upsert(adopted)
        return adopted


def _claims(record: RuntimeRecord | None, container_id: str) -> bool:
    """Whether the record says the game runs on exactly `container_id`."""
    return (
        record is not None
        and record.status is RuntimeStatus.RUNNING
        and record.current_container_id == container_id
    )


def _cas_state(record: RuntimeRecord | None) -> tuple[RuntimeStatus, str] | None:
    """What an adoption's CAS guard compares: status and container id."""
    return None if record is None else (record.status, record.current_container_id)
