"""ExplainRuntime against a real server: running, crashed, failed, busy and awaited games."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import docker
import pytest
import redis

from rtmanager.client import ContainerStartFailedError, NotFoundError, RuntimeManagerClient
from rtmanager.domain.explanation import RuntimeExplanation
from rtmanager.domain.jobs import JobKind
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import CRASH_IMAGE, REDIS_URL
from tests.e2e.conftest import ServerProcess, eventually, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"


@pytest.fixture
def server(server_environment: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose starts stay in flight 2 s (its lease can be seen) and whose
    stream consumer holds one job at a time (later jobs stay undelivered)."""
    env = {
        **server_environment,
        "RTMANAGER_START_SETTLE": "2s",
        "RTMANAGER_STREAM_MAX_BUFFERED": "1",
    }
    handle = start_server(env, tmp_path / "server.log")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[RuntimeManagerClient]:
    with RuntimeManagerClient(server.address, timeout=60) as client:
        yield client


@pytest.fixture
def lobby() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield connection
    connection.close()


def test_a_running_game_and_the_start_that_holds_its_lease(
    server: ServerProcess, client: RuntimeManagerClient, docker_client: docker.DockerClient
) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            client.start_runtime("alive", STUB)
        except BaseException as error:
            errors.append(error)

    starting = threading.Thread(target=start)
    starting.start()

    def while_held() -> RuntimeExplanation | None:
        try:
            explained = client.explain_runtime("alive")
        except NotFoundError:
            return None  # the start has not taken the lease yet
        return explained if explained.lease is not None else None

    during = eventually(while_held, within=30)
    starting.join(timeout=60)
    assert errors == []
    assert during.lease is not None
    assert during.lease.instance_id == server.env["RTMANAGER_INSTANCE_ID"]
    assert during.lease.ttl is not None
    assert timedelta(0) < during.lease.ttl <= timedelta(seconds=60)

    explained = client.explain_runtime("alive")
    record = explained.record
    assert record is not None and record.status is RuntimeStatus.RUNNING
    container = explained.container
    assert container is not None
    assert (container.id, container.name) == (record.current_container_id, "galaxy-game-alive")
    assert (container.status, container.running, container.owned) == ("running", True, True)
    assert (container.exit_code, container.oom_killed, container.restart_count) == (None, False, 0)
    assert container.image_ref == STUB
    assert container.image_id == docker_client.images.get(STUB).id
    assert container.started_at is not None and container.finished_at is None
    assert [(e.op_kind, e.outcome) for e in explained.operations] == [
        (OpKind.START, Outcome.SUCCESS)
    ]
    assert (explained.pending_jobs, explained.pending_jobs_truncated) == ((), False)
    assert explained.lease is None


def test_a_crashed_engine_a_failed_first_start_and_an_unknown_game(
    client: RuntimeManagerClient, docker_client: docker.DockerClient
) -> None:
    record = client.start_runtime("victim", STUB)
    docker_client.containers.get(record.current_container_id).kill()  # behind the server's back

    def marked_stopped() -> RuntimeExplanation | None:
        explained = client.explain_runtime("victim")
        stopped = explained.record is not None and explained.record.status is RuntimeStatus.STOPPED
        return explained if stopped else None

    explained = eventually(marked_stopped, within=30)
    container = explained.container
    assert container is not None and container.id == record.current_container_id
    assert (container.status, container.running, container.exit_code) == ("exited", False, 137)
    assert container.oom_killed is False
    assert container.finished_at is not None
    newest = explained.operations[0]
    assert (newest.op_kind, newest.op_source) == (OpKind.STOP, OpSource.AUTO_RECONCILE)
    assert [e.op_kind for e in explained.operations] == [OpKind.STOP, OpKind.START]

    with pytest.raises(ContainerStartFailedError):
        client.start_runtime("doomed", CRASH_IMAGE)
    failed = client.explain_runtime("doomed")
    assert (failed.record, failed.container, failed.lease) == (None, None, None)
    (attempt,) = failed.operations
    assert (attempt.op_kind, attempt.outcome, attempt.error_code) == (
        OpKind.START,
        Outcome.FAILURE,
        "container_start_failed",
    )

    with pytest.raises(NotFoundError):
        client.explain_runtime("nobody")


def test_a_busy_game_shows_its_lease_holder_and_the_lobby_jobs_waiting_for_it(
    server: ServerProcess, client: RuntimeManagerClient, lobby: redis.Redis
) -> None:
    env = server.env
    # Another replica holds the game, with a token like the server's own.
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:held"
    lobby.set(lease_key, f"other-replica/{secrets.token_urlsafe(24)}", px=30_000)
    start_id = lobby.xadd(
        env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "held", "image_ref": STUB}
    )

    def start_delivered() -> RuntimeExplanation | None:
        explained = client.explain_runtime("held")
        jobs = explained.pending_jobs
        return explained if jobs and jobs[0].delivered else None

    eventually(start_delivered, within=30)
    # The consumer holds the start (retrying behind the lease) and no more.
    stop_id = lobby.xadd(env["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": "held"})

    explained = client.explain_runtime("held")

    assert explained.lease is not None
    assert explained.lease.instance_id == "other-replica"
    assert explained.lease.ttl is not None
    assert timedelta(0) < explained.lease.ttl <= timedelta(seconds=30)
    assert [
        (j.job.kind, j.job.entry_id, j.consumer, j.deliveries) for j in explained.pending_jobs
    ] == [
        (JobKind.START, start_id, env["RTMANAGER_INSTANCE_ID"], 1),
        (JobKind.STOP, stop_id, "", 0),
    ]
    assert explained.pending_jobs[0].fields == {"game_id": "held", "image_ref": STUB}
    assert explained.pending_jobs[0].idle is not None
    assert explained.pending_jobs[1].idle is None
    assert explained.pending_jobs_truncated is False
    assert (explained.record, explained.container, explained.operations) == (None, None, ())
