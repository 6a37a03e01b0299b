"""An operation whose game lease is lost behind its back stops before acting further."""

from __future__ import annotations

import threading
from pathlib import Path

import docker
import pytest
import redis

from rtmanager.client import ConflictError, NotFoundError, RuntimeManagerClient
from rtmanager.domain.operation import OpKind, Outcome
from tests.conftest import REDIS_URL
from tests.e2e.conftest import eventually, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"


@pytest.mark.parametrize("how", ["deleted", "taken-over"])
def test_a_start_that_lost_its_lease_commits_nothing_and_says_so_in_the_audit(
    how: str,
    server_environment: dict[str, str],
    docker_client: docker.DockerClient,
    cluster: str,
    tmp_path: Path,
) -> None:
    # Default lease TTL (60 s, renewed every 20 s); the engine takes 25 s to
    # count as started, so a renewal happens while the start is in flight.
    env = {**server_environment, "RTMANAGER_START_SETTLE": "25s", "RTMANAGER_START_TIMEOUT": "40s"}
    server = start_server(env, tmp_path / "server.log")
    game = f"lost-{how}"  # container names are global to the Docker host
    lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:{game}"
    keys = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    outcome: list[BaseException | None] = []

    def start() -> None:
        with RuntimeManagerClient(server.address) as client:
            try:
                client.start_runtime(game, STUB, timeout=90)
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

    caller = threading.Thread(target=start)
    try:
        caller.start()
        eventually(lambda: keys.exists(lease_key), within=30, every=0.02)
        if how == "deleted":
            keys.delete(lease_key)
        else:
            keys.set(lease_key, "another-replica", px=120_000)
        caller.join(timeout=90)
        (error,) = outcome
        assert isinstance(error, ConflictError), error
        assert "lost the lease" in str(error)
        with RuntimeManagerClient(server.address) as client:
            with pytest.raises(NotFoundError):
                client.get_runtime(game)
            (row,) = list(client.iter_operations(game_id=game))
        assert (row.op_kind, row.outcome, row.error_code) == (
            OpKind.START,
            Outcome.FAILURE,
            "conflict",
        )
        assert "lost the lease" in row.error_message
        # The engine it had started was removed: nothing runs for the game.
        ours = docker_client.containers.list(
            all=True, filters={"label": f"com.galaxy.rtmanager.cluster={cluster}"}
        )
        assert ours == []
        if how == "taken-over":
            assert keys.get(lease_key) == "another-replica"  # never deleted by the loser
    finally:
        keys.delete(lease_key)
        keys.close()
        server.stop()
