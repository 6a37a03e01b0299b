"""Every lifecycle refuses input it cannot store before any database, Redis or Docker call."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OpSource, Outcome
from rtmanager.lifecycle.cleanup import CleanupRequest
from rtmanager.lifecycle.patch import PatchRequest
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.restart import RestartRequest
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from tests.unit.harness import IMAGE, IMAGE_PATCH, Harness, failure_code

Call = Callable[[Harness, str, str], OperationResult]
SOURCE = OpSource.ADMIN_REST

LIFECYCLES: dict[str, Call] = {
    "start": lambda h, game_id, ref: h.start.handle(
        StartRequest(game_id=game_id, image_ref=IMAGE, op_source=SOURCE, source_ref=ref)
    ),
    "stop": lambda h, game_id, ref: h.stop.handle(
        StopRequest(game_id=game_id, op_source=SOURCE, source_ref=ref)
    ),
    "restart": lambda h, game_id, ref: h.restart.handle(
        RestartRequest(game_id=game_id, op_source=SOURCE, source_ref=ref)
    ),
    "patch": lambda h, game_id, ref: h.patch.handle(
        PatchRequest(game_id=game_id, image_ref=IMAGE_PATCH, op_source=SOURCE, source_ref=ref)
    ),
    "cleanup": lambda h, game_id, ref: h.cleanup.handle(
        CleanupRequest(game_id=game_id, op_source=SOURCE, force=True, source_ref=ref)
    ),
}


def assert_refused_before_any_io(h: Harness, result: OperationResult) -> None:
    assert result.outcome is Outcome.FAILURE
    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.units_of_work.units == []
    assert h.rows() == []
    assert h.leases.acquired == []
    assert h.docker.calls == []


@pytest.mark.parametrize("lifecycle", LIFECYCLES)
@pytest.mark.parametrize(
    "game_id", ["../etc", "..", "", "Game-1", "game_1", "game 1", "-game", "g" * 52, "é"]
)
def test_malformed_game_id_is_invalid_request_without_audit_row_lease_or_docker(
    h: Harness, lifecycle: str, game_id: str
) -> None:
    h.seed_running("game-1")
    h.docker.calls.clear()

    result = LIFECYCLES[lifecycle](h, game_id, "")

    assert_refused_before_any_io(h, result)


@pytest.mark.parametrize("lifecycle", LIFECYCLES)
@pytest.mark.parametrize(
    "source_ref", ["x" * 257, "line\nbreak", "nul\x00byte"], ids=["too-long", "newline", "nul"]
)
def test_unstorable_source_ref_is_invalid_request_without_audit_row_lease_or_docker(
    h: Harness, lifecycle: str, source_ref: str
) -> None:
    h.seed_running("game-1")
    h.docker.calls.clear()

    result = LIFECYCLES[lifecycle](h, "game-1", source_ref)

    assert_refused_before_any_io(h, result)


@pytest.mark.parametrize("lifecycle", LIFECYCLES)
def test_longest_storable_source_ref_is_accepted(h: Harness, lifecycle: str) -> None:
    h.seed_running("game-1")

    LIFECYCLES[lifecycle](h, "game-1", "x" * 256)

    assert h.rows("game-1")[-1].source_ref == "x" * 256
