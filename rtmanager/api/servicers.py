"""gRPC servicers of `RuntimeService` and `RuntimeAdminService`.

Each RPC authenticates its caller, converts the request to domain values,
calls one use case and converts the result back. Failures leave through
`rpc`, which maps them to statuses in one place (`rtmanager.api.errors`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.rpc import code_pb2

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api import convert, convert_results
from rtmanager.api.auth import Authenticator, AuthFailure, Principal
from rtmanager.api.errors import overloaded_status, rich_status, to_rpc_status
from rtmanager.api.limits import CallLimiter, Overloaded
from rtmanager.deadlines import deadline_scope
from rtmanager.domain.errors import ErrorCode, Failure, RuntimeManagerError
from rtmanager.domain.runtime import RuntimeRecord
from rtmanager.lifecycle.cleanup import CleanupRequest, CleanupService
from rtmanager.lifecycle.patch import PatchRequest, PatchService
from rtmanager.lifecycle.queries import RuntimeExplainer, RuntimeQueries, RuntimeReads
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.restart import RestartRequest, RestartService
from rtmanager.lifecycle.start import StartRequest, StartService
from rtmanager.lifecycle.stop import StopRequest, StopService
from rtmanager.lifecycle.watch import WatchEnded, WatchService, format_cursor, watch_request
from rtmanager.ports import OperationFilter
from rtmanager.tracing import request_scope, request_span, span_scope

log = logging.getLogger(__name__)

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[S, Req, grpc.ServicerContext, Principal], Resp]
Handler = Callable[[S, Req, grpc.ServicerContext], Resp]


@dataclass(frozen=True)
class Lifecycles:
    """The use cases the servicers call."""

    queries: RuntimeQueries
    reads: RuntimeReads
    start: StartService
    stop: StopService
    restart: RestartService
    patch: PatchService
    cleanup: CleanupService
    reconciler: Reconciler
    watch: WatchService
    explainer: RuntimeExplainer


_WATCH_ENDINGS = {
    "cursor_expired": code_pb2.OUT_OF_RANGE,
    "too_slow": code_pb2.RESOURCE_EXHAUSTED,
    "too_many_watchers": code_pb2.RESOURCE_EXHAUSTED,
    "unavailable": code_pb2.UNAVAILABLE,
}


class _Authenticated:
    """Servicers that know who is calling."""

    def __init__(self, lifecycles: Lifecycles, auth: Authenticator, limiter: CallLimiter) -> None:
        self._lifecycles = lifecycles
        self._auth = auth
        self._limiter = limiter

    @contextmanager
    def _admitted(self, context: grpc.ServicerContext, *, admin_only: bool) -> Iterator[Principal]:
        """Authenticate the caller, admit the call within the concurrent-call
        bound and bound its waits by the caller's deadline; the caller."""
        caller = self._auth.authenticate(context, admin_only=admin_only)
        with self._limiter.admit(), deadline_scope(context.time_remaining()):
            yield caller


def rpc(*, admin_only: bool = False) -> Callable[[Method[Any, Req, Resp]], Handler[Any, Req, Resp]]:
    """Run in the request's span, authenticate, admit within the concurrent-call
    bound, bound waits by the caller's deadline, map every failure.

    Expected failures (`RuntimeManagerError`) become their stable code; any
    other exception is a bug, logged with its traceback and reported as
    `internal` without leaking details.
    """

    def decorate(method: Method[Any, Req, Resp]) -> Handler[Any, Req, Resp]:
        @functools.wraps(method)
        def handler(self: _Authenticated, request: Req, context: grpc.ServicerContext) -> Resp:
            with request_scope(context.invocation_metadata()):
                try:
                    with self._admitted(context, admin_only=admin_only) as caller:
                        return method(self, request, context, caller)
                except Exception as error:
                    _abort_for(context, error, method.__name__, _game_id_of(request))
            raise AssertionError("abort returned")  # pragma: no cover

        return handler

    return decorate


AsyncMethod = Callable[
    [S, Req, grpc.aio.ServicerContext[Any, Any], Principal], Coroutine[Any, Any, Resp]
]
AsyncHandler = Callable[[S, Req, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, Resp]]


