"""Lobby's jobs through Redis Streams, consumed by a real server process."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis

from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.operation import OpSource
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import REDIS_URL
from tests.e2e.conftest import ServerProcess, eventually, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"


@pytest.fixture
def streams() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


def results(streams: redis.Redis, env: dict[str, str]) -> list[dict[str, str]]:
    return [fields for _id, fields in streams.xrange(env["RTMANAGER_JOB_RESULTS_STREAM"])]


def results_for(
    streams: redis.Redis, env: dict[str, str], job_ids: set[str]
) -> list[dict[str, str]]:
    return [r for r in results(streams, env) if r["job_id"] in job_ids]


def pending(streams: redis.Redis, env: dict[str, str], stream_var: str) -> int:
    info = streams.xpending(env[stream_var], "rtmanager")
    return int(info["pending"])


def test_start_and_stop_jobs_drive_a_runtime_and_report_results(
    server: ServerProcess,
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
) -> None:
    env = server_environment
    start_id = streams.xadd(
        env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "lobby-1", "image_ref": STUB}
    )
    (result,) = eventually(lambda: results_for(streams, env, {start_id}), within=30)
    assert result["outcome"] == "success"
    assert result["stream"] == env["RTMANAGER_START_JOBS_STREAM"]
    assert result["game_id"] == "lobby-1"
    record = json.loads(result["record"])
    assert record["status"] == "running"
    assert docker_client.containers.get(record["current_container_id"]).status == "running"
    assert pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0

    stop_id = streams.xadd(
        env["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": "lobby-1", "reason": "game_finished"}
    )
    (stopped,) = eventually(lambda: results_for(streams, env, {stop_id}), within=30)
    assert stopped["outcome"] == "success"
    assert json.loads(stopped["record"])["status"] == "stopped"

    with RuntimeManagerClient(server.address) as client:
        rows = list(client.iter_operations(game_id="lobby-1"))
    assert {(row.op_source, row.source_ref) for row in rows} == {
        (OpSource.LOBBY_STREAM, start_id),
        (OpSource.LOBBY_STREAM, stop_id),
    }


def test_start_then_stop_published_back_to_back_ends_stopped(
    server: ServerProcess, server_environment: dict[str, str], streams: redis.Redis
) -> None:
    env = server_environment
    with streams.pipeline(transaction=False) as pipe:
        pipe.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "b2b", "image_ref": STUB})
        pipe.xadd(env["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": "b2b"})
        start_id, stop_id = pipe.execute()
    done = eventually(
        lambda: len(got := results_for(streams, env, {start_id, stop_id})) == 2 and got, within=30
    )
    assert [r["job_id"] for r in done] == [start_id, stop_id]
    assert all(r["outcome"] == "success" for r in done)
    with RuntimeManagerClient(server.address) as client:
        assert client.get_runtime("b2b").status is RuntimeStatus.STOPPED


def test_the_same_start_job_delivered_twice_makes_one_container_and_two_successes(
    server: ServerProcess,
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
    cluster: str,
) -> None:
    env = server_environment
    job = {"game_id": "twice", "image_ref": STUB}
    first = streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], job)
    second = streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], job)
    done = eventually(
        lambda: len(got := results_for(streams, env, {first, second})) == 2 and got, within=30
    )
    assert [r["outcome"] for r in done] == ["success", "success"]
    ours = docker_client.containers.list(
        all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
    )
    assert len(ours) == 1
    assert {json.loads(r["record"])["current_container_id"] for r in done} == {ours[0].id}


def test_a_malformed_job_is_dead_lettered_and_acknowledged(
    server: ServerProcess, server_environment: dict[str, str], streams: redis.Redis
) -> None:
    env = server_environment
    bad = streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "no-image"})
    (letter,) = eventually(
        lambda: [
            f for _i, f in streams.xrange(env["RTMANAGER_DEAD_LETTER_STREAM"]) if f["job_id"] == bad
        ],
        within=30,
    )
    assert "image_ref" in letter["reason"]
    assert json.loads(letter["fields"]) == {"game_id": "no-image"}
    eventually(lambda: pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0, within=10)


def test_a_job_of_a_consumer_killed_mid_job_is_reclaimed_and_completed(
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
    cluster: str,
    tmp_path: Path,
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_START_SETTLE"] = "3s"  # the job is in flight for a while
    env["RTMANAGER_STREAM_CLAIM_IDLE"] = "1s"
    env["RTMANAGER_GAME_LEASE_TTL"] = "2s"
    first = start_server(env, tmp_path / "first.log")
    job = streams.xadd(
        env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "orphaned", "image_ref": STUB}
    )
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:orphaned"
    eventually(lambda: streams.exists(lease_key), within=30, every=0.02)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    assert results_for(streams, env, {job}) == []

    second = start_server(env, tmp_path / "second.log")
    try:
        (result,) = eventually(lambda: results_for(streams, env, {job}), within=45, every=0.1)
        assert result["outcome"] == "success", result
        eventually(lambda: pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0, within=10)
        record = json.loads(result["record"])
        ours = docker_client.containers.list(
            all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        assert [c.id for c in ours] == [record["current_container_id"]]
        with RuntimeManagerClient(second.address) as client:
            assert client.get_runtime("orphaned").status is RuntimeStatus.RUNNING
    finally:
        second.stop()


def test_a_job_that_keeps_failing_is_dead_lettered_after_the_configured_deliveries(
    server_environment: dict[str, str], streams: redis.Redis, tmp_path: Path
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_STREAM_MAX_DELIVERIES"] = "2"
    server = start_server(env, tmp_path / "server.log")
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:busy"
    # Someone else holds the game's lease for good: every attempt is a
    # transient conflict.
    streams.set(lease_key, "someone-else", px=120_000)
    try:
        job = streams.xadd(
            env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "busy", "image_ref": STUB}
        )
        (letter,) = eventually(
            lambda: [
                f
                for _i, f in streams.xrange(env["RTMANAGER_DEAD_LETTER_STREAM"])
                if f["job_id"] == job
            ],
            within=60,
            every=0.1,
        )
        assert int(letter["deliveries"]) > 2
        eventually(lambda: pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0, within=10)
        assert results_for(streams, env, {job}) == []
    finally:
        streams.delete(lease_key)
        server.stop()
