"""The engine backend's declared capabilities, as the lifecycles act on them (fakes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtmanager.domain.operation import OpSource
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.cleanup import CleanupRequest
from rtmanager.lifecycle.start import StartRequest
from rtmanager.ports import BackendCapabilities
from tests.unit.harness import IMAGE, Harness, make_harness

GAME = "g1"


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


def start(h: Harness, image_ref: str = IMAGE) -> None:
    result = h.start.handle(StartRequest(GAME, image_ref, OpSource.ADMIN_REST))
    assert result.ok, result.failure


def test_a_backend_with_host_state_dirs_gets_the_state_directory_prepared(h: Harness) -> None:
    start(h)

    assert h.settings.state_dir(GAME).is_dir()


def test_a_backend_keeping_state_itself_gets_no_host_directory(h: Harness) -> None:
    h.docker.capabilities = BackendCapabilities(host_state_dirs=False)

    start(h)

    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert not h.settings.state_dir(GAME).exists()
    assert h.docker.call_names("create") == ["create"]


def test_cleanup_leaves_state_to_a_backend_that_keeps_it_itself(tmp_path: Path) -> None:
    h = make_harness(tmp_path, remove_state_on_cleanup=True)
    h.seed_stopped(GAME)
    # A directory of that name on this host is not the game's state here.
    state_dir = h.settings.state_dir(GAME)
    state_dir.mkdir()
    h.docker.capabilities = BackendCapabilities(host_state_dirs=False)

    result = h.cleanup.handle(CleanupRequest(GAME, OpSource.ADMIN_REST))

    assert result.ok, result.failure
    assert h.record(GAME).status is RuntimeStatus.REMOVED
    assert state_dir.is_dir()
