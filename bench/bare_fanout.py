"""The watch floor: a bare fan-out of pre-serialized messages, in a process of its own.

`galaxy.rtmanager.v1.RuntimeService/WatchRuntimes` gives each subscriber a
queue of its own and streams what is put in it, as bytes, with nothing in
between: no authentication, no interceptors, no database, no filters, no
cursors. A subscriber first gets a `snapshot_complete` message (as an
rtmanager watch with `initial_snapshot` does), so a client knows it is
subscribed. `bench.Fanout/Publish` takes the bytes of one serialized
`WatchRuntimesResponse` and puts them in every subscriber's queue. The
server has the thread pool and channel options `bench.watch_fanout` gives
rtmanager.

    python -m bench.bare_fanout --port 50999 --workers 1024
"""

from __future__ import annotations

import argparse
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from bench.bare_serving import serve_until_signalled
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
WATCH_SERVICE = "galaxy.rtmanager.v1.RuntimeService"
PUBLISH_SERVICE = "bench.Fanout"
PUBLISH_METHOD = f"/{PUBLISH_SERVICE}/Publish"
SUBSCRIBED = pb.WatchRuntimesResponse(
    snapshot_complete=pb.SnapshotComplete(cursor="0")
).SerializeToString()


class Fanout:
    """One queue of bytes per subscriber; `publish` appends to all of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: set[queue.SimpleQueue[bytes | None]] = set()

    def watch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        mine: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        with self._lock:
            self._queues.add(mine)
        context.add_callback(lambda: mine.put(None))
        try:
            yield SUBSCRIBED
            while True:
                item = mine.get()
                if item is None:
                    return
                yield item
        finally:
            with self._lock:
                self._queues.discard(mine)

    def publish(self, message: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            for subscriber in self._queues:
                subscriber.put(message)
        return b""

    def close(self) -> None:
        with self._lock:
            for subscriber in self._queues:
                subscriber.put(None)


def main(argv: list[str] | None = None) -> int:
    """Serve on 127.0.0.1:PORT until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    args = parser.parse_args(argv)

    fanout = Fanout()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    # No (de)serializers: requests arrive and responses leave as bytes.
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                WATCH_SERVICE, {"WatchRuntimes": grpc.unary_stream_rpc_method_handler(fanout.watch)}
            ),
            grpc.method_handlers_generic_handler(
                PUBLISH_SERVICE, {"Publish": grpc.unary_unary_rpc_method_handler(fanout.publish)}
            ),
        )
    )
    return serve_until_signalled(server, args.port, "bare fan-out", before_stop=fanout.close)


if __name__ == "__main__":
    raise SystemExit(main())
