"""The server model: lifecycle RPCs in the thread pool; the reads and the
watches on the event loop.

Both kinds of handler keep what the servicers rely on: the caller's
metadata, rich error statuses, deadlines, the call limit, and with tracing
on, a span per request in which the handler runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api.auth import Authenticator, Role
from rtmanager.api.errors import error_info_of
from rtmanager.api.health import LoopHealthServicer
from rtmanager.api.limits import CallLimiter
from rtmanager.api.server import BindError, GrpcServer, add_runtime_service
from rtmanager.api.servicers import RuntimeServicer
from rtmanager.deadlines import bounded
from rtmanager.domain.errors import NotFound
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.lifecycle.watch import WatchService
from rtmanager.telemetry import request_tracing
from tests.unit.test_watch import FakeFeed, FakeSubscription, event

TOKEN = "gm-token-0123456789abcdef"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Queries:
    """The use cases the test RPCs call: each finds nothing and notes where
    and how it was asked (`reads` and `stop` of `Lifecycles`)."""

    threads: list[str] = field(default_factory=list)
    bounds: list[timedelta] = field(default_factory=list)
    spans: list[int] = field(default_factory=list)
    release: asyncio.Event | None = None

    def _note(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.bounds.append(bounded(timedelta(hours=1)))
        self.spans.append(trace.get_current_span().get_span_context().trace_id)

    async def get_runtime(self, game_id: str) -> RuntimeRecord:
        self._note()
        if self.release is not None:
            await self.release.wait()
        self._note()  # the span and deadline are still the call's after an await
        raise NotFound(f"no runtime {game_id}")

    def handle(self, request: StopRequest) -> RuntimeRecord:
        self._note()
        raise NotFound(f"no runtime {request.game_id}")


@dataclass
class Lifecycles:
    reads: Queries
    stop: Queries
    watch: WatchService


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def served(spans: InMemorySpanExporter) -> Iterator[tuple[GrpcServer, Queries]]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    queries = Queries()
    feed = FakeFeed([], FakeSubscription(position=3, live=[event(4), 4]))
    lifecycles: Any = Lifecycles(
        queries, queries, WatchService(feed, heartbeat=timedelta(seconds=1))
    )
    servicer = RuntimeServicer(lifecycles, Authenticator({TOKEN: Role.GAME_MASTER}), CallLimiter(4))
    server = GrpcServer(
        address="127.0.0.1:0",
        register=lambda aio_server: add_runtime_service(servicer, aio_server),
        max_workers=4,
        max_message_bytes=4 * 1024 * 1024,
        interceptors=[request_tracing(provider)],
    )
    server.start()
    try:
        yield server, queries
    finally:
        assert server.stop(0).wait(10)
        server.close(10)


@contextmanager
def stub(server: GrpcServer) -> Iterator[pb_grpc.RuntimeServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.RuntimeServiceStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)


@contextmanager
def timed() -> Iterator[list[float]]:
    """How long the block took, in seconds, as the list's one item once it ends."""
    took: list[float] = []
    started = time.monotonic()
    try:
        yield took
    finally:
        took.append(time.monotonic() - started)


# gRPC tells a handler its time left by its own clock, which it reads once per
# batch of work: on a loaded machine the server has seen up to 9 ms more than
# the client gave.
CLOCK_SLACK = 0.25


def within_the_callers_deadline(bound: timedelta, timeout: float, took: list[float]) -> bool:
    """Whether `bound` is what a handler has left of a `timeout`-second call
    that took `took[0]` seconds from the client's side: no more than the
    timeout, and no less than what was left when the call returned, both
    within `CLOCK_SLACK` (far from the handler's own one-hour ceiling)."""
    (elapsed,) = took
    low, high = timeout - elapsed - CLOCK_SLACK, timeout + CLOCK_SLACK
    return timedelta(seconds=low) <= bound <= timedelta(seconds=high)


def finished(spans: InMemorySpanExporter, suffix: str) -> ReadableSpan:
    """The one finished span of the method; it may end just after the client has its answer."""
    deadline = time.monotonic() + 5
    while True:
        found = [s for s in spans.get_finished_spans() if s.name.endswith(suffix)]
        if found or time.monotonic() > deadline:
            (span,) = found
            return span
        time.sleep(0.01)


