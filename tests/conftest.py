"""Shared fixtures: real PostgreSQL, Redis and Docker, isolated per test.

Each test gets its own PostgreSQL schema, Redis key prefix and stream names,
cluster name and state root, so tests run in any order and in parallel.
Containers, swarm services, networks and volumes a test creates carry the
`com.galaxy.test` label (or its cluster's label) and are removed when the
test ends, even when it fails.

Tests of the swarm backend on the local engine ask for `local_swarm`: the
first of them in a run makes the engine a one-node swarm manager (unless it
is one already), and the run's controller leaves that swarm again at the
end (tests/support/local_swarm.py), so single-host tests run beside a
swarm-mode engine during the run and the machine is as it was afterwards.

The services are those `scripts/test.sh` starts; their addresses can be
overridden with RTMANAGER_TEST_POSTGRES_DSN / RTMANAGER_TEST_REDIS_URL.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import local_swarm as local_swarm_support

TEST_LABEL = "com.galaxy.test"
POSTGRES_DSN = os.environ.get(
    "RTMANAGER_TEST_POSTGRES_DSN", "postgresql://rtmanager:rtmanager@127.0.0.1:5432/rtmanager"
)
REDIS_URL = os.environ.get("RTMANAGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DOCKER_HOST = os.environ.get("RTMANAGER_TEST_DOCKER_HOST", "unix:///var/run/docker.sock")
ENGINE_IMAGE = "galaxy/engine-stub"
CRASH_IMAGE = "galaxy/engine-crash:1.0.0"


def needs_swarm_tools() -> pytest.MarkDecorator:
    """Skip a test where a harness swarm cannot be built (not root, or a tool missing)."""
    from tests.support.swarm import missing_requirements

    problems = missing_requirements()
    return pytest.mark.skipif(bool(problems), reason="; ".join(problems))


def _is_controller(config: pytest.Config) -> bool:
    """Whether this process runs the session itself (not an xdist worker)."""
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    # The run's id, inherited by the xdist workers started after this hook.
    if _is_controller(config):
        run = local_swarm_support.process_identity(os.getpid())
        assert run is not None
        os.environ[local_swarm_support.RUN_VARIABLE] = run


_SWARM_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leave the local swarm the run made, once every worker is done (also after Ctrl-C)."""
    config = session.config
    run = local_swarm_support.this_run()
    if not _is_controller(config) or not local_swarm_support.used_by(DOCKER_HOST, run):
        return
    try:
        config.stash[_SWARM_OUTCOME] = local_swarm_support.release(DOCKER_HOST, run)
    except Exception as exc:
        config.stash[_SWARM_OUTCOME] = f"could not leave the local swarm: {exc}"
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    # Runs after pytest_sessionfinish (the terminal reporter wraps it).
    outcome = config.stash.get(_SWARM_OUTCOME, None)
    if outcome is not None:
        terminalreporter.write_sep("-", "local swarm")
        terminalreporter.write_line(outcome)


@pytest.fixture(scope="session")
def local_swarm() -> local_swarm_support.LocalSwarm:
    """The local engine (DOCKER_HOST) as a one-node swarm manager, for this run.

    Initialised on first use by `scripts/swarm-local.sh init` (loopback
    advertise address) unless the engine is a manager already; left again
    by the controller's `pytest_sessionfinish` when this run made it.
    """
    return local_swarm_support.acquire(DOCKER_HOST, local_swarm_support.this_run())


@pytest.fixture
def test_id() -> str:
    """A short unique id for names owned by this test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def pg_schema(test_id: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema, dropped after the test."""
    import psycopg

    schema = f"t_{test_id}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def redis_prefix(test_id: str) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"test:{test_id}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def cluster(test_id: str) -> str:
    """A deployment name of this test's own (its RTMANAGER_CLUSTER)."""
    return f"test-{test_id}"


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    """A per-test root for game state directories."""
    root = tmp_path / "games"
    root.mkdir()
    return root


@pytest.fixture
def docker_client() -> Iterator[object]:
    """A docker-py client on the local daemon."""
    import docker

    client = docker.DockerClient(base_url=DOCKER_HOST, timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def docker_cleanup(docker_client: object, test_id: str) -> Iterator[str]:
    """Remove this test's services, containers, networks and volumes afterwards.

    Yields the label value tests put under `com.galaxy.test`; whatever
    carries it, or the test's cluster label, is removed.
    """
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    yield test_id
    remove_labelled(
        docker_client,
        [f"{TEST_LABEL}={test_id}", f"com.galaxy.rtmanager.cluster=test-{test_id}"],
    )


def remove_labelled(docker_client: Any, labels: list[str], *, settle: float = 30.0) -> None:
    """Remove every service, container, network and volume carrying any of `labels` (key=value).

    Services first (on a swarm manager; elsewhere there are none): their
    tasks' containers go with them, and only then can their overlay
    networks and volumes go, which the engine frees asynchronously, so
    those removals are retried for up to `settle` seconds.
    """
    import docker

    selectors: list[dict[str, Any]] = [{"label": label} for label in labels]
    for selector in selectors:
        for service in _services(docker_client, selector):
            with contextlib.suppress(docker.errors.NotFound):
                service.remove()
    for selector in selectors:
        for container in docker_client.containers.list(all=True, filters=selector):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # A removed service's task container: the engine is removing it already.
                if "already in progress" not in str(exc):
                    raise
    deadline = time.monotonic() + settle
    for selector in selectors:
        for network in docker_client.networks.list(filters=selector):
            _remove_in_time(network.remove, deadline)
        for volume in docker_client.volumes.list(filters=selector):
            _remove_in_time(functools.partial(volume.remove, force=True), deadline)


def _services(docker_client: Any, selector: dict[str, Any]) -> list[Any]:
    import docker

    try:
        return list(docker_client.services.list(filters=selector))
    except docker.errors.APIError as exc:
        if exc.response is not None and exc.response.status_code == 503:
            return []  # not a swarm manager: no services
        raise


def _remove_in_time(remove: Callable[[], object], deadline: float) -> None:
    """Call `remove` until it succeeds or the thing is gone; retry while it is in use."""
    import docker

    while True:
        try:
            remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
