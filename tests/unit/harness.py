"""The lifecycle services wired to the fakes, exactly as `rtmanager.app` wires them.

`make_harness(tmp_path)` returns a `Harness`: the fakes, the settings and
every lifecycle service, plus helpers that seed records (with their
containers) and read back the audit rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from rtmanager.domain.operation import OperationEntry, OpKind
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.cleanup import CleanupService
from rtmanager.lifecycle.common import LifecycleDeps, LifecycleSettings
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.patch import PatchService
from rtmanager.lifecycle.recorder import OperationRecorder, OperationResult
from rtmanager.lifecycle.restart import RecreateService, RestartService
from rtmanager.lifecycle.start import StartService
from rtmanager.lifecycle.stop import StopService
from rtmanager.ports import EngineUser, PullPolicy, RuntimeEvent
from rtmanager.telemetry import Telemetry
from tests.unit.fakes import FakeBackend, FakeLeases, FakeStore, FakeUnitOfWorkFactory

CLUSTER = "prod"
NETWORK = "galaxy-engines"
PORT = 8080
STATE_MOUNT = Path("/var/lib/galaxy-game")
IMAGE = "galaxy/engine:1.0.0"
IMAGE_PATCH = "galaxy/engine:1.0.1"
IMAGE_PULLABLE = "galaxy/engine:1.0.2"
IMAGE_MISSING = "galaxy/engine:1.0.9"
LEASE_TTL = timedelta(seconds=30)
STOP_TIMEOUT = timedelta(seconds=7)
MEMORY = 512 * 1024 * 1024
CPUS = 1.5
PIDS = 256
# The test process's own ids, so starts may give state directories to them
# without being root; the tests of that giving choose other ids.
ENGINE_USER = EngineUser(os.getuid(), os.getgid())
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_MAX_FILES = 4
EXTRA_LABELS = {"com.example.team": "galaxy"}


def lifecycle_settings(state_root: Path, **changes: Any) -> LifecycleSettings:
    """Small, fast settings: no settle period, a short start timeout."""
    settings = LifecycleSettings(
        cluster=CLUSTER,
        engine_network=NETWORK,
        engine_port=PORT,
        state_root=state_root,
        engine_state_mount=STATE_MOUNT,
        image_allowlist=("galaxy/",),
        image_pull_policy=PullPolicy.IF_MISSING,
        engine_memory=MEMORY,
        engine_cpus=CPUS,
        engine_pids=PIDS,
        engine_user=ENGINE_USER,
        engine_log_max_size=LOG_MAX_BYTES,
        engine_log_max_files=LOG_MAX_FILES,
        start_timeout=timedelta(milliseconds=150),
        stop_timeout=STOP_TIMEOUT,
        start_settle=timedelta(0),
        container_labels=dict(EXTRA_LABELS),
    )
    return replace(settings, **changes)


@dataclass
class Harness:
    """The fakes and the services built on them."""

    store: FakeStore
    units_of_work: FakeUnitOfWorkFactory
    leases: FakeLeases
    docker: FakeBackend
    settings: LifecycleSettings
    recorder: OperationRecorder
    lock: GameLock
    start: StartService
    stop: StopService
    recreate: RecreateService
    restart: RestartService
    patch: PatchService
    cleanup: CleanupService

    # -- seeding ------------------------------------------------------------------

    def record(self, game_id: str) -> RuntimeRecord:
        """The committed record of a game."""
        return self.store.record(game_id)

    def running_record(
        self, game_id: str, container_id: str, image_ref: str = IMAGE
    ) -> RuntimeRecord:
        """A running record started an hour ago (not stored)."""
        an_hour_ago = utc_now() - timedelta(hours=1)
        return RuntimeRecord(
            game_id=game_id,
            status=RuntimeStatus.RUNNING,
            engine_endpoint=self.settings.endpoint(game_id),
            state_path=str(self.settings.state_dir(game_id)),
            docker_network=NETWORK,
            last_op_at=an_hour_ago,
            created_at=an_hour_ago - timedelta(days=1),
            current_container_id=container_id,
            current_image_ref=image_ref,
            started_at=an_hour_ago,
        )

    def seed_running(
        self, game_id: str, image_ref: str = IMAGE, *, container: bool = True
    ) -> RuntimeRecord:
        """A running record started an hour ago, with its running engine (unless not)."""
        container_id = self.docker.add_engine(game_id, image_ref) if container else "0" * 63 + "1"
        return self.store.put(self.running_record(game_id, container_id, image_ref))

    def seed_stopped(
        self, game_id: str, image_ref: str = IMAGE, *, container: bool = True
    ) -> RuntimeRecord:
        """A stopped record, with its exited engine (or without any container id)."""
        running = self.seed_running(game_id, image_ref)
        if container:
            self.docker.containers[running.current_container_id].state = "exited"
            self.docker.containers[running.current_container_id].exit_code = 0
        else:
            del self.docker.containers[running.current_container_id]
        stopped = running.with_status(
            RuntimeStatus.STOPPED,
            running.last_op_at + timedelta(minutes=1),
            container_id=None if container else "",
        )
        return self.store.put(stopped)

    def seed_removed(self, game_id: str, image_ref: str = IMAGE) -> RuntimeRecord:
        """A removed record whose container is gone."""
        stopped = self.seed_stopped(game_id, image_ref)
        del self.docker.containers[stopped.current_container_id]
        removed = stopped.with_status(
            RuntimeStatus.REMOVED, stopped.last_op_at + timedelta(minutes=1), container_id=""
        )
        return self.store.put(removed)

    # -- reading back -------------------------------------------------------------

    def rows(self, game_id: str | None = None) -> list[OperationEntry]:
        """Committed audit rows, in commit order."""
        return self.store.entries(game_id)

    def kinds(self, game_id: str | None = None) -> list[tuple[OpKind, str]]:
        """(op_kind, outcome) of the committed audit rows, in commit order."""
        return [(row.op_kind, str(row.outcome)) for row in self.rows(game_id)]

    def events(self, game_id: str | None = None) -> list[RuntimeEvent]:
        """Committed watch events as the feed delivers them, in feed order."""
        return self.store.runtime_events(game_id)

    def only_row(self, game_id: str) -> OperationEntry:
        """The one committed audit row of a game."""
        rows = self.rows(game_id)
        assert len(rows) == 1, rows
        return rows[0]


def make_harness(
    tmp_path: Path, *, images: tuple[str, ...] = (IMAGE, IMAGE_PATCH), **settings_changes: Any
) -> Harness:
    """Build the services as `rtmanager.app.Application` does, on fakes."""
    state_root = tmp_path / "games"
    state_root.mkdir(exist_ok=True)
    store = FakeStore()
    units_of_work = FakeUnitOfWorkFactory(store)
    leases = FakeLeases()
    docker = FakeBackend(cluster=CLUSTER, images=images, pullable={IMAGE_PULLABLE})
    settings = lifecycle_settings(state_root, **settings_changes)
    telemetry = Telemetry()
    lock = GameLock(leases, LEASE_TTL, on_acquire_latency=telemetry.lease_acquired)
    recorder = OperationRecorder(units_of_work, telemetry)
    deps = LifecycleDeps(recorder=recorder, lock=lock, engine=docker, settings=settings)
    start = StartService(deps)
    stop = StopService(deps)
    recreate = RecreateService(deps, stop=stop, start=start)
    return Harness(
        store=store,
        units_of_work=units_of_work,
        leases=leases,
        docker=docker,
        settings=settings,
        recorder=recorder,
        lock=lock,
        start=start,
        stop=stop,
        recreate=recreate,
        restart=RestartService(recreate),
        patch=PatchService(recreate),
        cleanup=CleanupService(deps, stop=stop),
    )


def failure_code(result: OperationResult) -> str:
    """The stable error code of a failed result ('' for success)."""
    return str(result.failure.code) if result.failure is not None else ""
