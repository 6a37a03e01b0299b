"""The local Docker engine as a one-node swarm manager, for the test runs that need one.

SPEC §10 wants the swarm backend tested on "a one-node swarm on the local
engine". The engine is shared: single-host tests, other test runs and
perhaps an operator use it at the same time. So:

* `acquire(run)` (from the `local_swarm` fixture, in whichever process
  needs the swarm first, xdist workers included) registers the test run as
  a user of the engine's swarm and, when the engine is not in a swarm yet,
  runs `bash scripts/swarm-local.sh init` (loopback advertise address,
  idempotent) and writes the `initialised` marker with the new node's id.
* `release(run)` (once per run, from the controller's `pytest_sessionfinish`,
  after every worker has finished) unregisters the run and leaves the swarm
  with `swarm-local.sh leave` (which also removes `docker_gwbridge`) only
  when a test run initialised it (the marker names the current node id), no
  other live test run still uses it, and no service without the test label
  is on it. A swarm that was there before (an operator's) has no marker
  and is never left.

The bookkeeping lives in `${TMPDIR:-/tmp}/galaxy-swarm-local-tests/<engine>/`
(one directory per DOCKER_HOST) and every step holds its `lock` (flock), so
concurrent workers and runs see one consistent state. A run is its
controller's pid plus start time: a run killed with SIGKILL is recognised
as gone by the next run, which then takes over leaving the swarm.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from tests.support.procfs import stat_fields

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "swarm-local.sh"
RUN_VARIABLE = "RTMANAGER_TEST_RUN"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
TEST_LABEL = "com.galaxy.test"
_SCRIPT_TIMEOUT = 180.0


class LocalSwarmError(RuntimeError):
    """The local engine could not be made (or left as) a one-node swarm manager."""


@dataclass(frozen=True)
class LocalSwarm:
    """The local engine as a swarm manager: where it is and which node it is."""

    docker_host: str
    node_id: str
    hostname: str

    def client(self, timeout: int = 60) -> docker.DockerClient:
        """docker-py on the engine (manager and the only node at once); close it."""
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)


def process_identity(pid: int) -> str | None:
    """`<pid>-<start time>` of a live process, None when it is gone (or a zombie)."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return f"{pid}-{fields[19]}"


def this_run() -> str:
    """The id of the test run this process belongs to (its controller's identity)."""
    run = os.environ.get(RUN_VARIABLE)
    if run:
        return run
    own = process_identity(os.getpid())
    assert own is not None
    return own


def _run_alive(run: str) -> bool:
    pid, _, _ = run.partition("-")
    return pid.isdigit() and process_identity(int(pid)) == run


