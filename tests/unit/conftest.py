"""Fixtures of the lifecycle unit tests: the services wired to in-memory fakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.harness import Harness, make_harness


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """The lifecycle services on fresh fakes, state root under `tmp_path`."""
    return make_harness(tmp_path)
