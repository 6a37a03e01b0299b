"""WatchRuntimes on the wire: each change serialized once, sent as the same message."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from typing import Any

import grpc
import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api import convert_results
from rtmanager.api.auth import Authenticator
from rtmanager.api.limits import CallLimiter
from rtmanager.api.server import GrpcServer, add_runtime_service
from rtmanager.api.servicers import RuntimeServicer
from rtmanager.client import RuntimeManagerClient, ServiceUnavailableError, runtime_event
from rtmanager.domain.operation import OpKind
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.watch import (
    Bookmark,
    ChangeEvent,
    SnapshotDone,
    SnapshotRecord,
    WatchItem,
    WatchService,
)
from tests.unit.test_watch import FakeFeed, FakeSubscription, event, record


def test_a_change_is_serialized_once_for_all_its_watchers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[int] = []
    original = convert_results.watch_item_to_pb

    def counting(item: Any) -> pb.WatchRuntimesResponse:
        if isinstance(item, ChangeEvent):
            built.append(item.event.id)
        return original(item)

    monkeypatch.setattr(convert_results, "watch_item_to_pb", counting)
    wire = convert_results.WatchWire()
    change = event(7, "g1")
    start = threading.Barrier(32)

    def one_watcher() -> bytes:
        start.wait()
        return wire.encode(ChangeEvent(change))

    with ThreadPoolExecutor(32) as pool:
        sent = list(pool.map(lambda _: one_watcher(), range(32)))
    assert built == [7]
    assert all(data is sent[0] for data in sent)
    assert pb.WatchRuntimesResponse.FromString(sent[0]) == original(ChangeEvent(change))


def test_only_the_newest_changes_are_remembered() -> None:
    wire = convert_results.WatchWire(remember=2)
    first = wire.encode(ChangeEvent(event(1)))
    wire.encode(ChangeEvent(event(2)))
    assert wire.encode(ChangeEvent(event(1))) is first
    wire.encode(ChangeEvent(event(3)))
    wire.encode(ChangeEvent(event(4)))
    again = wire.encode(ChangeEvent(event(1)))
    assert again is not first and again == first


def test_items_of_one_watcher_are_encoded_each_time() -> None:
    wire = convert_results.WatchWire()
    for item in (SnapshotRecord(record("a")), SnapshotDone(3)):
        assert pb.WatchRuntimesResponse.FromString(
            wire.encode(item)
        ) == convert_results.watch_item_to_pb(item)
    bookmark = pb.WatchRuntimesResponse.FromString(wire.encode(Bookmark(5)))
    assert bookmark.bookmark.cursor == "5" and bookmark.bookmark.HasField("server_time")


class _Watches:
    """A `Lifecycles` that has only the watch use case."""

    def __init__(self, watch: WatchService) -> None:
        self.watch = watch


@pytest.fixture
def served() -> Iterator[tuple[pb_grpc.RuntimeServiceStub, FakeFeed]]:
    stored = [event(1, "a"), event(2, "b"), event(3, "a", RuntimeStatus.STOPPED)]
    live: list[Any] = [event(4, "a"), event(5, "b"), 5]
    feed = FakeFeed(
        stored,
        FakeSubscription(position=3, live=live),
        records=[record("a"), record("b")],
        snapshot_cursor=3,
    )
    lifecycles: Any = _Watches(WatchService(feed, heartbeat=timedelta(seconds=1)))
    server = serve(RuntimeServicer(lifecycles, Authenticator({}), CallLimiter(4)))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.RuntimeServiceStub(channel), feed
    finally:
        channel.close()
        stop(server)


def serve(servicer: RuntimeServicer) -> GrpcServer:
    """`RuntimeService` alone on a started server, as rtmanager serves it."""
    server = GrpcServer(
        address="127.0.0.1:0",
        register=lambda aio_server: add_runtime_service(servicer, aio_server),
        max_workers=4,
        max_message_bytes=4 * 1024 * 1024,
    )
    server.start()
    return server


def stop(server: GrpcServer) -> None:
    assert server.stop(0).wait(10)
    server.close(10)


def _without_server_time(
    messages: list[pb.WatchRuntimesResponse],
) -> list[pb.WatchRuntimesResponse]:
    for message in messages:
        if message.HasField("bookmark"):
            message.bookmark.ClearField("server_time")
    return messages


def _receive(stub: pb_grpc.RuntimeServiceStub, request: pb.WatchRuntimesRequest) -> list[Any]:
    received: list[Any] = []
    with pytest.raises(grpc.RpcError) as ended:
        for message in stub.WatchRuntimes(request, timeout=10):
            received.append(message)
    # The fake feed closes after its live items: the watch ends UNAVAILABLE.
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    return received


def test_the_generated_client_receives_the_messages_of_before(
    served: tuple[pb_grpc.RuntimeServiceStub, FakeFeed],
) -> None:
    stub, _ = served
    received = _receive(stub, pb.WatchRuntimesRequest(game_ids=["a"], since="0"))
    expected: list[WatchItem] = [
        ChangeEvent(event(1, "a")),
        ChangeEvent(event(3, "a", RuntimeStatus.STOPPED)),
        ChangeEvent(event(4, "a")),
        Bookmark(5),
    ]
    assert _without_server_time(received) == _without_server_time(
        [convert_results.watch_item_to_pb(item) for item in expected]
    )


def test_a_snapshot_arrives_as_the_messages_of_before(
    served: tuple[pb_grpc.RuntimeServiceStub, FakeFeed],
) -> None:
    stub, _ = served
    received = _receive(stub, pb.WatchRuntimesRequest(initial_snapshot=True))
    expected: list[WatchItem] = [
        SnapshotRecord(record("a")),
        SnapshotRecord(record("b")),
        SnapshotDone(3),
        ChangeEvent(event(4, "a")),
        ChangeEvent(event(5, "b")),
        Bookmark(5),
    ]
    assert _without_server_time(received) == _without_server_time(
        [convert_results.watch_item_to_pb(item) for item in expected]
    )


def test_an_inner_step_and_its_operation_arrive_with_source_ref_and_parent() -> None:
    inner = replace(
        event(8, "a", RuntimeStatus.STOPPED),
        op_kind=OpKind.STOP,
        operation_id=21,
        source_ref="gm-7",
        parent_op_kind=OpKind.RESTART,
        parent_operation_id=20,
    )
    outer = replace(event(9, "a"), op_kind=OpKind.RESTART, operation_id=20, source_ref="gm-7")
    feed = FakeFeed([], FakeSubscription(position=7, live=[inner, outer]))
    lifecycles: Any = _Watches(WatchService(feed, heartbeat=timedelta(seconds=1)))
    server = serve(RuntimeServicer(lifecycles, Authenticator({}), CallLimiter(4)))
    try:
        with RuntimeManagerClient(f"127.0.0.1:{server.port}") as client:
            received = []
            with pytest.raises(ServiceUnavailableError):
                for message in client.watch_runtimes(pb.WatchRuntimesRequest()):
                    received.append(message)
    finally:
        stop(server)

    first, second = (message.event for message in received)
    assert (first.source_ref, first.parent_op_kind, first.parent_operation_id) == (
        "gm-7",
        pb.OP_KIND_RESTART,
        20,
    )
    assert (second.op_kind, second.operation_id, second.parent_operation_id) == (
        pb.OP_KIND_RESTART,
        20,
        0,
    )
    assert [runtime_event(message.event) for message in received] == [inner, outer]
    assert runtime_event(first).inner_step and not runtime_event(second).inner_step
