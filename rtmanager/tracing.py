"""The span every request and Lobby job runs in, and the fields it gives log lines.

Log lines written while handling a request or a job carry the `trace_id`
and `span_id` of the current span (SPEC §8), and a job's `job_stream` and
`job_id`, so one request can be followed from its span to its log lines.

With an OTLP endpoint configured (`enable`), spans are real: the gRPC
instrumentation makes one per request and `job_scope` one per job attempt.
Without one nothing is recorded or exported, but each request and job
still gets span ids of its own (a `NonRecordingSpan`), continuing the
caller's trace when it sent a W3C `traceparent`: the log lines of one call
share one id that matches the caller's trace. That costs a few random bits
and a context switch per call, nothing else.
"""

from __future__ import annotations

import contextvars
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# The tracer that records spans, when traces are exported (see `enable`).
_tracer: trace.Tracer | None = None
_propagator = TraceContextTextMapPropagator()
# Extra log fields of the work in progress (a job's stream and entry id).
_NO_FIELDS: Mapping[str, object] = MappingProxyType({})
_log_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "rtmanager_log_fields", default=_NO_FIELDS
)


def enable(tracer_provider: trace.TracerProvider) -> None:
    """Record and export a span for every job from now on (requests: the instrumentation)."""
    global _tracer  # noqa: PLW0603 - one process-wide switch, set once at start-up
    _tracer = tracer_provider.get_tracer("rtmanager")


def disable() -> None:
    """Go back to span ids without recording (at shutdown, and for tests)."""
    global _tracer  # noqa: PLW0603
    _tracer = None


@contextmanager
def request_scope(metadata: Sequence[tuple[str, str | bytes]] | None) -> Iterator[None]:
    """Run a request in a span: the instrumentation's, or one with ids only.

    `metadata` is the call's invocation metadata; its `traceparent`, if
    any, is the parent of the ids-only span.
    """
    with span_scope(request_span(metadata)):
        yield


def request_span(metadata: Sequence[tuple[str, str | bytes]] | None) -> trace.Span | None:
    """The ids-only span of a request (see `request_scope`); None when the gRPC
    instrumentation's recording span is current already."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    parent = None
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            extracted = _propagator.extract({"traceparent": value})
            parent = trace.get_current_span(extracted).get_span_context()
    return _ids_only_span(parent)


@contextmanager
def span_scope(span: trace.Span | None) -> Iterator[None]:
    """Make `span` current within the block (None: leave the current one).

    For work that is suspended and resumed (a stream on the event loop),
    open it only around steps that do not yield, so the block ends in the
    context it began in.
    """
    if span is None:
        yield
        return
    with _current(span):
        yield


@contextmanager
def job_scope(name: str, fields: Mapping[str, object]) -> Iterator[None]:
    """Run one attempt of a Lobby job in a span of its own, `fields` on every log line."""
    token = _log_fields.set(fields)
    try:
        if _tracer is not None:
            attributes = {f"rtmanager.{key}": str(value) for key, value in fields.items()}
            root = otel_context.Context()  # a job is not part of whatever ran before it
            with _tracer.start_as_current_span(name, context=root, attributes=attributes):
                yield
        else:
            with _current(_ids_only_span(None)):
                yield
    finally:
        _log_fields.reset(token)


class TraceFields(logging.Filter):
    """Adds `trace_id`, `span_id` and the work's fields to each log record that has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Never drops a record; only adds fields the record does not carry already."""
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        for key, value in _log_fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


@contextmanager
def _current(span: trace.Span) -> Iterator[None]:
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def _ids_only_span(parent: SpanContext | None) -> NonRecordingSpan:
    """A span that records nothing: the parent's trace id (or a new one) and a new span id."""
    if parent is not None and parent.is_valid:
        trace_id, flags = parent.trace_id, parent.trace_flags
    else:
        trace_id, flags = _nonzero(128), TraceFlags(TraceFlags.DEFAULT)
    return NonRecordingSpan(SpanContext(trace_id, _nonzero(64), is_remote=False, trace_flags=flags))


def _nonzero(bits: int) -> int:
    while True:
        value = random.getrandbits(bits)
        if value:
            return value
