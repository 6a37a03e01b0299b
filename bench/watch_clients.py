"""Watch subscribers for `bench.watch_fanout`: many WatchRuntimes streams in one process.

One asyncio loop holds `--streams` streams over `--channels` connections
(grpc.aio, so a few threads serve them all). Each stream asks for an
initial snapshot and counts as subscribed at its first message. Messages are
kept as bytes with the `time.monotonic()` of their arrival (the same clock
in every process on Linux) and parsed only after the measurement, so the
measured path costs the client as little as possible.

Protocol with the parent, one line each: this process prints `ready` on
stdout once every stream has its first message (or `failed: …`), and stops
when a line arrives on stdin. It then writes `--out` (JSON): per stream the
(event cursor, arrival time) pairs, the count of other messages and how the
stream ended; plus the CPU seconds this process used between `ready` and
the stop.

    python -m bench.watch_clients --target 127.0.0.1:50051 --streams 500 --out c.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb

METHOD = "/galaxy.rtmanager.v1.RuntimeService/WatchRuntimes"
READY_TIMEOUT = 120.0


class Stream:
    """One WatchRuntimes stream: what arrived, when, and how it ended."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.data: list[bytes] = []
        self.ended = ""

    async def read(self, call: Any) -> None:
        clock = time.monotonic
        times, data = self.times, self.data
        try:
            async for message in call:
                times.append(clock())
                data.append(message)
            self.ended = "OK"
        except asyncio.CancelledError:
            self.ended = "cancelled"
        except grpc.aio.AioRpcError as error:
            self.ended = (
                "cancelled"
                if error.code() == grpc.StatusCode.CANCELLED
                else (f"{error.code().name}: {error.details()}")
            )

    def summary(self) -> dict[str, Any]:
        events: list[tuple[int, float]] = []
        other = 0
        for arrived, raw in zip(self.times, self.data, strict=True):
            message = pb.WatchRuntimesResponse.FromString(raw)
            if message.HasField("event"):
                events.append((int(message.event.cursor), arrived))
            else:
                other += 1
        return {"events": events, "other": other, "ended": self.ended}


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def run(target: str, streams: int, channels: int, out: Path) -> int:
    options = [
        # A connection of its own for each channel, not one shared subchannel.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    request = pb.WatchRuntimesRequest(initial_snapshot=True).SerializeToString()
    watchers = [Stream() for _ in range(streams)]
    calls = [
        opened[i % channels].unary_stream(METHOD, None, None)(request, wait_for_ready=True)
        for i in range(streams)
    ]
    tasks = [asyncio.create_task(w.read(c)) for w, c in zip(watchers, calls, strict=True)]
    deadline = time.monotonic() + READY_TIMEOUT
    while sum(1 for w in watchers if w.times) < streams:
        gone = [w.ended for w in watchers if w.ended and not w.times]
        if gone or time.monotonic() > deadline:
            problem = gone[0] if gone else f"not subscribed within {READY_TIMEOUT:.0f}s"
            print(f"failed: {problem}", flush=True)
            for call in calls:
                call.cancel()
            return 1
        await asyncio.sleep(0.05)
    began = _cpu()
    print("ready", flush=True)
    await _stdin_line()
    cpu = _cpu() - began
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in opened:
        await channel.close(None)
    out.write_text(
        json.dumps({"cpu_seconds": cpu, "streams": [w.summary() for w in watchers]}) + "\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the streams."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.target, args.streams, args.channels, args.out))


if __name__ == "__main__":
    raise SystemExit(main())
