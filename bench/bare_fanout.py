"""The watch floor: a bare fan-out of pre-serialized messages, in a process of its own.

`galaxy.rtmanager.v1.RuntimeService/WatchRuntimes` gives each subscriber an
asyncio queue of its own and streams what is put in it, as bytes, with
nothing in between: no authentication, no interceptors, no database, no
filters, no cursors. A subscriber first gets a `snapshot_complete` message
(as an rtmanager watch with `initial_snapshot` does), so a client knows it
is subscribed. `bench.Fanout/Publish` takes the bytes of one serialized
`WatchRuntimesResponse` and puts them in every subscriber's queue.

It is the same kind of server as rtmanager's watch path: a `grpc.aio`
server whose streams are tasks on one event loop (no thread per stream),
with the channel options `rtmanager.api.server` uses.

    python -m bench.bare_fanout --port 50999
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
WATCH_SERVICE = "galaxy.rtmanager.v1.RuntimeService"
PUBLISH_SERVICE = "bench.Fanout"
PUBLISH_METHOD = f"/{PUBLISH_SERVICE}/Publish"
SUBSCRIBED = pb.WatchRuntimesResponse(
    snapshot_complete=pb.SnapshotComplete(cursor="0")
).SerializeToString()


class Fanout:
    """One queue of bytes per subscriber; `publish` appends to all of them (on the loop)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[bytes | None]] = set()

    async def watch(self, request: bytes, context: object) -> AsyncIterator[bytes]:
        mine: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queues.add(mine)
        try:
            yield SUBSCRIBED
            while True:
                item = await mine.get()
                if item is None:
                    return
                yield item
        finally:
            self._queues.discard(mine)

    async def publish(self, message: bytes, context: object) -> bytes:
        for subscriber in self._queues:
            subscriber.put_nowait(message)
        return b""

    def close(self) -> None:
        for subscriber in self._queues:
            subscriber.put_nowait(None)


async def serve(port: int) -> int:
    """Listen on 127.0.0.1:`port`, serve until SIGTERM or SIGINT; return the exit status."""
    fanout = Fanout()
    server = grpc.aio.server(
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
    try:
        server.add_insecure_port(f"127.0.0.1:{port}")
    except RuntimeError:
        print(f"cannot listen on 127.0.0.1:{port}", flush=True)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    print(f"bare fan-out listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    fanout.close()
    await server.stop(2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Serve on 127.0.0.1:PORT until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.port))


if __name__ == "__main__":
    raise SystemExit(main())
