"""A private PostgreSQL 15 server for tests that restart, stop or pause the database.

The shared PostgreSQL on this machine serves every engineer's tests, so a
test that needs to take the database away runs one of its own:

    with private_postgres() as server:
        apply_migrations(server.dsn, "rtm", MIGRATIONS)
        ...
        server.restart()          # fast shutdown, then start again on the same port
        server.pause()            # SIGSTOP the postmaster and all its children
        server.resume()           # SIGCONT them
        server.stop()             # "fast" (default), "smart" or "immediate" (a crash)
        server.start()

The server lives in a fresh temporary directory (data directory, unix
socket directory and log), owned by the `postgres` user when the tests run
as root (PostgreSQL refuses to run as root; its tools are then run through
`runuser -u postgres --`). It listens only on 127.0.0.1, on a free port that
stays the same across restarts, trusts local connections and runs with
fsync off (a test server: a crash of the server process loses nothing, only
an OS crash would). Leaving the `with` block, normally or by an exception,
resumes a paused server, stops it immediately and deletes the directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

BIN = Path(os.environ.get("RTMANAGER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_START_ATTEMPTS = 3
_TIMEOUT = 60

StopMode = Literal["smart", "fast", "immediate"]


class PrivatePostgresError(RuntimeError):
    """The private server could not be set up, started or stopped (the log's tail says why)."""


class PrivatePostgres:
    """One running private PostgreSQL server (see the module docstring).

    `dsn` connects as the superuser `postgres` to the database `postgres`;
    it stays valid across `restart()` and `stop()`/`start()`.
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data_dir = root / "data"
        self.socket_dir = root / "sock"
        self.log_file = root / "postgres.log"
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._paused: list[int] = []

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("start", "-l", str(self.log_file))

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (a paused one is resumed first); nothing if it is not running."""
        self.resume()
        if self.running:
            self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with `mode`, then start it again on the same port."""
        self.stop(mode)
        self.start()

    def pause(self) -> None:
        """SIGSTOP the postmaster, then each of its children: connections hang, none fail."""
        if self._paused:
            return
        postmaster = self.postmaster_pid()
        # The postmaster first, so it forks no new child while we stop the others.
        os.kill(postmaster, signal.SIGSTOP)
        self._paused = [postmaster]
        for child in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)
                self._paused.append(child)

    def resume(self) -> None:
        """SIGCONT what `pause()` stopped (nothing if it is not paused)."""
        paused, self._paused = self._paused, []
        for pid in reversed(paused):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        """Whether the server is up (paused counts as up)."""
        status = subprocess.run(
            [*_as_postgres(), str(BIN / "pg_ctl"), "status", "-D", str(self.data_dir)],
            capture_output=True,
            check=False,
            timeout=_TIMEOUT,
        )
        return status.returncode == 0

    def postmaster_pid(self) -> int:
        """The postmaster's process id (from `postmaster.pid`)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError) as error:
            raise PrivatePostgresError(f"the private server is not running: {error}") from None

    def close(self) -> None:
        """Stop the server at once and delete its directory; safe to call twice."""
        try:
            if self.data_dir.exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- internals --------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        command = [*_as_postgres(), str(BIN / "pg_ctl"), "-D", str(self.data_dir), "-w"]
        command += ["-t", str(_TIMEOUT), "-s", *args]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PrivatePostgresError(
                f"pg_ctl {args[0]} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"--- {self.log_file} ---\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (for failure messages)."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """Create, start and yield a private server; always tear it down afterwards."""
    server = _create()
    atexit.register(server.close)  # a backstop should the process exit mid-test
    try:
        yield server
    finally:
        server.close()
        atexit.unregister(server.close)


def _create() -> PrivatePostgres:
    root = Path(tempfile.mkdtemp(prefix="rtm-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        _run_as_postgres(
            BIN / "initdb",
            "-D",
            str(root / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        _run_as_postgres("mkdir", str(root / "sock"))
        for attempt in range(_START_ATTEMPTS):
            server = PrivatePostgres(root, _free_port())
            _write_config(server)
            try:
                server.start()
                return server
            except PrivatePostgresError:
                # Another process may have taken the port in between: try another.
                if attempt == _START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _write_config(server: PrivatePostgres) -> None:
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(server.port),
        "unix_socket_directories": f"'{server.socket_dir}'",
        "max_connections": "50",
        "shared_buffers": "16MB",
        "fsync": "off",
        "full_page_writes": "off",
        "logging_collector": "off",
    }
    # postgresql.auto.conf is read last, so a second call (another port) wins.
    text = "".join(f"{name} = {value}\n" for name, value in settings.items())
    auto = server.data_dir / "postgresql.auto.conf"
    auto.write_text(text)
    if os.geteuid() == 0:
        shutil.chown(auto, "postgres", "postgres")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run_as_postgres(program: Path | str, *args: str) -> None:
    result = subprocess.run(
        [*_as_postgres(), str(program), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=_TIMEOUT,
    )
    if result.returncode != 0:
        raise PrivatePostgresError(
            f"{Path(str(program)).name} failed ({result.returncode}): {result.stderr.strip()}"
        )


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (PostgreSQL's backends and helpers)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (2nd field) is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found
