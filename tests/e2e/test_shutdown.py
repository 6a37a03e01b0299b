"""Graceful shutdown (SPEC §5): SIGTERM is acted on at once, in-flight work finishes.

Each test runs the real server as a separate process and signals it the way
an orchestrator does.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import redis

from rtmanager.client import RuntimeManagerClient
from rtmanager.domain.operation import OpKind, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from tests.conftest import REDIS_URL
from tests.e2e.conftest import REPO, ServerProcess, eventually, free_port, start_server
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.e2e

# SPEC §5: a signal is acted on within a second; an idle server is gone within two.
ACTED_ON_WITHIN = 1.0
IDLE_EXIT_WITHIN = 2.0
# A server still starting up has nothing in flight either; a little slack
# for the dependency probe it may be in the middle of.
STARTING_EXIT_WITHIN = 3.0
IDLE_RUNS = 10
# How long Redis stays down after a lease release failed in the drain.
REDIS_BACK_AFTER = 1.0


def sigterm_and_time_exit(process: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Send SIGTERM; return how many seconds the process took to exit."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=timeout)
    return time.monotonic() - sent


def spawn_server(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `rtmanager serve` without waiting for it to be ready."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "rtmanager.cli", "serve"],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def start_in_background(address: str, game_id: str) -> Future[RuntimeRecord]:
    """`StartRuntime` of `game_id` (engine-stub 1.0.0), called from a thread of its own."""
    started: Future[RuntimeRecord] = Future()

    def start() -> None:
        try:
            with RuntimeManagerClient(address, timeout=60) as client:
                started.set_result(client.start_runtime(game_id, "galaxy/engine-stub:1.0.0"))
        except BaseException as error:  # for the test's `result()`
            started.set_exception(error)

    threading.Thread(target=start, daemon=True).start()
    return started


def test_sigterm_ends_an_idle_server_within_two_seconds_every_time(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    # A signal handed to a thread other than the main one used to wait
    # until the main thread woke up for another reason (a minute, once):
    # only repetition shows that no signal is lost.
    for run in range(IDLE_RUNS):
        log_path = tmp_path / f"server-{run}.log"
        server = start_server(server_environment, log_path)
        try:
            took = sigterm_and_time_exit(server.process)
            log = server.log()
            assert server.process.returncode == 0, log[-4000:]
            assert took < IDLE_EXIT_WITHIN, f"run {run}: exit took {took:.2f}s\n{log[-4000:]}"
            assert '"message": "received SIGTERM"' in log
            assert '"message": "stopped"' in log
        finally:
            server.stop(5)


def test_sigint_drains_like_sigterm(server_environment: dict[str, str], tmp_path: Path) -> None:
    server = start_server(server_environment, tmp_path / "server.log")
    try:
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=30) == 0
        log = server.log()
        assert '"message": "received SIGINT"' in log
        assert '"message": "draining"' in log
        assert '"message": "stopped"' in log
    finally:
        server.stop(5)


def test_sigterm_lets_an_in_flight_start_finish_and_releases_its_lease(
    server_environment: dict[str, str], tmp_path: Path, redis_prefix: str
) -> None:
    env = dict(server_environment)
    # A long settle period keeps the start in flight while the signal lands.
    env["RTMANAGER_START_SETTLE"] = "3s"
    env["RTMANAGER_SHUTDOWN_GRACE"] = "20s"
    server: ServerProcess = start_server(env, tmp_path / "server.log")
    started = start_in_background(server.address, "drain")
    lease_key = f"{redis_prefix}lease:game:drain"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        eventually(lambda: client.exists(lease_key), within=20)
        server.process.send_signal(signal.SIGTERM)
        # Acted on at once, while the start still runs.
        eventually(lambda: '"message": "received SIGTERM"' in server.log(), within=ACTED_ON_WITHIN)
        assert client.exists(lease_key), "the start should still be in flight"
        result = started.result(timeout=60)
        assert server.process.wait(timeout=60) == 0, server.log()[-4000:]
        assert result.status is RuntimeStatus.RUNNING
        assert not client.exists(lease_key)
        log = server.log()
        assert log.index('"message": "draining"') < log.index('"message": "stopped"')
    finally:
        client.close()
        server.stop()

    # What the client was told is what was committed.
    after = start_server(env, tmp_path / "after.log")
    try:
        with RuntimeManagerClient(after.address) as reader:
            assert reader.get_runtime("drain").current_container_id == result.current_container_id
            starts = list(reader.iter_operations(game_id="drain", op_kind=OpKind.START))
            assert [row.outcome for row in starts] == [Outcome.SUCCESS]
    finally:
        after.stop()


def test_a_lease_release_redis_could_not_take_during_the_drain_lands_before_the_exit(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    # Redis is down when the in-flight start ends, so its lease release
    # fails. The drain gives it a few seconds to land once Redis is back;
    # otherwise the lease (kept by Redis's append-only file) would keep the
    # game busy for the rest of its 60 s TTL, on every replica.
    with PrivateRedis.started(tmp_path / "redis") as private:
        env = {
            **server_environment,
            "RTMANAGER_REDIS_URL": private.url,
            "RTMANAGER_START_SETTLE": "3s",  # the start stays in flight a while
            "RTMANAGER_SHUTDOWN_GRACE": "20s",
        }
        server = start_server(env, tmp_path / "server.log")
        started = start_in_background(server.address, "drain")
        lease_key = f"{env['RTMANAGER_REDIS_PREFIX']}lease:game:drain"
        try:
            with contextlib.closing(redis.Redis.from_url(private.url)) as client:
                eventually(lambda: client.exists(lease_key), within=20)
            private.stop()  # the append-only file keeps the lease
            server.process.send_signal(signal.SIGTERM)
            failed = "could not release game lease; trying again until it would expire"
            eventually(lambda: failed in server.log(), within=30)
            # Back later than the drain would take without the wait for the release.
            time.sleep(REDIS_BACK_AFTER)
            private.start()
            assert server.process.wait(timeout=30) == 0, server.log()[-4000:]
            assert started.result(timeout=60).status is RuntimeStatus.RUNNING
            log = server.log()
            assert log.index('"message": "released game lease late"') < log.index(
                '"message": "stopped"'
            ), log[-4000:]
            assert "game leases left to expire" not in log
            with contextlib.closing(redis.Redis.from_url(private.url)) as client:
                assert not client.exists(lease_key)
        finally:
            server.stop()


def test_sigterm_while_waiting_for_postgres_ends_promptly(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    # Nothing listens there: start-up keeps waiting for the database.
    env["RTMANAGER_POSTGRES_DSN"] = (
        f"postgresql://rtmanager:rtmanager@127.0.0.1:{free_port()}/rtmanager"
    )
    log_path = tmp_path / "server.log"
    process = spawn_server(env, log_path)
    try:
        eventually(
            lambda: process.poll() is not None or "waiting for PostgreSQL" in log_path.read_text(),
            within=30,
        )
        assert process.poll() is None, log_path.read_text()[-4000:]
        took = sigterm_and_time_exit(process)
        log = log_path.read_text()
        assert process.returncode == 0, log[-4000:]
        assert took < STARTING_EXIT_WITHIN, f"exit took {took:.2f}s\n{log[-4000:]}"
        assert '"message": "received SIGTERM"' in log
        assert "rtmanager serving" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_during_the_start_up_reconcile_ends_promptly(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    # No Docker there: the start-up reconcile pass fails and is retried.
    env["RTMANAGER_DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    log_path = tmp_path / "server.log"
    process = spawn_server(env, log_path)
    try:
        eventually(
            lambda: (
                process.poll() is not None
                or "start-up reconcile pass failed" in log_path.read_text()
            ),
            within=30,
        )
        assert process.poll() is None, log_path.read_text()[-4000:]
        took = sigterm_and_time_exit(process)
        log = log_path.read_text()
        assert process.returncode == 0, log[-4000:]
        assert took < STARTING_EXIT_WITHIN, f"exit took {took:.2f}s\n{log[-4000:]}"
        assert '"message": "received SIGTERM"' in log
        assert "rtmanager serving" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_work_outlasting_the_grace_ends_the_process_at_the_deadline_with_code_1(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_START_SETTLE"] = "20s"  # far longer than the grace
    env["RTMANAGER_SHUTDOWN_GRACE"] = "1s"
    server = start_server(env, tmp_path / "server.log")
    started = start_in_background(server.address, "late")
    try:
        eventually(lambda: _leased(server), within=20)
        took = sigterm_and_time_exit(server.process, timeout=30)
        log = server.log()
        # Not held until the start's 20 s settle: gone at the deadline.
        assert took < 10, f"exit took {took:.2f}s\n{log[-4000:]}"
        assert server.process.returncode == 1, log[-4000:]
        assert "work still running when the shutdown grace ended" in log
        # The client learns the call did not finish.
        assert started.exception(timeout=30) is not None
    finally:
        server.stop(5)


def _leased(server: ServerProcess) -> bool:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        prefix = server.env["RTMANAGER_REDIS_PREFIX"]
        return bool(client.exists(f"{prefix}lease:game:late"))
    finally:
        client.close()
