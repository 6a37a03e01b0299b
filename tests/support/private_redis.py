"""A Redis server of one test's own, which the test may restart, pause or kill.

The shared Redis of the suite must never be restarted (other tests run
against it at the same time); a test of Redis faults starts its own:

    with PrivateRedis.started(tmp_path) as server:
        env["RTMANAGER_REDIS_URL"] = server.url
        ...
        server.restart()     # SHUTDOWN (the append-only file is flushed), start again
        server.pause(); server.resume()   # SIGSTOP / SIGCONT

It listens on 127.0.0.1 on a free port, keeps its data in the test's
directory with an append-only file fsynced every second (as the bootstrap
runs the real one), and is always killed when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """One `redis-server` process on loopback, with its data in `directory`."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    @contextlib.contextmanager
    def started(cls, directory: Path) -> Iterator[PrivateRedis]:
        """A started server, killed when the block ends (also on failure)."""
        server = cls(directory)
        server.start()
        try:
            yield server
        finally:
            server.kill()

    def start(self) -> None:
        """Start the server and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("private redis already running")
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with contextlib.closing(redis.Redis.from_url(self.url, socket_timeout=1)) as c:
                    if c.ping():
                        return
            except redis.exceptions.RedisError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"private redis exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("private redis did not answer within 20s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut down cleanly (the append-only file is flushed) and wait for the exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()
        with (
            contextlib.suppress(redis.exceptions.RedisError),
            contextlib.closing(redis.Redis.from_url(self.url, socket_timeout=5)) as client,
        ):
            client.shutdown(nosave=False)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down for `down_for` seconds, start again on the same port and data."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(timeout=20)
