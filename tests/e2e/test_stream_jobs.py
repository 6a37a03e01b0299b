"""Lobby's jobs through Redis Streams, consumed by a real server process."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis
from redis.typing import EncodableT, FieldT

from rtmanager.client import NotFoundError, RuntimeManagerClient
from rtmanager.domain.operation import OpSource
from rtmanager.domain.runtime import RuntimeStatus
from tests.conftest import REDIS_URL
from tests.e2e.conftest import ServerProcess, eventually, replica_env, start_server
from tests.support import redis_replies as replies
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"


@pytest.fixture
def streams() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


def results(streams: redis.Redis, env: dict[str, str]) -> list[dict[str, str]]:
    return [
        fields
        for _id, fields in replies.entries(streams.xrange(env["RTMANAGER_JOB_RESULTS_STREAM"]))
    ]


def dead_letters(streams: redis.Redis, env: dict[str, str]) -> list[dict[str, str]]:
    return [
        fields
        for _id, fields in replies.entries(streams.xrange(env["RTMANAGER_DEAD_LETTER_STREAM"]))
    ]


def answers(streams: redis.Redis, env: dict[str, str]) -> Counter[tuple[str, str]]:
    """How many answers (results and dead letters) each job has, by (stream, entry id).

    The two job streams assign ids independently: one id may name a start
    and a stop job.
    """
    every = [*results(streams, env), *dead_letters(streams, env)]
    return Counter((f["stream"], f["job_id"]) for f in every)


def results_for(
    streams: redis.Redis, env: dict[str, str], job_ids: set[str]
) -> list[dict[str, str]]:
    return [r for r in results(streams, env) if r["job_id"] in job_ids]


def pending(streams: redis.Redis, env: dict[str, str], stream_var: str) -> int:
    info = replies.mapping(streams.xpending(env[stream_var], "rtmanager"))
    return int(info["pending"])


def test_start_and_stop_jobs_drive_a_runtime_and_report_results(
    server: ServerProcess,
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
) -> None:
    env = server_environment
    start_id = replies.text(
        streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "lobby-1", "image_ref": STUB})
    )
    (result,) = eventually(lambda: results_for(streams, env, {start_id}), within=30)
    assert result["outcome"] == "success"
    assert result["stream"] == env["RTMANAGER_START_JOBS_STREAM"]
    assert result["game_id"] == "lobby-1"
    record = json.loads(result["record"])
    assert record["status"] == "running"
    assert docker_client.containers.get(record["current_container_id"]).status == "running"
    assert pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0

    stop_id = replies.text(
        streams.xadd(
            env["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": "lobby-1", "reason": "game_finished"}
        )
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
    job: dict[FieldT, EncodableT] = {"game_id": "twice", "image_ref": STUB}
    first = replies.text(streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], job))
    second = replies.text(streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], job))
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
    bad = replies.text(streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "no-image"}))
    (letter,) = eventually(
        lambda: [
            f
            for _i, f in replies.entries(streams.xrange(env["RTMANAGER_DEAD_LETTER_STREAM"]))
            if f["job_id"] == bad
        ],
        within=30,
    )
    assert "image_ref" in letter["reason"]
    assert json.loads(letter["fields"]) == {"game_id": "no-image"}
    eventually(lambda: pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0, within=10)


def test_a_start_older_than_the_stop_already_applied_is_superseded_and_changes_nothing(
    server: ServerProcess,
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
    cluster: str,
) -> None:
    # Lobby said start(G) then stop(G); the stop reached the service first.
    env = server_environment
    stop_id = replies.text(
        streams.xadd(env["RTMANAGER_STOP_JOBS_STREAM"], {"game_id": "late-start"})
    )
    (stopped,) = eventually(lambda: results_for(streams, env, {stop_id}), within=30)
    assert (stopped["outcome"], stopped["error_code"]) == ("failure", "not_found")
    older = f"{int(stop_id.split('-')[0]) - 1000}-0"
    start_id = replies.text(
        streams.xadd(
            env["RTMANAGER_START_JOBS_STREAM"],
            {"game_id": "late-start", "image_ref": STUB},
            id=older,
        )
    )
    (late,) = eventually(lambda: results_for(streams, env, {start_id}), within=30)
    assert late["outcome"] == "superseded"
    assert (late["superseded_by"], late["superseded_by_stream"]) == (
        stop_id,
        env["RTMANAGER_STOP_JOBS_STREAM"],
    )
    assert late["record"] == ""
    ours = docker_client.containers.list(
        all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
    )
    assert ours == []
    with RuntimeManagerClient(server.address) as client:
        rows = list(client.iter_operations(game_id="late-start"))
    assert [row.source_ref for row in rows] == [stop_id]  # no row for the superseded job


def test_two_replicas_apply_interleaved_jobs_so_every_game_ends_as_lobbys_last_job_says(
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
    cluster: str,
    tmp_path: Path,
) -> None:
    env = server_environment
    replicas = [
        start_server(env, tmp_path / "a.log"),
        start_server(replica_env(env), tmp_path / "b.log"),
    ]
    try:
        rng = random.Random(7)
        plans = {f"mix-{n}": ["start", "stop"] * rng.randint(1, 2) for n in range(12)}
        for plan in plans.values():
            if rng.random() < 0.5:
                plan.append("start")  # about half the games end running
        queue = [(game_id, kind) for game_id, plan in plans.items() for kind in plan]
        order: list[tuple[str, str]] = []
        cursors = dict.fromkeys(plans, 0)
        while len(order) < len(queue):  # a random interleaving keeping each game's order
            game_id = rng.choice([g for g in plans if cursors[g] < len(plans[g])])
            order.append((game_id, plans[game_id][cursors[game_id]]))
            cursors[game_id] += 1
        job_ids: list[tuple[str, str]] = []
        last_ms: dict[str, int] = {}
        for game_id, kind in order:
            # Ids of the two streams are comparable to the millisecond: like
            # any real producer, publish a game's next job in a later one.
            while time.time() * 1000 < last_ms.get(game_id, 0) + 2:
                time.sleep(0.001)
            if kind == "start":
                stream = env["RTMANAGER_START_JOBS_STREAM"]
                fields: dict[FieldT, EncodableT] = {"game_id": game_id, "image_ref": STUB}
            else:
                stream = env["RTMANAGER_STOP_JOBS_STREAM"]
                fields = {"game_id": game_id}
            entry_id = replies.text(streams.xadd(stream, fields))
            last_ms[game_id] = int(entry_id.split("-")[0])
            job_ids.append((stream, entry_id))
        eventually(lambda: set(answers(streams, env)) >= set(job_ids), within=180, every=0.2)
        time.sleep(1.0)  # a second answer to any job would show up here
        counted = answers(streams, env)
        assert {job_id: counted[job_id] for job_id in job_ids} == dict.fromkeys(job_ids, 1)
        assert dead_letters(streams, env) == []
        with RuntimeManagerClient(replicas[0].address) as client:
            for game_id, plan in plans.items():
                said = [
                    (r["kind"], r["job_id"], r["outcome"], r["superseded_by"])
                    for r in results(streams, env)
                    if r["game_id"] == game_id
                ]
                try:
                    record = client.get_runtime(game_id)
                except NotFoundError:
                    # A stop that reached the service before the start it
                    # follows leaves the game without a runtime: not running.
                    assert plan[-1] == "stop", (game_id, plan, said)
                    continue
                history = [
                    (row.op_kind, row.outcome, row.error_code, row.source_ref)
                    for row in client.iter_operations(game_id=game_id)
                ]
                want = RuntimeStatus.RUNNING if plan[-1] == "start" else RuntimeStatus.STOPPED
                assert record.status is want, (game_id, plan, history, said)
                if want is RuntimeStatus.RUNNING:
                    container = docker_client.containers.get(record.current_container_id)
                    assert container.status == "running"
        running = docker_client.containers.list(
            filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        assert sorted(c.labels["com.galaxy.game_id"] for c in running) == sorted(
            g for g, plan in plans.items() if plan[-1] == "start"
        )
        # Both replicas did part of the work.
        handled = [r.log().count('"stream job answered"') for r in replicas]
        assert all(handled), handled
    finally:
        for replica in replicas:
            replica.stop()


def test_a_job_behind_a_lease_held_elsewhere_waits_for_it_and_is_never_dead_lettered(
    server: ServerProcess, server_environment: dict[str, str], streams: redis.Redis
) -> None:
    # Another replica's slow operation holds the game for 20 s: longer than
    # a handful of backoff retries, shorter than the retry window.
    env = server_environment
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:busy"
    streams.set(lease_key, "another-replica", px=20_000)
    started = time.monotonic()
    job = replies.text(
        streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "busy", "image_ref": STUB})
    )
    time.sleep(8)
    (waiting,) = replies.mappings(
        streams.xpending_range(env["RTMANAGER_START_JOBS_STREAM"], "rtmanager", "-", "+", 5)
    )
    assert waiting["times_delivered"] == 1  # retries are not deliveries
    assert results_for(streams, env, {job}) == []
    (result,) = eventually(lambda: results_for(streams, env, {job}), within=60, every=0.2)
    assert result["outcome"] == "success", result
    assert time.monotonic() - started >= 19
    assert dead_letters(streams, env) == []
    assert pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0


def test_a_job_in_flight_on_a_killed_replica_is_taken_over_once_its_lease_frees(
    server_environment: dict[str, str],
    streams: redis.Redis,
    docker_client: docker.DockerClient,
    cluster: str,
    tmp_path: Path,
) -> None:
    # Default lease TTL (60 s) and claim idle (30 s): the dead replica's
    # lease still lives when its entry is taken over, so the job waits.
    env = dict(server_environment)
    doomed_env = {**env, "RTMANAGER_START_SETTLE": "5s"}  # the start stays in flight a while
    doomed = start_server(doomed_env, tmp_path / "doomed.log")
    job = replies.text(
        streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "orphaned", "image_ref": STUB})
    )
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:orphaned"
    eventually(lambda: streams.exists(lease_key), within=30, every=0.02)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=30)
    killed_at = time.monotonic()
    assert results_for(streams, env, {job}) == []

    survivor = start_server(replica_env(env), tmp_path / "survivor.log")
    try:
        (result,) = eventually(lambda: results_for(streams, env, {job}), within=150, every=0.2)
        assert result["outcome"] == "success", result
        assert time.monotonic() - killed_at > 30  # taken over, not stolen early
        assert replies.integer(streams.pttl(lease_key)) < 0 or streams.get(lease_key) is None
        assert dead_letters(streams, env) == []
        eventually(lambda: pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0, within=10)
        record = json.loads(result["record"])
        ours = docker_client.containers.list(
            all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        assert [c.id for c in ours] == [record["current_container_id"]]
        with RuntimeManagerClient(survivor.address) as client:
            assert client.get_runtime("orphaned").status is RuntimeStatus.RUNNING
        assert '"took over jobs of a consumer that is gone"' in survivor.log()
    finally:
        survivor.stop()


def test_a_redelivered_job_that_was_already_answered_gets_no_second_answer(
    server_environment: dict[str, str], streams: redis.Redis, tmp_path: Path
) -> None:
    env = server_environment
    first = start_server(env, tmp_path / "first.log")
    job = replies.text(
        streams.xadd(env["RTMANAGER_START_JOBS_STREAM"], {"game_id": "again", "image_ref": STUB})
    )
    eventually(lambda: results_for(streams, env, {job}), within=30)
    first.stop()
    # The answered entry comes back to the consumer's pending list.
    stream = env["RTMANAGER_START_JOBS_STREAM"]
    streams.xclaim(stream, "rtmanager", env["RTMANAGER_INSTANCE_ID"], 0, [job], force=True)
    assert pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 1
    again = start_server(env, tmp_path / "again.log")
    try:
        eventually(lambda: pending(streams, env, "RTMANAGER_START_JOBS_STREAM") == 0, within=30)
        assert answers(streams, env)[(stream, job)] == 1
    finally:
        again.stop()


def test_jobs_pending_across_a_redis_restart_are_all_answered_once(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    with PrivateRedis.started(tmp_path / "redis") as private:
        env = {**server_environment, "RTMANAGER_REDIS_URL": private.url}
        streams = redis.Redis.from_url(private.url, decode_responses=True)
        server = start_server(env, tmp_path / "server.log")
        try:
            start_stream = env["RTMANAGER_START_JOBS_STREAM"]
            stop_stream = env["RTMANAGER_STOP_JOBS_STREAM"]
            job_ids = []
            for n in range(6):
                fields: dict[FieldT, EncodableT] = {"game_id": f"rr-{n}", "image_ref": STUB}
                job_ids.append((start_stream, replies.text(streams.xadd(start_stream, fields))))
            # Restart while the first jobs are being applied.
            eventually(lambda: answers(streams, env), within=60, every=0.05)
            private.restart(down_for=3)
            for n in range(6):
                job_ids.append(
                    (stop_stream, replies.text(streams.xadd(stop_stream, {"game_id": f"rr-{n}"})))
                )
            eventually(lambda: set(answers(streams, env)) >= set(job_ids), within=120, every=0.2)
            counted = answers(streams, env)
            assert [counted[job_id] for job_id in job_ids] == [1] * len(job_ids)
            with RuntimeManagerClient(server.address) as client:
                for n in range(6):
                    assert client.get_runtime(f"rr-{n}").status is RuntimeStatus.STOPPED
        finally:
            server.stop()
            streams.close()


def test_a_second_live_process_with_the_same_instance_id_refuses_to_start(
    server: ServerProcess, server_environment: dict[str, str], tmp_path: Path
) -> None:
    twin = replica_env(server_environment)
    twin["RTMANAGER_INSTANCE_ID"] = server_environment["RTMANAGER_INSTANCE_ID"]
    with pytest.raises(RuntimeError) as failed:
        start_server(twin, tmp_path / "twin.log")
    assert "another live rtmanager process consumes the job streams" in str(failed.value)


def test_sigterm_finishes_the_job_in_flight_and_leaves_unstarted_jobs_pending(
    server_environment: dict[str, str], streams: redis.Redis, tmp_path: Path
) -> None:
    env = {
        **server_environment,
        "RTMANAGER_START_SETTLE": "3s",  # the first start stays in flight a while
        "RTMANAGER_STREAM_WORKERS": "1",  # the second job waits behind it
    }
    server = start_server(env, tmp_path / "server.log")
    stream = env["RTMANAGER_START_JOBS_STREAM"]
    first = replies.text(streams.xadd(stream, {"game_id": "inflight", "image_ref": STUB}))
    second = replies.text(streams.xadd(stream, {"game_id": "queued", "image_ref": STUB}))
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:inflight"
    eventually(lambda: streams.exists(lease_key), within=30, every=0.02)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    (result,) = results_for(streams, env, {first})
    assert result["outcome"] == "success"
    assert not streams.exists(lease_key)
    assert results_for(streams, env, {second}) == []
    (left,) = replies.mappings(streams.xpending_range(stream, "rtmanager", "-", "+", 5))
    assert left["message_id"] == second  # not acknowledged unanswered
    again = start_server(env, tmp_path / "again.log")  # same name: takes it back
    try:
        (later,) = eventually(lambda: results_for(streams, env, {second}), within=60)
        assert later["outcome"] == "success"
    finally:
        again.stop()
