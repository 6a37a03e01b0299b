"""`rtmanager ctl` against a real server, run as an operator would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import ENGINE_IMAGE
from tests.e2e.conftest import ADMIN_TOKEN, GM_TOKEN, REPO, ServerProcess

pytestmark = pytest.mark.e2e


def ctl(
    server: ServerProcess, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `rtmanager ctl --addr <server> ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "rtmanager.cli", "ctl", "--addr", server.address, *args],
        env={**server.env, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok_json(server: ServerProcess, *args: str) -> Any:
    result = ctl(server, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ctl_drives_a_game_through_its_life(server: ServerProcess) -> None:
    game = f"ctl-{uuid.uuid4().hex[:8]}"

    started = ctl(server, "start", game, f"{ENGINE_IMAGE}:1.0.0", "--source-ref", "e2e-start")
    assert started.returncode == 0, started.stderr
    assert game in started.stdout and "running" in started.stdout

    record = ok_json(server, "get", game)
    assert record["game_id"] == game
    assert record["status"] == "running"
    assert record["current_image_ref"] == f"{ENGINE_IMAGE}:1.0.0"
    assert record["last_op_at"].endswith("Z")
    container = record["current_container_id"]
    assert len(container) == 64

    patched = ctl(server, "patch", game, f"{ENGINE_IMAGE}:1.1.0")
    assert patched.returncode == 5, patched.stderr
    assert patched.stderr.startswith("rtmanager ctl: semver_patch_only: ")
    assert patched.stdout == ""

    listed = ctl(server, "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(game))
    assert row.split()[:4] == [game, "running", f"{ENGINE_IMAGE}:1.0.0", container[:12]]
    listing = ok_json(server, "list", "--status", "running", "--all")
    assert game in [item["game_id"] for item in listing["runtimes"]]
    assert listing["next_page_token"] == ""

    stopped = ok_json(server, "stop", game, "--reason", "game_finished", "--source-ref", "e2e-stop")
    assert stopped["status"] == "stopped"
    assert stopped["stopped_at"] is not None

    explained = ok_json(server, "explain", game, "--limit", "1")
    assert explained["record"] == stopped
    assert explained["container"]["id"] == container
    assert (explained["container"]["status"], explained["container"]["exit_code"]) == ("exited", 0)
    assert [entry["op_kind"] for entry in explained["operations"]] == ["stop"]
    assert (explained["pending_jobs"], explained["lease"]) == ([], None)
    shown = ctl(server, "explain", game)
    assert shown.returncode == 0, shown.stderr
    assert "lease: free" in shown.stdout and "galaxy-game-" in shown.stdout

    ops = ok_json(server, "ops", "--game", game)
    rows = ops["operations"]
    ids = [entry["id"] for entry in rows]
    assert ids == sorted(ids, reverse=True)  # newest first
    kinds = [entry["op_kind"] for entry in rows if entry["op_kind"] in ("start", "stop")]
    assert kinds == ["stop", "start"]
    stop_row = next(entry for entry in rows if entry["op_kind"] == "stop")
    start_row = next(entry for entry in rows if entry["op_kind"] == "start")
    assert (stop_row["outcome"], stop_row["source_ref"]) == ("success", "e2e-stop")
    assert (start_row["outcome"], start_row["source_ref"]) == ("success", "e2e-start")
    assert start_row["op_source"] == "admin_rest"
    only_starts = ok_json(server, "ops", "--game", game, "--kind", "start")
    assert [entry["op_kind"] for entry in only_starts["operations"]] == ["start"]

    table = ctl(server, "ops", "--game", game, "--outcome", "success")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "TIME", "GAME"]
    assert [line.split()[3] for line in lines[1:]] == ["stop", "start"]

    cleaned = ok_json(server, "cleanup", game)
    assert cleaned["status"] == "removed"
    assert ok_json(server, "get", game)["status"] == "removed"


def test_ctl_reports_errors_with_their_exit_codes(server: ServerProcess) -> None:
    missing = ctl(server, "get", f"nope-{uuid.uuid4().hex[:8]}")
    assert missing.returncode == 3
    assert missing.stderr.startswith("rtmanager ctl: not_found: ")
    unknown = ctl(server, "explain", f"nope-{uuid.uuid4().hex[:8]}")
    assert unknown.returncode == 3
    assert unknown.stderr.startswith("rtmanager ctl: not_found: nothing is known of game ")

    malformed = ctl(server, "get", "../etc")
    assert malformed.returncode == 2
    assert malformed.stderr.startswith("rtmanager ctl: invalid_request: ")

    expired = ctl(server, "watch", "--since", "999999")
    assert expired.returncode == 2
    assert expired.stderr.startswith("rtmanager ctl: invalid_request: ")


def test_ctl_watch_streams_the_snapshot_and_changes_as_json_lines(server: ServerProcess) -> None:
    game = f"ctl-watch-{uuid.uuid4().hex[:6]}"
    assert ctl(server, "start", game, f"{ENGINE_IMAGE}:1.0.0").returncode == 0
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rtmanager.cli",
            "ctl",
            "--addr",
            server.address,
            "--json",
            "watch",
            "--snapshot",
            "--game",
            game,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        snapshot = json.loads(watcher.stdout.readline())
        assert snapshot["snapshot"]["game_id"] == game
        assert "snapshot_complete" in json.loads(watcher.stdout.readline())
        assert ctl(server, "stop", game).returncode == 0
        line = json.loads(watcher.stdout.readline())
        while "bookmark" in line:
            line = json.loads(watcher.stdout.readline())
        assert line["event"]["runtime"]["status"] == "RUNTIME_STATUS_STOPPED"
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)


def test_ctl_sends_its_token(auth_server: ServerProcess) -> None:
    anonymous = ctl(auth_server, "list")
    assert anonymous.returncode == 6
    assert anonymous.stderr.startswith("rtmanager ctl: unauthenticated: ")

    assert ctl(auth_server, "--token", GM_TOKEN, "list").returncode == 0
    denied = ctl(auth_server, "--token", GM_TOKEN, "ops")
    assert denied.returncode == 6
    assert denied.stderr.startswith("rtmanager ctl: permission_denied: ")

    admin = ctl(auth_server, "--json", "ops", env={"RTMANAGER_CTL_TOKEN": ADMIN_TOKEN})
    assert admin.returncode == 0, admin.stderr
    assert json.loads(admin.stdout) == {"operations": [], "next_page_token": ""}

    outside = ctl(auth_server, "--token", ADMIN_TOKEN, "start", "g1", "evil/engine:1.0.0")
    assert outside.returncode == 5
    assert outside.stderr.startswith("rtmanager ctl: image_not_allowed: ")
