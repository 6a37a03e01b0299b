"""scripts/dockerd.sh takes only the machine's own dockerd for the one it runs.

Other daemons may run on the machine beside it (the nodes of a multi-node
swarm test, each in a network namespace of its own with its own data root,
socket and pid file); restarting the machine's dockerd (the chaos soak) must
neither wait for them nor stop them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture
def fake_dockerd(tmp_path: Path) -> Iterator[Path]:
    """An executable named dockerd (a copy of Python) that sleeps with any arguments."""
    binary = tmp_path / "dockerd"
    shutil.copy2(sys.executable, binary)
    yield binary


def run_fake(binary: Path, *args: str, netns: bool = False) -> subprocess.Popen[bytes]:
    command = [str(binary), "-c", "import time; time.sleep(60)", *args]
    if netns:
        command = ["unshare", "--net", *command]
    process = subprocess.Popen(command)
    return process


def is_host_dockerd(pid: int) -> bool:
    script = REPO / "scripts" / "dockerd.sh"
    checked = subprocess.run(
        ["bash", "-c", f'source "{script}"; is_host_dockerd {pid}'], check=False, timeout=10
    )
    return checked.returncode == 0


def fake_pid(process: subprocess.Popen[bytes]) -> int:
    """The fake daemon's pid, once it runs as dockerd (`unshare` execs it in place)."""
    comm = Path(f"/proc/{process.pid}/comm")
    deadline = time.monotonic() + 10
    while comm.read_text().strip() != "dockerd":
        assert time.monotonic() < deadline, "the fake dockerd did not start"
        time.sleep(0.02)
    return process.pid


@pytest.mark.parametrize(
    ("args", "netns", "is_host"),
    [
        ((), False, True),
        (("--data-root", "/tmp/node/data", "--pidfile", "/tmp/node/docker.pid"), False, False),
        (("--exec-root=/tmp/node/exec",), False, False),
        ((), True, False),
    ],
    ids=["host-like", "own-data-root", "own-exec-root", "other-netns"],
)
def test_only_a_default_dockerd_in_this_network_namespace_is_the_machines(
    fake_dockerd: Path, args: tuple[str, ...], netns: bool, is_host: bool
) -> None:
    process = run_fake(fake_dockerd, *args, netns=netns)
    try:
        assert is_host_dockerd(fake_pid(process)) is is_host
    finally:
        process.kill()
        process.wait()


def test_a_process_that_is_not_dockerd_is_never_taken_for_it() -> None:
    process = subprocess.Popen(["sleep", "60"])
    try:
        assert not is_host_dockerd(process.pid)
    finally:
        process.kill()
        process.wait()


def pid_alive(pid: int) -> bool:
    script = REPO / "scripts" / "lib.sh"
    checked = subprocess.run(
        ["bash", "-c", f'source "{script}"; pid_alive {pid}'], check=False, timeout=10
    )
    return checked.returncode == 0


def test_an_exited_process_not_yet_reaped_is_not_alive() -> None:
    # A daemon's managed containerd, once it exits, may stay a zombie until
    # pid 1 reaps it: the scripts must not wait for it or take it for live.
    process = subprocess.Popen(["true"])
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(") ", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.02)
    try:
        assert not pid_alive(process.pid)
    finally:
        process.wait()


def test_a_running_process_is_alive_and_a_missing_one_is_not() -> None:
    process = subprocess.Popen(["sleep", "60"])
    try:
        assert pid_alive(process.pid)
    finally:
        process.kill()
        process.wait()
    assert not pid_alive(process.pid)
