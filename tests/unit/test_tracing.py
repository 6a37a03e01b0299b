"""Span ids on log lines: every request and Lobby job runs in a span of its own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rtmanager import tracing
from rtmanager.lifecycle.leasing import GameLock
from tests.unit.fakes import FakeLeases

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


class Captured(logging.Handler):
    """Keeps the records a handler with the `TraceFields` filter would format."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(tracing.TraceFields())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("rtmanager.test_tracing")
    lease_logger = logging.getLogger("rtmanager.lifecycle.leasing")
    for each in (logger, lease_logger):
        each.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for each in (logger, lease_logger):
            each.removeHandler(handler)


log = logging.getLogger("rtmanager.test_tracing")


def ids(record: logging.LogRecord) -> tuple[str, str]:
    return record.trace_id, record.span_id  # type: ignore[attr-defined]


def test_a_line_outside_any_request_or_job_has_no_ids(captured: Captured) -> None:
    log.info("idle")

    (record,) = captured.records
    assert not hasattr(record, "trace_id") and not hasattr(record, "span_id")


def test_each_request_gets_ids_of_its_own_without_a_tracer(captured: Captured) -> None:
    for _ in range(2):
        with tracing.request_scope([("authorization", "Bearer x")]):
            log.info("first")
            log.info("second")

    first, second, third, fourth = (ids(record) for record in captured.records)
    assert first == second and third == fourth
    assert first[0] != third[0] and first[1] != third[1]
    for trace_id, span_id in (first, third):
        assert len(trace_id) == 32 and len(span_id) == 16
        assert int(trace_id, 16) and int(span_id, 16)


def test_a_request_continues_the_callers_trace(captured: Captured) -> None:
    with tracing.request_scope([("traceparent", TRACEPARENT)]):
        log.info("in the caller's trace")

    trace_id, span_id = ids(captured.records[0])
    assert trace_id == CALLER_TRACE and span_id != CALLER_SPAN


def test_a_request_already_in_a_recording_span_keeps_it(captured: Captured) -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("instrumented") as span:
        with tracing.request_scope([("traceparent", TRACEPARENT)]):
            log.info("inside the instrumentation's span")
        expected = span.get_span_context()

    assert ids(captured.records[0]) == (
        format(expected.trace_id, "032x"),
        format(expected.span_id, "016x"),
    )


def test_a_job_line_carries_its_stream_entry_id_and_span_ids(captured: Captured) -> None:
    fields = {"job_id": "1700000000000-0", "stream": "runtime:start_jobs", "game_id": "g1"}
    with tracing.job_scope("lobby start job", fields):
        log.info("applying")
        log.info("explicit", extra={"game_id": "other"})
    log.info("after")

    applying, explicit, after = captured.records
    assert applying.job_id == "1700000000000-0"  # type: ignore[attr-defined]
    assert applying.stream == "runtime:start_jobs"  # type: ignore[attr-defined]
    assert ids(applying) == ids(explicit)
    assert explicit.game_id == "other"  # type: ignore[attr-defined]
    assert not hasattr(after, "job_id") and not hasattr(after, "trace_id")


def test_with_traces_exported_a_job_is_a_recorded_span_whose_ids_are_logged(
    captured: Captured,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        # A job is not part of whatever ran before it on the thread.
        with (
            tracing.request_scope([("traceparent", TRACEPARENT)]),
            tracing.job_scope("lobby stop job", {"job_id": "5-0"}),
        ):
            log.info("applying")
    finally:
        tracing.disable()

    (span,) = exporter.get_finished_spans()
    assert span.name == "lobby stop job"
    assert span.attributes is not None and span.attributes["rtmanager.job_id"] == "5-0"
    context = span.get_span_context()
    assert context is not None and span.parent is None
    assert ids(captured.records[0]) == (
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    )


def test_the_lease_renewer_logs_in_the_operations_span(captured: Captured) -> None:
    leases = FakeLeases()
    leases.go_down("renew", "release")
    renewal_failed = threading.Event()
    lease_logger = logging.getLogger("rtmanager.lifecycle.leasing")

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            renewal_failed.set()

    signal = Signal()
    lease_logger.addHandler(signal)
    try:
        with (
            tracing.request_scope([("traceparent", TRACEPARENT)]),
            GameLock(leases, timedelta(milliseconds=150)).hold("g1"),
        ):
            assert renewal_failed.wait(5)
    finally:
        lease_logger.removeHandler(signal)

    renewer_lines = [r for r in captured.records if r.threadName == "lease-g1"]
    assert renewer_lines
    assert all(ids(r)[0] == CALLER_TRACE for r in renewer_lines)
    assert trace.get_current_span().get_span_context().is_valid is False
