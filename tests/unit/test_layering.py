"""The layers import only what they should (docs/architecture.md)."""

from __future__ import annotations

import json
import subprocess
import sys


def modules_loaded_by(module: str) -> list[str]:
    """Every module a fresh interpreter has loaded after importing `module`."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(done.stdout))


def test_the_game_master_client_needs_neither_the_lifecycles_nor_opentelemetry() -> None:
    loaded = modules_loaded_by("rtmanager.client")
    assert [m for m in loaded if m.startswith("rtmanager.lifecycle")] == []
    assert [m for m in loaded if m.startswith(("rtmanager.adapters", "rtmanager.workers"))] == []
    assert [m for m in loaded if m.startswith("opentelemetry")] == []


def test_the_domain_imports_nothing_else_of_the_project() -> None:
    loaded = modules_loaded_by("rtmanager.domain.jobs, rtmanager.domain.operation")
    ours = [m for m in loaded if m.startswith("rtmanager") and m != "rtmanager"]
    assert all(m.startswith("rtmanager.domain") for m in ours), ours
