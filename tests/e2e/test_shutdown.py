"""Graceful shutdown: SIGTERM drains in-flight operations and leaves no lease behind."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from tests.conftest import REDIS_URL
from tests.e2e.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e


def test_sigterm_lets_an_in_flight_start_finish_and_releases_its_lease(
    server_environment: dict[str, str], tmp_path: object, redis_prefix: str
) -> None:
    env = dict(server_environment)
    # A long settle period keeps the start in flight while the signal lands.
    env["RTMANAGER_START_SETTLE"] = "3s"
    env["RTMANAGER_SHUTDOWN_GRACE"] = "20s"
    server: ServerProcess = start_server(env, tmp_path / "server.log")  # type: ignore[operator]
    results: list[RuntimeRecord | BaseException] = []

    def start() -> None:
        try:
            with RuntimeManagerClient(server.address, timeout=60) as client:
                results.append(client.start_runtime("drain", "galaxy/engine-stub:1.0.0"))
        except BaseException as error:  # recorded for the assertion below
            results.append(error)

    worker = threading.Thread(target=start)
    worker.start()
    lease_key = f"{redis_prefix}lease:game:drain"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 20
        while not client.exists(lease_key):
            assert time.monotonic() < deadline, "the start never took its lease"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        (result,) = results
        assert isinstance(result, RuntimeRecord), result
        assert result.status is RuntimeStatus.RUNNING
        assert not client.exists(lease_key)
        assert '"message": "draining"' in server.log()
    finally:
        client.close()
        server.stop()
