"""What the floor servers share: listen, serve until SIGTERM or SIGINT, stop.

A module of its own that imports only grpc, so a floor loads nothing more
than its own servicer needs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import grpc


def serve_until_signalled(
    server: grpc.Server, port: int, name: str, *, before_stop: Callable[[], None] | None = None
) -> int:
    """Listen on 127.0.0.1:`port`, serve until SIGTERM or SIGINT; return the exit status.

    `before_stop` runs after the signal, before the server stops (to end
    streams it holds open).
    """
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        print(f"cannot listen on 127.0.0.1:{port}", flush=True)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"{name} listening on 127.0.0.1:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    if before_stop is not None:
        before_stop()
    server.stop(2).wait()
    return 0
