"""The read floor: a bare `RuntimeService` server in a process of its own.

`GetRuntime` answers with a constant, pre-built `RuntimeRecord` (looked up
by game id in a dict) and `ListRuntimes` with a constant page: no
authentication, no interceptors, no database. The records are the bytes of
an `rtmanager` `ListRuntimesResponse` written by the benchmark (`--records`),
so both servers send byte-identical replies. The server is built with the
same thread pool size and channel options as `rtmanager.api.server`.

    python -m bench.bare_server --port 50999 --records page.bin
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.bare_serving import serve_until_signalled
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc

# Copies of the server defaults (see bench.common); not imported, so this
# process loads nothing of rtmanager beyond its generated protobuf code.
GRPC_MAX_WORKERS = 32
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class BareRuntimeServicer(pb_grpc.RuntimeServiceServicer):
    """Constant answers for the two read RPCs."""

    def __init__(self, page: pb.ListRuntimesResponse) -> None:
        if not page.runtimes:
            raise ValueError("the records file holds no runtime records")
        self._page = page
        self._by_game = {
            record.game_id: pb.GetRuntimeResponse(runtime=record) for record in page.runtimes
        }
        self._first = pb.GetRuntimeResponse(runtime=page.runtimes[0])

    def GetRuntime(  # noqa: N802 - gRPC method names
        self, request: pb.GetRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.GetRuntimeResponse:
        return self._by_game.get(request.game_id, self._first)

    def ListRuntimes(  # noqa: N802
        self, request: pb.ListRuntimesRequest, context: grpc.ServicerContext
    ) -> pb.ListRuntimesResponse:
        return self._page

    # The lifecycle RPCs are outside the read floor.

    def StartRuntime(  # noqa: N802
        self, request: pb.StartRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.StartRuntimeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare server: reads only")

    def StopRuntime(  # noqa: N802
        self, request: pb.StopRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.StopRuntimeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare server: reads only")

    def RestartRuntime(  # noqa: N802
        self, request: pb.RestartRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.RestartRuntimeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare server: reads only")

    def PatchRuntime(  # noqa: N802
        self, request: pb.PatchRuntimeRequest, context: grpc.ServicerContext
    ) -> pb.PatchRuntimeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare server: reads only")

    def WatchRuntimes(  # noqa: N802
        self, request: pb.WatchRuntimesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchRuntimesResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare server: reads only")


def main(argv: list[str] | None = None) -> int:
    """Serve on 127.0.0.1:PORT until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--records", type=Path, required=True)
    args = parser.parse_args(argv)

    page = pb.ListRuntimesResponse.FromString(args.records.read_bytes())
    server = grpc.server(
        ThreadPoolExecutor(max_workers=GRPC_MAX_WORKERS, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_RuntimeServiceServicer_to_server(BareRuntimeServicer(page), server)
    return serve_until_signalled(server, args.port, "bare server")


if __name__ == "__main__":
    raise SystemExit(main())
