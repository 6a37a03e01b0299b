"""Lifecycle services wired to the real adapters in-process (no gRPC in between)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import docker
import psycopg
import pytest
import redis

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.adapters.redis.leases import RedisGameLeases
from rtmanager.deadlines import deadline_scope
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.common import LifecycleDeps, LifecycleSettings
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.lifecycle.restart import RecreateService, RestartRequest, RestartService
from rtmanager.lifecycle.start import StartRequest, StartService
from rtmanager.lifecycle.stop import StopRequest, StopService
from rtmanager.ports import PullPolicy
from rtmanager.telemetry import Telemetry
from tests.conftest import DOCKER_HOST, POSTGRES_DSN, REDIS_URL, TEST_LABEL

pytestmark = pytest.mark.integration

STUB = "galaxy/engine-stub:1.0.0"


@dataclass
class Wired:
    start: StartService
    stop: StopService
    reconciler: Reconciler
    leases: RedisGameLeases
    schema: str
    restart: RestartService


@pytest.fixture
def wired(
    pg_schema: str,
    redis_prefix: str,
    cluster: str,
    state_root: Path,
    docker_cleanup: str,
) -> Iterator[Wired]:
    apply_migrations(POSTGRES_DSN, pg_schema, Path("migrations"))
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=4, timeout=timedelta(seconds=5))
    client = redis.Redis.from_url(REDIS_URL)
    engine = DockerEngineAdapter(base_url=DOCKER_HOST, cluster=cluster)
    leases = RedisGameLeases(client, prefix=redis_prefix)
    telemetry = Telemetry()
    deps = LifecycleDeps(
        recorder=OperationRecorder(PostgresUnitOfWorkFactory(pool), telemetry),
        lock=GameLock(leases, timedelta(seconds=10)),
        docker=engine,
        settings=LifecycleSettings(
            cluster=cluster,
            engine_network=f"galaxy-{cluster}",
            engine_port=8080,
            state_root=state_root,
            engine_state_mount=Path("/var/lib/galaxy-game"),
            image_allowlist=("galaxy/",),
            image_pull_policy=PullPolicy.NEVER,
            engine_memory=64 * 1024 * 1024,
            engine_cpus=0.5,
            engine_pids=64,
            start_timeout=timedelta(seconds=20),
            stop_timeout=timedelta(seconds=5),
            start_settle=timedelta(milliseconds=300),
            container_labels={TEST_LABEL: docker_cleanup},
        ),
    )
    start, stop = StartService(deps), StopService(deps)
    try:
        yield Wired(
            start,
            stop,
            Reconciler(deps, telemetry=telemetry),
            leases,
            pg_schema,
            RestartService(RecreateService(deps, stop=stop, start=start)),
        )
    finally:
        pool.close()
        client.close()
        engine.close()


def rows(schema: str, game_id: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(POSTGRES_DSN) as conn:
        return [
            (str(kind), str(outcome), str(code or ""))
            for kind, outcome, code in conn.execute(
                f'SELECT op_kind, outcome, error_code FROM "{schema}".operation_log '
                "WHERE game_id = %s ORDER BY id",
                (game_id,),
            ).fetchall()
        ]


def test_start_and_stop_commit_each_record_change_with_its_audit_row(wired: Wired) -> None:
    started = wired.start.handle(StartRequest("real-1", STUB, OpSource.GM_REST, "r1"))
    assert started.ok and started.record is not None
    assert started.record.status is RuntimeStatus.RUNNING
    stopped = wired.stop.handle(StopRequest("real-1", OpSource.GM_REST))
    assert stopped.ok and stopped.record is not None
    assert stopped.record.status is RuntimeStatus.STOPPED
    assert rows(wired.schema, "real-1") == [("start", "success", ""), ("stop", "success", "")]


def parents_and_events(schema: str, game_id: str) -> list[tuple[object, ...]]:
    """(op_kind, parent_op_kind, parent_operation_id, operation id, event id) by operation id."""
    with psycopg.connect(POSTGRES_DSN) as conn:
        return conn.execute(
            f"SELECT o.op_kind, o.parent_op_kind, o.parent_operation_id, o.id, e.id"
            f' FROM "{schema}".operation_log o'
            f' LEFT JOIN "{schema}".runtime_events e ON e.operation_id = o.id'
            " WHERE o.game_id = %s ORDER BY o.id",
            (game_id,),
        ).fetchall()


@pytest.mark.parametrize("deadline", [None, 5.0], ids=["no-deadline", "caller-deadline"])
def test_a_restart_draws_its_id_before_its_inner_rows_and_publishes_its_end(
    wired: Wired, deadline: float | None
) -> None:
    assert wired.start.handle(StartRequest("real-r", STUB, OpSource.GM_REST)).ok
    # A caller's deadline gives every unit of work a timeout of its own (a
    # transaction begun with SET LOCAL), drawing the id included.
    with deadline_scope(deadline):
        restarted = wired.restart.handle(RestartRequest("real-r", OpSource.GM_REST, "gm-1"))
    assert restarted.ok, restarted.failure

    start, outer, stop, inner_start = parents_and_events(wired.schema, "real-r")
    assert (start[0], start[1]) == ("start", None)
    assert outer[:3] == ("restart", None, None) and outer[3] == restarted.operation_id
    assert stop[:3] == ("stop", "restart", outer[3])
    assert inner_start[:3] == ("start", "restart", outer[3])
    # Every row has its event; the restart's comes last.
    event_ids = [start[4], stop[4], inner_start[4], outer[4]]
    assert None not in event_ids and event_ids == sorted(event_ids)


def test_a_lease_held_by_another_replica_makes_the_start_a_retryable_conflict(
    wired: Wired, docker_client: docker.DockerClient, cluster: str
) -> None:
    other = wired.leases.acquire("real-2", timedelta(seconds=30))
    assert other is not None
    busy = wired.start.handle(StartRequest("real-2", STUB, OpSource.LOBBY_STREAM, "1-0"))
    assert busy.failure is not None
    assert (busy.failure.code, busy.failure.race) == (ErrorCode.CONFLICT, True)
    assert (
        docker_client.containers.list(
            all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        == []
    )
    assert wired.leases.release(other)
    assert wired.start.handle(StartRequest("real-2", STUB, OpSource.LOBBY_STREAM, "1-0")).ok
    assert rows(wired.schema, "real-2") == [
        ("start", "failure", "conflict"),
        ("start", "success", ""),
    ]


def test_an_observed_exit_marks_only_the_records_current_container_stopped(
    wired: Wired, docker_client: docker.DockerClient
) -> None:
    started = wired.start.handle(StartRequest("real-3", STUB, OpSource.GM_REST))
    assert started.record is not None
    container_id = started.record.current_container_id
    assert (
        wired.reconciler.observe_exit("real-3", "some-other-id", event="die", exit_code=1) is None
    )
    docker_client.containers.get(container_id).kill()
    result = wired.reconciler.observe_exit("real-3", container_id, event="die", exit_code=137)
    assert result is not None and result.ok and result.record is not None
    assert result.record.status is RuntimeStatus.STOPPED
    assert rows(wired.schema, "real-3")[-1] == (str(OpKind.STOP), "success", "")
    assert wired.reconciler.run_pass().actions == ()
