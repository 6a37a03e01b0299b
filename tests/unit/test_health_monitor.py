"""`HealthMonitor`: SERVING only when every check passes after start-up, logged as it changes."""

from __future__ import annotations

import logging
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2

from rtmanager.api.health import HealthMonitor

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("galaxy.rtmanager.v1.RuntimeService",)


class Dependency:
    """A check that fails with `problem` while it is set."""

    def __init__(self) -> None:
        self.problem = ""

    def __call__(self) -> None:
        if self.problem:
            raise ConnectionError(self.problem)


def status(monitor: HealthMonitor, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(monitor.servicer.Check(request, cast("grpc.ServicerContext", None)).status)


def test_not_serving_until_ready_then_serving_while_every_check_passes() -> None:
    docker = Dependency()
    monitor = HealthMonitor({"docker": docker}, services=SERVICES)

    assert monitor.check_now() is False
    assert monitor.problems == {"startup": "not ready yet"}
    monitor.set_ready()

    assert status(monitor) == SERVING
    assert status(monitor, SERVICES[0]) == SERVING
    assert monitor.problems == {}


def test_a_failing_check_turns_every_service_not_serving_until_it_passes_again() -> None:
    docker, redis = Dependency(), Dependency()
    monitor = HealthMonitor({"docker": docker, "redis": redis}, services=SERVICES)
    monitor.set_ready()

    docker.problem = "daemon wedged"
    assert monitor.check_now() is False
    assert monitor.problems == {"docker": "daemon wedged"}
    assert status(monitor) == status(monitor, SERVICES[0]) == NOT_SERVING

    docker.problem = ""
    assert monitor.check_now() is True
    assert status(monitor) == status(monitor, SERVICES[0]) == SERVING


def test_a_failure_is_logged_when_it_begins_and_its_end_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    docker = Dependency()
    monitor = HealthMonitor({"docker": docker}, services=SERVICES)
    monitor.set_ready()
    caplog.set_level(logging.INFO, logger="rtmanager.api.health")

    docker.problem = "daemon wedged"
    monitor.check_now()
    monitor.check_now()  # the same problem again: not logged again
    docker.problem = ""
    monitor.check_now()
    monitor.check_now()

    lines = [(r.levelname, r.getMessage(), getattr(r, "check", "")) for r in caplog.records]
    assert lines == [
        ("WARNING", "dependency unhealthy", "docker"),
        ("INFO", "dependency healthy again", "docker"),
    ]


def test_start_up_ending_is_not_logged_as_a_recovery(caplog: pytest.LogCaptureFixture) -> None:
    monitor = HealthMonitor({"docker": Dependency()}, services=SERVICES)
    caplog.set_level(logging.INFO, logger="rtmanager.api.health")

    monitor.set_ready()

    assert [r.getMessage() for r in caplog.records] == []


def test_a_drain_reports_not_serving_for_good() -> None:
    monitor = HealthMonitor({"docker": Dependency()}, services=SERVICES)
    monitor.set_ready()

    monitor.drain()
    monitor.check_now()

    assert status(monitor) == NOT_SERVING
