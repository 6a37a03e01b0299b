"""Overload: calls beyond the concurrent-call bound are refused at once, clearly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api.errors import ERROR_DOMAIN, error_info_of
from tests.e2e.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"
LIMIT = 2
CALLS = 6


@pytest.fixture
def limited_server(server_environment: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    env = dict(server_environment)
    env["RTMANAGER_GRPC_MAX_CONCURRENT_RPCS"] = str(LIMIT)
    # Each start stays in flight this long, so the calls overlap.
    env["RTMANAGER_START_SETTLE"] = "3s"
    env["RTMANAGER_WATCH_HEARTBEAT"] = "1s"
    handle = start_server(env, tmp_path / "server.log")
    try:
        yield handle
    finally:
        handle.stop()


def test_calls_beyond_the_bound_get_resource_exhausted_with_a_clear_reason(
    limited_server: ServerProcess,
) -> None:
    barrier = threading.Barrier(CALLS)
    answers: dict[int, grpc.StatusCode] = {}
    refusals: list[grpc.RpcError] = []
    lock = threading.Lock()

    def start(index: int) -> None:
        with limited_server.channel() as channel:
            stub = pb_grpc.RuntimeServiceStub(channel)
            request = pb.StartRuntimeRequest(game_id=f"load-{index}", image_ref=STUB)
            grpc.channel_ready_future(channel).result(timeout=10)
            barrier.wait(timeout=30)
            try:
                stub.StartRuntime(request, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    with lock:
                        refusals.append(error)
        with lock:
            answers[index] = code

    threads = [threading.Thread(target=start, args=(i,)) for i in range(CALLS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(answers) == CALLS
    codes = list(answers.values())
    # Never UNKNOWN, INTERNAL or UNAVAILABLE: admitted calls finish, the rest are refused.
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= LIMIT, codes
    # All calls arrive while the first LIMIT starts settle; allow one more round.
    assert len(refusals) >= CALLS - 2 * LIMIT, codes
    for refusal in refusals:
        info = error_info_of(refusal)
        assert info is not None
        assert info.domain == ERROR_DOMAIN
        assert info.reason == "too_many_requests"
        assert info.metadata["limit"] == str(LIMIT)
        assert f"limit of {LIMIT} concurrent calls" in (refusal.details() or "")
        assert "RTMANAGER_GRPC_MAX_CONCURRENT_RPCS" in (refusal.details() or "")

    # The bound frees as calls end: a refused game can be started now.
    refused_game = next(i for i, code in answers.items() if code is not grpc.StatusCode.OK)
    with limited_server.channel() as channel:
        stub = pb_grpc.RuntimeServiceStub(channel)
        reply = stub.StartRuntime(
            pb.StartRuntimeRequest(game_id=f"load-{refused_game}", image_ref=STUB), timeout=60
        )
        assert reply.runtime.game_id == f"load-{refused_game}"


def test_watch_streams_do_not_count_against_the_bound(limited_server: ServerProcess) -> None:
    with limited_server.channel() as channel:
        stub = pb_grpc.RuntimeServiceStub(channel)
        streams = [
            stub.WatchRuntimes(pb.WatchRuntimesRequest(initial_snapshot=True), timeout=60)
            for _ in range(LIMIT + 1)
        ]
        try:
            for stream in streams:
                next(iter(stream))  # the stream is open and being served
            for _ in range(LIMIT + 1):
                listed = stub.ListRuntimes(pb.ListRuntimesRequest(), timeout=10)
                assert list(listed.runtimes) == []
        finally:
            for stream in streams:
                stream.cancel()  # type: ignore[no-untyped-call]
