"""Shared fixtures: real PostgreSQL, Redis and Docker, isolated per test.

Each test gets its own PostgreSQL schema, Redis key prefix and stream names,
cluster name and state root, so tests run in any order and in parallel.
Containers and networks a test creates carry the `com.galaxy.test` label
and are removed when the test ends, even when it fails.

The services are those `scripts/test.sh` starts; their addresses can be
overridden with RTMANAGER_TEST_POSTGRES_DSN / RTMANAGER_TEST_REDIS_URL.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
    """Remove this test's containers and networks afterwards.

    Yields the label value tests put under `com.galaxy.test`; containers and
    networks carrying it, or the test's cluster label, are removed.
    """
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    yield test_id
    remove_labelled(
        docker_client,
        [f"{TEST_LABEL}={test_id}", f"com.galaxy.rtmanager.cluster=test-{test_id}"],
    )


def remove_labelled(docker_client: Any, labels: list[str]) -> None:
    """Remove every container, then every network, carrying any of `labels` (key=value)."""
    import docker

    selectors: list[dict[str, Any]] = [{"label": label} for label in labels]
    for selector in selectors:
        for container in docker_client.containers.list(all=True, filters=selector):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
    for selector in selectors:
        for network in docker_client.networks.list(filters=selector):
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()