def state_dir(docker_host: str) -> Path:
    """The bookkeeping directory of one engine's swarm."""
    key = hashlib.sha256(docker_host.encode()).hexdigest()[:12]
    root = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    return root / "galaxy-swarm-local-tests" / key


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    (directory / "users").mkdir(parents=True, exist_ok=True)
    with (directory / "lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _swarm_state(client: docker.DockerClient) -> tuple[str, bool, str, str]:
    """(LocalNodeState, manager?, NodeID, host name) of the engine."""
    info: dict[str, Any] = client.info()
    swarm = info.get("Swarm") or {}
    return (
        str(swarm.get("LocalNodeState") or "inactive"),
        bool(swarm.get("ControlAvailable")),
        str(swarm.get("NodeID") or ""),
        str(info.get("Name") or ""),
    )


def _script(docker_host: str, command: str) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), command],
        env={**os.environ, "DOCKER_HOST": docker_host},
        capture_output=True,
        text=True,
        timeout=_SCRIPT_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise LocalSwarmError(
            f"swarm-local.sh {command} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )


def _prune_users(directory: Path) -> list[str]:
    """Forget runs whose controller is gone; return the live ones."""
    live = []
    for entry in (directory / "users").iterdir():
        if _run_alive(entry.name):
            live.append(entry.name)
        else:
            entry.unlink(missing_ok=True)
    return live


def _read_marker(directory: Path) -> dict[str, str] | None:
    try:
        data = json.loads((directory / "initialised").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _labels(service: dict[str, Any]) -> dict[str, str]:
    return dict((service.get("Spec") or {}).get("Labels") or {})


def _dockerd_lacks_offline_images(docker_host: str) -> str:
    """Why swarm tasks on this engine might ask a registry first ("" when they won't).

    Checked only for the machine's own daemon (default socket, pid file):
    dockerd must run with DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 (as
    scripts/dockerd.sh starts it), else every task start tries a pull.
    """
    if docker_host != DEFAULT_DOCKER_HOST:
        return ""
    try:
        pid = int(Path("/var/run/docker.pid").read_text().strip())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return ""
    if b"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1" in environ:
        return ""
    return (
        f"dockerd (pid {pid}) runs without DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1, so swarm "
        "tasks would ask a registry for their image first; start it with "
        "`bash scripts/dockerd.sh start`"
    )


def acquire(docker_host: str, run: str) -> LocalSwarm:
    """Register `run` as a user of the engine's swarm, initialising one when there is none."""
    problem = _dockerd_lacks_offline_images(docker_host)
    if problem:
        raise LocalSwarmError(problem)
    directory = state_dir(docker_host)
    client = docker.DockerClient(base_url=docker_host, timeout=60)
    try:
        with _locked(directory):
            (directory / "users" / run).touch()
            _prune_users(directory)
            state, manager, node_id, _ = _swarm_state(client)
            if state == "inactive":
                _script(docker_host, "init")
                state, manager, node_id, _ = _swarm_state(client)
                (directory / "initialised").write_text(
                    json.dumps({"node_id": node_id, "docker_host": docker_host, "by": run})
                )
            elif (marker := _read_marker(directory)) and marker.get("node_id") != node_id:
                # Not the swarm a test run made (left and made anew by someone else).
                (directory / "initialised").unlink(missing_ok=True)
            if state != "active" or not manager:
                raise LocalSwarmError(
                    f"{docker_host} is in swarm state {state!r} (manager: {manager}); "
                    "the swarm tests need it a manager or outside any swarm"
                )
            node = client.api.inspect_node(node_id)
    finally:
        client.close()
    hostname = str(node.get("Description", {}).get("Hostname") or "")
    return LocalSwarm(docker_host=docker_host, node_id=node_id, hostname=hostname)


def used_by(docker_host: str, run: str) -> bool:
    """Whether `run` registered as a user of the engine's swarm."""
    return (state_dir(docker_host) / "users" / run).exists()


def release(docker_host: str, run: str) -> str:
    """Unregister `run`; leave the swarm when test runs made it and none uses it any more.

    Returns what was done, in a sentence for the run's summary.
    """
    directory = state_dir(docker_host)
    with _locked(directory):
        (directory / "users" / run).unlink(missing_ok=True)
        others = [user for user in _prune_users(directory) if user != run]
        marker = _read_marker(directory)
        if marker is None:
            return f"{docker_host} stays a swarm manager: it was one before the tests"
        if others:
            return f"{docker_host} stays a swarm manager: test runs {others} still use it"
        client = docker.DockerClient(base_url=docker_host, timeout=60)
        try:
            state, manager, node_id, _ = _swarm_state(client)
            if state == "inactive" or node_id != marker.get("node_id"):
                # Left already, or another swarm now: not the one the tests made.
                (directory / "initialised").unlink(missing_ok=True)
                return f"{docker_host}: the swarm the tests made is gone already"
            services = client.services.list() if manager else []
            foreign = [s.name for s in services if TEST_LABEL not in _labels(s.attrs)]
        finally:
            client.close()
        if foreign:
            return (
                f"{docker_host} stays a swarm manager: services not made by tests run on it "
                f"({', '.join(sorted(foreign))})"
            )
        _script(docker_host, "leave")
        (directory / "initialised").unlink(missing_ok=True)
        return f"{docker_host} left the one-node swarm the tests made"


def main(argv: list[str]) -> int:
    """`python -m tests.support.local_swarm status` prints the bookkeeping of DOCKER_HOST."""
    docker_host = os.environ.get("DOCKER_HOST", DEFAULT_DOCKER_HOST)
    if argv[1:] != ["status"]:
        sys.stderr.write("usage: python -m tests.support.local_swarm status\n")
        return 2
    directory = state_dir(docker_host)
    users = sorted(p.name for p in (directory / "users").glob("*")) if directory.exists() else []
    print(json.dumps({"dir": str(directory), "marker": _read_marker(directory), "users": users}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
