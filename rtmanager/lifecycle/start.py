"""Start: create and start a game's engine workload and record it running.

The record takes the container id and the node from what the backend
reports for the started engine (`EngineBackend.start`, then `inspect`).

`handle` is the entry point: validate, take the game's lease, run. `run`
assumes the caller already holds the lease (restart and patch run it as
their inner start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rtmanager.deadlines import bounded, cut_by_deadline, require_time_left
from rtmanager.domain import labels
from rtmanager.domain.errors import (
    ConcurrentModification,
    Conflict,
    ContainerStartFailed,
    EngineNetworkGone,
    ImagePullFailed,
    RuntimeManagerError,
    ServiceUnavailable,
)
from rtmanager.domain.ids import container_name
from rtmanager.domain.jobs import LobbyJob
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.common import (
    LifecycleService,
    allowed_image,
    forget_container,
    op_time,
    owned_container,
)
from rtmanager.lifecycle.recorder import Operation, OperationResult, load_record
from rtmanager.lifecycle.state_dirs import prepare_state_dir
from rtmanager.ports import ContainerInfo, ContainerSpec, UnitOfWork

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1
_LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class StartRequest:
    """Start `image_ref` as the engine of `game_id`."""

    game_id: str
    image_ref: str
    op_source: OpSource
    source_ref: str = ""
    # The Lobby job asking for it; its game's job watermark then applies.
    job: LobbyJob | None = None


class StartService(LifecycleService):
    """The start lifecycle (SPEC §3 Start)."""

    def handle(self, request: StartRequest) -> OperationResult:
        """Validate, take the game's lease and start; never raises."""
        operation = self._recorder.admit(
            game_id=request.game_id,
            op_kind=OpKind.START,
            op_source=request.op_source,
            source_ref=request.source_ref,
            image_ref=request.image_ref,
            job=request.job,
        )
        if isinstance(operation, OperationResult):
            return operation
        return self._execute(
            operation, lambda: str(allowed_image(request.image_ref, self._settings)), lease=True
        )

    def run(self, parent: Operation, image_ref: str) -> OperationResult:
        """The inner start of `parent` with `image_ref`, under the lease it holds:
        same game, source and source_ref, its row naming `parent`."""
        operation = self._recorder.begin_inner(parent, OpKind.START, image_ref=image_ref)
        return self._execute(operation, lambda: image_ref, lease=False)

    def _execute(
        self, operation: Operation, image: Callable[[], str], *, lease: bool
    ) -> OperationResult:
        removed: list[str] = []

        def forget_removed_container(uow: UnitOfWork) -> RuntimeRecord | None:
            if not removed:
                return None
            return forget_container(uow, operation.game_id, removed[0], self._clock())

        def start(op: Operation) -> OperationResult:
            # A Lobby job is judged against its game's watermark first, under
            # the lease: an older job is superseded whatever it asks for.
            self._recorder.check_job(op)
            return self._start(op, image(), removed)

        def body(op: Operation) -> OperationResult:
            if not lease:
                return self._start(op, image(), removed)
            if op.job is None:
                image()  # a bad image is refused before any Redis call
            # A failure is recorded (a job's watermark advanced) under the lease.
            with self._lock.hold(op.game_id):
                return self._recorder.attempt(op, start, on_failure=forget_removed_container)

        return self._recorder.run(operation, body, on_failure=forget_removed_container)

    def _start(self, op: Operation, image_ref: str, removed: list[str]) -> OperationResult:
        existing = self._recorder.read(lambda uow: load_record(uow, op.game_id))
        if existing is not None:
            if existing.status is RuntimeStatus.REMOVED:
                raise Conflict(f"runtime of game {op.game_id} is removed; it cannot start again")
            if existing.status is RuntimeStatus.RUNNING:
                if existing.current_image_ref != image_ref:
                    raise Conflict(
                        f"runtime of game {op.game_id} runs {existing.current_image_ref}; "
                        "use PatchRuntime to change its image"
                    )
                current = owned_container(self._engine, existing.current_container_id)
                if current is not None and current.running:
                    # A replayed start: the engine already runs as asked.
                    op.container_id = current.id
                    return op.commit(record=existing)
        started = self._create_and_start(op.game_id, image_ref, existing, removed)
        container_id = started.id
        op.container_id = container_id
        now = op_time(self._clock, existing)
        record = RuntimeRecord(
            game_id=op.game_id,
            status=RuntimeStatus.RUNNING,
            engine_endpoint=self._settings.endpoint(op.game_id),
            state_path=str(self._settings.state_dir(op.game_id)),
            docker_network=self._settings.engine_network,
            last_op_at=now,
            created_at=existing.created_at if existing else now,
            current_container_id=container_id,
            current_image_ref=image_ref,
            started_at=now,
            node_id=started.node_id,
            node_hostname=started.node_hostname,
        )
        try:
            return op.commit(lambda uow: _install(uow, existing, record))
        except Exception:
            # Nothing was recorded: do not leave an engine behind.
            self._discard(container_id)
            raise

    def _create_and_start(
        self, game_id: str, image_ref: str, existing: RuntimeRecord | None, removed: list[str]
    ) -> ContainerInfo:
        """Create and start the game's engine; return the backend's report of it, up.

        The backend may answer `ensure_image` and `ensure_network` from what
        it remembers, and `create` is what finds the name taken: each of
        those is settled once, by asking again, here (`_settle`).
        """
        settings = self._settings
        require_time_left("pulling the engine image")
        self._engine.ensure_image(image_ref, settings.image_pull_policy)
        state_dir = settings.state_dir(game_id)
        if self._engine.capabilities.host_state_dirs:
            prepare_state_dir(state_dir, settings.engine_user)
        self._ensure_network()
        # The record's previous container makes way (an orphan of an
        # interrupted operation holding the name does so on `create`'s Conflict).
        if existing is not None and existing.current_container_id:
            if owned_container(self._engine, existing.current_container_id) is not None:
                self._lock.check(game_id)
                self._engine.remove(existing.current_container_id, force=True)
            removed.append(existing.current_container_id)
        spec = self._spec(game_id, image_ref, state_dir)
        settled: set[type[RuntimeManagerError]] = set()
        while True:
            require_time_left("creating the engine container")
            self._lock.check(game_id)
            try:
                workload_id = self._engine.create(spec)
            except (Conflict, ImagePullFailed, EngineNetworkGone) as error:
                self._settle(error, settled, game_id, image_ref)
                continue
            try:
                self._lock.check(game_id)
                container_id = self._engine.start(workload_id)
                return self._wait_until_up(container_id)
            except EngineNetworkGone as error:
                self._discard(workload_id)
                self._settle(error, settled, game_id, image_ref)
            except RuntimeManagerError:
                self._discard(workload_id)
                raise

    def _settle(
        self,
        error: RuntimeManagerError,
        settled: set[type[RuntimeManagerError]],
        game_id: str,
        image_ref: str,
    ) -> None:
        """Deal with what `create` or `start` found, once per kind; re-raise what remains.

        - the name is taken (`Conflict`): by a container this deployment
          does not own, which is refused; or by an orphan of ours, left by
          an interrupted operation, which is removed;
        - the image is absent (`ImagePullFailed`), though the backend had
          seen it present: the pull policy decides again;
        - the engine network is gone (`EngineNetworkGone`): it is ensured
          again.
        """
        kind = type(error)
        if kind in settled:
            raise error
        settled.add(kind)
        if isinstance(error, Conflict):
            name = container_name(game_id)
            occupant = self._engine.inspect(name)
            if occupant is None:
                return  # gone meanwhile
            if not occupant.owned:
                raise Conflict(
                    f"a container named {name} that this rtmanager does not own is in the way"
                ) from error
            self._lock.check(game_id)
            self._engine.remove(occupant.id, force=True)
        elif isinstance(error, ImagePullFailed):
            require_time_left("pulling the engine image")
            self._engine.ensure_image(image_ref, self._settings.image_pull_policy)
        else:
            self._ensure_network()

    def _ensure_network(self) -> None:
        settings = self._settings
        network_labels = labels.engine_labels(
            cluster=settings.cluster, game_id="", image_ref="", extra=settings.container_labels
        )
        network_labels.pop(labels.GAME_ID)
        network_labels.pop(labels.IMAGE_REF)
        self._engine.ensure_network(settings.engine_network, network_labels)

    def _spec(self, game_id: str, image_ref: str, state_dir: Path) -> ContainerSpec:
        settings = self._settings
        name = container_name(game_id)
        return ContainerSpec(
            name=name,
            image_ref=image_ref,
            network=settings.engine_network,
            network_alias=name,
            labels=labels.engine_labels(
                cluster=settings.cluster,
                game_id=game_id,
                image_ref=image_ref,
                extra=settings.container_labels,
            ),
            env={
                "GALAXY_GAME_ID": game_id,
                "GALAXY_STATE_DIR": str(settings.engine_state_mount),
                "ENGINE_PORT": str(settings.engine_port),
            },
            state_host_path=str(state_dir),
            state_mount_path=str(settings.engine_state_mount),
            memory_bytes=settings.engine_memory,
            nano_cpus=int(settings.engine_cpus * 1_000_000_000),
            pids_limit=settings.engine_pids,
            user=settings.engine_user,
            log_max_bytes=settings.engine_log_max_size,
            log_max_files=settings.engine_log_max_files,
            read_only_rootfs=settings.engine_read_only,
        )

    def _wait_until_up(self, container_id: str) -> ContainerInfo:
        """Wait until the container runs (healthy, if it has a health check); return its report.

        Without a health check it must keep running for the settle period,
        so an engine that dies at once is caught here, not later.
        """
        # The caller's deadline may shorten the wait, never the settle period.
        settle = min(self._settings.start_settle, self._settings.start_timeout).total_seconds()
        timeout = bounded(self._settings.start_timeout).total_seconds()
        started = time.monotonic()
        deadline = started + timeout
        while True:
            info = self._engine.inspect(container_id)
            if info is None:
                raise ContainerStartFailed("the engine container vanished while starting")
            if not info.running:
                raise ContainerStartFailed(
                    f"the engine exited with code {info.exit_code} while starting"
                    f"{self._log_tail(container_id)}"
                )
            if info.health == "unhealthy":
                raise ContainerStartFailed(
                    f"the engine reported unhealthy while starting{self._log_tail(container_id)}"
                )
            now = time.monotonic()
            if info.health == "healthy" or (info.health is None and now - started >= settle):
                return info
            if now >= deadline:
                if cut_by_deadline(self._settings.start_timeout):
                    raise ServiceUnavailable(
                        "the caller's deadline passed while the engine was starting"
                    )
                raise ContainerStartFailed(
                    f"the engine did not become {'healthy' if info.health else 'running'} "
                    f"within {timeout:g}s{self._log_tail(container_id)}"
                )
            time.sleep(min(_POLL_SECONDS, max(deadline - now, 0.0)))

    def _log_tail(self, container_id: str) -> str:
        try:
            tail = self._engine.logs_tail(container_id, _LOG_TAIL_LINES).strip()
        except RuntimeManagerError:
            return ""
        return f"; last output:\n{tail}" if tail else ""

    def _discard(self, container_id: str) -> None:
        try:
            self._engine.remove(container_id, force=True)
        except RuntimeManagerError as error:
            log.error(
                "could not remove a half-started engine container",
                extra={"container_id": container_id, "problem": str(error)},
            )


def _install(
    uow: UnitOfWork, expected: RuntimeRecord | None, record: RuntimeRecord
) -> RuntimeRecord:
    """Write the new running record unless the stored one changed since it was read."""
    current = uow.records.get_for_update(record.game_id)
    if (current is None) != (expected is None) or (
        current is not None
        and expected is not None
        and (current.status, current.current_container_id)
        != (expected.status, expected.current_container_id)
    ):
        raise ConcurrentModification(
            f"runtime record of game {record.game_id} changed during the start"
        )
    uow.records.upsert(record)
    return record