def test_a_lifecycle_rpc_runs_in_the_pool_in_its_span_with_its_deadline_and_rich_errors(
    served: tuple[GrpcServer, Queries], spans: InMemorySpanExporter
) -> None:
    server, queries = served
    request = pb.StopRuntimeRequest(game_id="g1", reason=pb.STOP_REASON_ADMIN_REQUEST)
    with stub(server) as runtimes, pytest.raises(grpc.RpcError) as failed, timed() as took:
        runtimes.StopRuntime(request, metadata=AUTH, timeout=5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info_of(failed.value)
    assert info is not None and info.reason == "not_found"
    assert info.metadata["game_id"] == "g1"
    assert queries.threads[0].startswith("grpc_")
    assert within_the_callers_deadline(queries.bounds[0], 5, took)
    span = finished(spans, "/StopRuntime")
    assert span.context is not None and queries.spans == [span.context.trace_id]
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 5


def test_a_read_runs_on_the_loop_in_its_span_with_its_deadline_and_rich_errors(
    served: tuple[GrpcServer, Queries], spans: InMemorySpanExporter
) -> None:
    server, queries = served
    with stub(server) as runtimes, pytest.raises(grpc.RpcError) as failed, timed() as took:
        runtimes.GetRuntime(pb.GetRuntimeRequest(game_id="g1"), metadata=AUTH, timeout=5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info_of(failed.value)
    assert info is not None and info.reason == "not_found"
    assert info.metadata["game_id"] == "g1"
    assert queries.threads == ["grpc-loop", "grpc-loop"]
    assert all(within_the_callers_deadline(bound, 5, took) for bound in queries.bounds)
    span = finished(spans, "/GetRuntime")
    assert span.context is not None
    assert queries.spans == [span.context.trace_id] * 2
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 5


def test_reads_on_the_loop_count_against_the_call_limit(
    served: tuple[GrpcServer, Queries],
) -> None:
    server, queries = served
    queries.release = asyncio.Event()
    with stub(server) as runtimes:
        waiting = [
            runtimes.GetRuntime.future(
                pb.GetRuntimeRequest(game_id=f"g{n}"), metadata=AUTH, timeout=10
            )
            for n in range(4)
        ]
        deadline = time.monotonic() + 5
        while len(queries.threads) < 4:
            assert time.monotonic() < deadline, "the reads did not all start"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as refused:
            runtimes.GetRuntime(pb.GetRuntimeRequest(game_id="g9"), metadata=AUTH, timeout=5)
        server.loop.call_soon_threadsafe(queries.release.set)
        codes = [_code_of(call) for call in waiting]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info_of(refused.value)
    assert info is not None and info.reason == "too_many_requests"
    assert codes == [grpc.StatusCode.NOT_FOUND] * 4


def _code_of(call: Any) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_the_loop_resources_open_before_serving_and_close_after_the_calls() -> None:
    events: list[str] = []

    class Resource:
        async def open(self) -> None:
            events.append(f"open {threading.current_thread().name}")

        async def close(self) -> None:
            events.append(f"close {threading.current_thread().name}")

    server = GrpcServer(
        address="127.0.0.1:0",
        register=lambda _server: None,
        max_workers=1,
        max_message_bytes=1024,
        resources=[Resource()],
    )
    server.start()
    assert events == ["open grpc-loop"]
    assert server.stop(0).wait(10)
    server.close(10)
    assert events == ["open grpc-loop", "close grpc-loop"]


def test_a_caller_without_a_token_is_refused_on_both_kinds_of_rpc(
    served: tuple[GrpcServer, Queries],
) -> None:
    server, queries = served
    with stub(server) as runtimes:
        with pytest.raises(grpc.RpcError) as unary:
            runtimes.GetRuntime(pb.GetRuntimeRequest(game_id="g1"), timeout=5)
        with pytest.raises(grpc.RpcError) as stream:
            list(runtimes.WatchRuntimes(pb.WatchRuntimesRequest(), timeout=5))
    for refused in (unary.value, stream.value):
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info_of(refused)
        assert info is not None and info.reason == "unauthenticated"
    assert queries.threads == []


def test_a_watch_runs_on_the_loop_in_its_span_and_ends_with_a_rich_status(
    served: tuple[GrpcServer, Queries], spans: InMemorySpanExporter
) -> None:
    server, _ = served
    with stub(server) as runtimes:
        stream = runtimes.WatchRuntimes(pb.WatchRuntimesRequest(), metadata=AUTH, timeout=5)
        received = []
        with pytest.raises(grpc.RpcError) as ended:
            for message in stream:
                received.append(message.WhichOneof("payload"))
    assert received == ["event", "bookmark"]
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info_of(ended.value)
    assert info is not None and (info.reason, info.metadata["cursor"]) == ("unavailable", "4")
    span = finished(spans, "/WatchRuntimes")
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 14


def test_an_address_in_use_is_a_bind_error(served: tuple[GrpcServer, Queries]) -> None:
    server, _ = served
    with pytest.raises(BindError):
        GrpcServer(
            address=f"127.0.0.1:{server.port}",
            register=lambda _server: None,
            max_workers=1,
            max_message_bytes=1024,
        )


def test_a_health_watch_runs_on_the_loop_and_is_forgotten_when_cancelled() -> None:
    servicer = health.HealthServicer()
    server = GrpcServer(
        address="127.0.0.1:0",
        register=lambda aio_server: health_pb2_grpc.add_HealthServicer_to_server(
            LoopHealthServicer(servicer), aio_server
        ),
        max_workers=2,
        max_message_bytes=1024 * 1024,
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            checks = health_pb2_grpc.HealthStub(channel)
            assert checks.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            updates = checks.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(updates).status == SERVING
            servicer.set("", NOT_SERVING)
            assert next(updates).status == NOT_SERVING
            updates.cancel()
            deadline = time.monotonic() + 5
            while servicer._send_response_callbacks[""]:  # what a leak would keep
                assert time.monotonic() < deadline, "the cancelled watch stayed registered"
                time.sleep(0.01)
    finally:
        assert server.stop(0).wait(10)
        server.close(10)