def loop_rpc(
    *, admin_only: bool = False
) -> Callable[[AsyncMethod[Any, Req, Resp]], AsyncHandler[Any, Req, Resp]]:
    """`rpc` for a coroutine handler, run on the server's event loop.

    The same steps in the same order: the request's span, authentication,
    admission within the concurrent-call bound, the caller's deadline, one
    failure-to-status path. The call runs in one task, so the span and the
    deadline (context variables) stay its own across its awaits.
    """

    def decorate(method: AsyncMethod[Any, Req, Resp]) -> AsyncHandler[Any, Req, Resp]:
        @functools.wraps(method)
        async def handler(
            self: _Authenticated, request: Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Resp:
            with request_scope(context.invocation_metadata()):  # type: ignore[arg-type]
                try:
                    with self._admitted(context, admin_only=admin_only) as caller:  # type: ignore[arg-type]
                        return await method(self, request, context, caller)
                except Exception as error:
                    status = _status_for(error, method.__name__, _game_id_of(request))
                    if status is None:
                        raise
                await context.abort(status.code, status.details, status.trailing_metadata)
            raise AssertionError("abort returned")  # pragma: no cover

        return handler

    return decorate


def _abort_for(
    context: grpc.ServicerContext, error: Exception, rpc_name: str, game_id: str = ""
) -> None:
    """End a synchronous RPC with the status for `error` (see `_status_for`)."""
    status = _status_for(error, rpc_name, game_id)
    if status is None:
        raise error
    # What `abort_with_status` does, which grpc.aio's context for synchronous
    # handlers lacks.
    context.set_trailing_metadata(status.trailing_metadata)
    context.abort(status.code, status.details)


def _status_for(error: Exception, rpc_name: str, game_id: str = "") -> grpc.Status | None:
    """The status that ends an RPC for `error`: the one failure-to-status path.

    Auth failures, overload and watch endings carry their own codes; expected failures
    (`RuntimeManagerError`) their stable code; anything else is a bug, logged
    with its traceback and reported as `internal` without leaking details.
    None for an abort already in progress, which is let through.
    """
    if isinstance(error, AuthFailure):
        return rich_status(error.code.value[0], error.reason, error.message, {})
    if isinstance(error, Overloaded):
        return overloaded_status(error.message, error.limit)
    if isinstance(error, WatchEnded):
        metadata = {} if error.cursor is None else {"cursor": format_cursor(error.cursor)}
        return rich_status(_WATCH_ENDINGS[error.kind], error.kind, error.message, metadata)
    if isinstance(error, RuntimeManagerError):
        return to_rpc_status(error.to_failure(), game_id=game_id)
    if isinstance(error, grpc.aio.AbortError):
        return None
    log.exception("unexpected error in %s", rpc_name)
    internal = Failure(ErrorCode.INTERNAL, "internal error; see the server log")
    return to_rpc_status(internal, game_id=game_id)


def _game_id_of(request: Any) -> str:
    value = getattr(request, "game_id", "")
    return value if isinstance(value, str) and len(value) <= 64 else ""


def _record_of(result: OperationResult) -> pb.RuntimeRecord:
    """The record of a successful result; a failure raises its error."""
    if not result.ok:
        assert result.failure is not None
        raise RuntimeManagerError.from_failure(result.failure)
    record: RuntimeRecord | None = result.record
    if record is None:
        raise RuntimeManagerError.from_failure(
            Failure(ErrorCode.INTERNAL, "operation succeeded without a record")
        )
    return convert.record_to_pb(record)


class RuntimeServicer(_Authenticated, pb_grpc.RuntimeServiceServicer):
    """`galaxy.rtmanager.v1.RuntimeService` (Game Master and admins).

    `GetRuntime`, `ListRuntimes` and `WatchRuntimes` are coroutines, run on
    the server's event loop; the lifecycle RPCs are synchronous and run in
    its thread pool.

    The reads answer with bytes: `GetRuntime` and `ListRuntimes` return their
    serialized replies (assembled from memoised record bytes, see
    `convert.list_runtimes_reply`), `WatchRuntimes` yields serialized
    `WatchRuntimesResponse`s, each change's bytes made once for all its
    watchers. `rtmanager.api.server` registers them with a serializer that
    sends the bytes as they are.
    """

    def __init__(self, lifecycles: Lifecycles, auth: Authenticator, limiter: CallLimiter) -> None:
        super().__init__(lifecycles, auth, limiter)
        self._watch_wire = convert_results.WatchWire()

    @rpc()
    def StartRuntime(  # noqa: N802 - gRPC method names
        self, request: pb.StartRuntimeRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.StartRuntimeResponse:
        result = self._lifecycles.start.handle(
            StartRequest(
                game_id=request.game_id,
                image_ref=request.image_ref,
                op_source=caller.op_source,
                source_ref=request.source_ref,
            )
        )
        return pb.StartRuntimeResponse(runtime=_record_of(result))

    @rpc()
    def StopRuntime(  # noqa: N802
        self, request: pb.StopRuntimeRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.StopRuntimeResponse:
        reason = convert.stop_reason_from_pb(request.reason)
        result = self._lifecycles.stop.handle(
            StopRequest(
                game_id=request.game_id,
                op_source=caller.op_source,
                reason=reason,
                source_ref=request.source_ref,
            )
        )
        return pb.StopRuntimeResponse(runtime=_record_of(result))

    @rpc()
    def RestartRuntime(  # noqa: N802
        self, request: pb.RestartRuntimeRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.RestartRuntimeResponse:
        result = self._lifecycles.restart.handle(
            RestartRequest(
                game_id=request.game_id, op_source=caller.op_source, source_ref=request.source_ref
            )
        )
        return pb.RestartRuntimeResponse(runtime=_record_of(result))

    @rpc()
    def PatchRuntime(  # noqa: N802
        self, request: pb.PatchRuntimeRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.PatchRuntimeResponse:
        result = self._lifecycles.patch.handle(
            PatchRequest(
                game_id=request.game_id,
                image_ref=request.image_ref,
                op_source=caller.op_source,
                source_ref=request.source_ref,
            )
        )
        return pb.PatchRuntimeResponse(runtime=_record_of(result))

    @loop_rpc()
    async def GetRuntime(  # type: ignore[override]  # noqa: N802 - bytes, see the class
        self,
        request: pb.GetRuntimeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        caller: Principal,
    ) -> bytes:
        record = await self._lifecycles.reads.get_runtime(request.game_id)
        return convert.get_runtime_reply(record)

    @loop_rpc()
    async def ListRuntimes(  # type: ignore[override]  # noqa: N802 - bytes, see the class
        self,
        request: pb.ListRuntimesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        caller: Principal,
    ) -> bytes:
        status = convert.enum_from_pb(convert.STATUS_FROM_PB, request.status, "status")
        page = await self._lifecycles.reads.list_runtimes(
            status=status, page_size=request.page_size, page_token=request.page_token
        )
        return convert.list_runtimes_reply(page.items, page.next_page_token)

    async def WatchRuntimes(  # type: ignore[override]  # noqa: N802 - bytes, see the class
        self, request: pb.WatchRuntimesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        # Runs on the server's event loop. The request's span is made current
        # only around work that does not yield: a stream may be closed from
        # another task, where the span's context is not the current one.
        span = request_span(context.invocation_metadata())  # type: ignore[arg-type]
        try:
            with span_scope(span):
                self._auth.authenticate(context, admin_only=False)  # type: ignore[arg-type]
                watch = watch_request(
                    list(request.game_ids),
                    convert.statuses_from_pb(request.statuses),
                    request.since,
                    request.initial_snapshot,
                )
            encode = self._watch_wire.encode
            async for item in self._lifecycles.watch.watch(watch):
                yield encode(item)
        except Exception as error:
            with span_scope(span):
                status = _status_for(error, "WatchRuntimes")
            if status is None:
                raise
            await context.abort(status.code, status.details, status.trailing_metadata)


class RuntimeAdminServicer(_Authenticated, pb_grpc.RuntimeAdminServiceServicer):
    """`galaxy.rtmanager.v1.RuntimeAdminService` (admins only)."""

    @rpc(admin_only=True)
    def CleanupRuntime(  # noqa: N802
        self, request: pb.CleanupRuntimeRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.CleanupRuntimeResponse:
        result = self._lifecycles.cleanup.handle(
            CleanupRequest(
                game_id=request.game_id,
                op_source=caller.op_source,
                force=request.force,
                source_ref=request.source_ref,
            )
        )
        return pb.CleanupRuntimeResponse(runtime=_record_of(result))

    @rpc(admin_only=True)
    def ListOperations(  # noqa: N802
        self, request: pb.ListOperationsRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.ListOperationsResponse:
        filters = OperationFilter(
            game_id=request.game_id or None,
            op_kind=convert.enum_from_pb(convert.OP_KIND_FROM_PB, request.op_kind, "op_kind"),
            op_source=convert.enum_from_pb(
                convert.OP_SOURCE_FROM_PB, request.op_source, "op_source"
            ),
            outcome=convert.enum_from_pb(convert.OUTCOME_FROM_PB, request.outcome, "outcome"),
            since=convert.timestamp_from_pb(request, "since"),
            until=convert.timestamp_from_pb(request, "until"),
        )
        page = self._lifecycles.queries.list_operations(
            filters, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListOperationsResponse(
            operations=[convert.operation_to_pb(entry) for entry in page.items],
            next_page_token=page.next_page_token,
        )

    @rpc(admin_only=True)
    def Reconcile(  # noqa: N802
        self, request: pb.ReconcileRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.ReconcileResponse:
        report = self._lifecycles.reconciler.run_pass(dry_run=request.dry_run)
        return convert_results.reconcile_report_to_pb(report)

    @rpc(admin_only=True)
    def ExplainRuntime(  # noqa: N802
        self, request: pb.ExplainRuntimeRequest, context: grpc.ServicerContext, caller: Principal
    ) -> pb.ExplainRuntimeResponse:
        explanation = self._lifecycles.explainer.explain(
            request.game_id, operations=request.operations_limit
        )
        return convert.explanation_to_pb(explanation)
