"""Metrics and traces (OpenTelemetry), behind one small facade.

`Telemetry` records what the service does; with no exporter configured the
instruments are OpenTelemetry's no-ops, so lifecycles call it unconditionally.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from opentelemetry import metrics
from opentelemetry.metrics import Meter

from rtmanager import tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

_METER_NAME = "rtmanager"


class Telemetry:
    """The service's instruments (SPEC §8)."""

    def __init__(self, meter: Meter | None = None) -> None:
        meter = meter or metrics.get_meter(_METER_NAME)
        self._operations = meter.create_counter(
            "rtmanager_operations", description="Operations by kind, source, outcome and code"
        )
        self._duration = meter.create_histogram(
            "rtmanager_operation_duration_seconds", unit="s", description="Operation duration"
        )
        self._lease_latency = meter.create_histogram(
            "rtmanager_lease_acquire_seconds", unit="s", description="Game lease acquire latency"
        )
        self._docker_latency = meter.create_histogram(
            "rtmanager_docker_call_seconds", unit="s", description="Docker call latency"
        )
        self._reconcile_actions = meter.create_counter(
            "rtmanager_reconcile_actions", description="Reconciler actions by kind"
        )
        self._stream_jobs = meter.create_counter(
            "rtmanager_stream_jobs", description="Stream jobs processed by stream and outcome"
        )
        self._stream_lag = meter.create_gauge(
            "rtmanager_stream_consumer_lag", description="Job entries not yet read by the group"
        )
        # Counted up and down where watchers come and go, so it is exact
        # whatever the export interval (a gauge set on subscribe only never fell).
        self._watchers = meter.create_up_down_counter(
            "rtmanager_watch_subscribers", description="WatchRuntimes subscribers"
        )
        self._runtimes = meter.create_gauge(
            "rtmanager_runtimes", description="Runtime records by status (as of the last reconcile)"
        )

    def operation_finished(
        self, *, kind: str, source: str, outcome: str, error_code: str, seconds: float
    ) -> None:
        """Count one finished operation and observe its duration."""
        self._operations.add(
            1, {"op_kind": kind, "op_source": source, "outcome": outcome, "error_code": error_code}
        )
        self._duration.record(seconds, {"op_kind": kind, "outcome": outcome})

    def lease_acquired(self, seconds: float) -> None:
        """Observe how long taking a game lease took."""
        self._lease_latency.record(seconds)

    def docker_call(self, call: str, seconds: float) -> None:
        """Observe one Docker call's latency."""
        self._docker_latency.record(seconds, {"call": call})

    def reconcile_action(self, kind: str, applied: bool) -> None:
        """Count one reconciler action."""
        self._reconcile_actions.add(1, {"kind": kind, "applied": str(applied).lower()})

    def watch_subscribed(self) -> None:
        """Count one more WatchRuntimes subscriber of this process."""
        self._watchers.add(1)

    def watch_unsubscribed(self) -> None:
        """Count one WatchRuntimes subscriber fewer (once per `watch_subscribed`)."""
        self._watchers.add(-1)

    def stream_lag(self, stream: str, lag: int) -> None:
        """Report a job stream's consumer-group lag."""
        self._stream_lag.set(lag, {"stream": stream})

    def runtimes(self, counts: dict[str, int]) -> None:
        """Report how many runtime records are in each status."""
        for status, count in counts.items():
            self._runtimes.set(count, {"status": status})

    def stream_job(self, stream: str, outcome: str) -> None:
        """Count one processed stream job."""
        self._stream_jobs.add(1, {"stream": stream, "outcome": outcome})


class TelemetryExport:
    """The process's exporters: Prometheus metrics and OTLP traces, each only when configured.

    Only what the configuration uses is imported: the OpenTelemetry SDK
    and the Prometheus exporter when `metrics_addr` is set, the SDK's
    tracer, the OTLP exporter and the gRPC server instrumentation when
    `otlp_endpoint` is set. Without an address the instruments are the
    API's no-ops; without an endpoint there is no tracer provider and no
    interceptor, so no span is made that nothing would export. (Both
    exporters and the instrumentation add several MiB to an idle process.)
    """

    def __init__(self, *, metrics_addr: str, otlp_endpoint: str, service_name: str) -> None:
        self._http_server: object | None = None
        self.meter_provider: MeterProvider | None = None
        self.tracer_provider: TracerProvider | None = None
        if metrics_addr:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import start_http_server

            host, _, port = metrics_addr.rpartition(":")
            self._http_server, _thread = start_http_server(int(port), addr=host)
            self.meter_provider = MeterProvider(
                resource=_resource(service_name), metric_readers=[PrometheusMetricReader()]
            )
        if otlp_endpoint:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self.tracer_provider = TracerProvider(resource=_resource(service_name))
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
            )
            trace.set_tracer_provider(self.tracer_provider)
            tracing.enable(self.tracer_provider)
        self.telemetry = Telemetry(
            self.meter_provider.get_meter(_METER_NAME)
            if self.meter_provider is not None
            else metrics.NoOpMeter(_METER_NAME)
        )

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        """The gRPC server's interceptors: OpenTelemetry's when traces are exported."""
        if self.tracer_provider is None:
            return []
        return [request_tracing(self.tracer_provider)]

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self.tracer_provider is not None:
            tracing.disable()
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        shutdown = getattr(self._http_server, "shutdown", None)
        if shutdown is not None:
            shutdown()


def request_tracing(tracer_provider: TracerProvider) -> grpc.aio.ServerInterceptor[Any, Any]:
    """The server interceptor that makes a span of every request (see `_RequestTracing`)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, server_interceptor

    return _RequestTracing(
        threaded=server_interceptor(tracer_provider=tracer_provider),  # type: ignore[no-untyped-call]
        on_loop=aio_server_interceptor(tracer_provider=tracer_provider),  # type: ignore[no-untyped-call]
    )


class _RequestTracing(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """OpenTelemetry's gRPC instrumentation on a server with both kinds of handlers.

    Its asyncio interceptor turns every handler into a coroutine that awaits
    the original, which a synchronous handler (run in the server's thread
    pool) is not, and would then run it on the event loop. Synchronous
    handlers get the instrumentation's synchronous interceptor instead: its
    span is made and current in the handler's own thread.
    """

    def __init__(self, *, threaded: Any, on_loop: grpc.aio.ServerInterceptor[Any, Any]) -> None:
        self._threaded = threaded
        self._on_loop = on_loop

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # type: ignore[return-value]  # unknown method: UNIMPLEMENTED
        if not _runs_on_loop(handler):
            wrapped: grpc.RpcMethodHandler[Any, Any] = self._threaded.intercept_service(
                lambda _details: handler, handler_call_details
            )
            return wrapped

        async def resolved(_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
            return handler

        return await self._on_loop.intercept_service(resolved, handler_call_details)


def _runs_on_loop(handler: grpc.RpcMethodHandler[Any, Any]) -> bool:
    """Whether grpc.aio runs the handler on its event loop (else in its thread pool)."""
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def _resource(service_name: str) -> Resource:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": service_name})
