"""A typed Python client of rtmanager, for Game Master and tools.

Every call returns domain objects (`RuntimeRecord`, `OperationEntry`,
`RuntimeExplanation`) and raises one exception type per stable error code,
so callers branch with `except NotFoundError:` instead of parsing messages::

    with RuntimeManagerClient("127.0.0.1:50051", token=GM_TOKEN) as client:
        try:
            record = client.restart_runtime("game-42", source_ref="req-17")
        except ConflictError as error:
            if error.retryable: ...   # another operation holds the game
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import grpc

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api import convert
from rtmanager.api.errors import ERROR_DOMAIN, error_info_of
from rtmanager.domain.errors import ErrorCode, RuntimeManagerError
from rtmanager.domain.explanation import RuntimeExplanation
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import Page, RuntimeEvent

T = TypeVar("T")


class RuntimeManagerClientError(Exception):
    """A failed call. `code` is the stable error code when the server sent one."""

    error_code: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        status: grpc.StatusCode,
        code: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or self.error_code
        self.metadata = dict(metadata or {})

    @property
    def retryable(self) -> bool:
        """True when retrying the same call later may succeed."""
        return self.status in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)


class InvalidRequestError(RuntimeManagerClientError):
    """`invalid_request`: malformed input."""

    error_code = ErrorCode.INVALID_REQUEST


class NotFoundError(RuntimeManagerClientError):
    """`not_found`: no runtime record for the game."""

    error_code = ErrorCode.NOT_FOUND


class ConflictError(RuntimeManagerClientError):
    """`conflict`: busy game (retryable), lost race, or a state that forbids it."""

    error_code = ErrorCode.CONFLICT


class SemverPatchOnlyError(RuntimeManagerClientError):
    """`semver_patch_only`: the patch target is not a same-major.minor patch."""

    error_code = ErrorCode.SEMVER_PATCH_ONLY


class ImageNotAllowedError(RuntimeManagerClientError):
    """`image_not_allowed`: the image is outside the allowlist."""

    error_code = ErrorCode.IMAGE_NOT_ALLOWED


class ImagePullFailedError(RuntimeManagerClientError):
    """`image_pull_failed`: the image is absent and could not be pulled."""

    error_code = ErrorCode.IMAGE_PULL_FAILED


class ContainerStartFailedError(RuntimeManagerClientError):
    """`container_start_failed`: the engine did not come up; the message has its log tail."""

    error_code = ErrorCode.CONTAINER_START_FAILED


class ServiceUnavailableError(RuntimeManagerClientError):
    """`service_unavailable` (or no answer at all): try again later."""

    error_code = ErrorCode.SERVICE_UNAVAILABLE


class InternalServerError(RuntimeManagerClientError):
    """`internal`: a bug in the server."""

    error_code = ErrorCode.INTERNAL


class UnexpectedResponseError(InternalServerError):
    """The server's reply could not be read (a bug, or a server newer than this client)."""


class UnauthenticatedError(RuntimeManagerClientError):
    """The call carried no valid token."""

    error_code = "unauthenticated"


class PermissionDeniedError(RuntimeManagerClientError):
    """The caller's role may not make this call."""

    error_code = "permission_denied"


class CursorExpiredError(RuntimeManagerClientError):
    """A watch cursor older than retention: resync with a snapshot."""

    error_code = "cursor_expired"


class WatchEndedError(RuntimeManagerClientError):
    """A watch was ended by the server (too slow, too many watchers, shutting down).

    `metadata["cursor"]`, when present, is where to resume.
    """

    error_code = "too_slow"


class UnimplementedError(RuntimeManagerClientError):
    """The server does not implement this call."""

    error_code = "unimplemented"


_BY_REASON: dict[str, type[RuntimeManagerClientError]] = {
    cls.error_code: cls
    for cls in (
        InvalidRequestError,
        NotFoundError,
        ConflictError,
        SemverPatchOnlyError,
        ImageNotAllowedError,
        ImagePullFailedError,
        ContainerStartFailedError,
        ServiceUnavailableError,
        InternalServerError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        CursorExpiredError,
        WatchEndedError,
    )
}
_BY_REASON["too_many_watchers"] = WatchEndedError
_BY_REASON["unavailable"] = ServiceUnavailableError
_BY_STATUS: dict[grpc.StatusCode, type[RuntimeManagerClientError]] = {
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
}


def error_from_rpc(error: grpc.RpcError) -> RuntimeManagerClientError:
    """The typed exception for a failed call."""
    status: grpc.StatusCode = error.code()
    message: str = error.details() or status.name
    info = error_info_of(error)
    if info is not None and info.domain == ERROR_DOMAIN:
        cls = _BY_REASON.get(info.reason.lower(), RuntimeManagerClientError)
        return cls(message, status=status, code=info.reason.lower(), metadata=dict(info.metadata))
    return _BY_STATUS.get(status, RuntimeManagerClientError)(message, status=status)


@dataclass(frozen=True)
class ClientCredentials:
    """TLS material of the client; all optional (`root_certificates` None = system roots)."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None


class RuntimeManagerClient:
    """Calls both rtmanager services. Thread-safe; reuse one per process."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientCredentials | None = None,
        timeout: float = 60.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        if channel is None:
            options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
            if tls is None:
                channel = grpc.insecure_channel(target, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=tls.root_certificates,
                    private_key=tls.private_key,
                    certificate_chain=tls.certificate_chain,
                )
                channel = grpc.secure_channel(target, credentials, options=options)
        self._channel = channel
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._runtime = pb_grpc.RuntimeServiceStub(channel)
        self._admin = pb_grpc.RuntimeAdminServiceStub(channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(
        self, method: Any, request: Any, timeout: float | None, decode: Callable[[Any], T]
    ) -> T:
        """Make one unary call and decode its reply; every failure is a typed error."""
        try:
            reply = method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        try:
            return decode(reply)
        except RuntimeManagerError as error:
            raise UnexpectedResponseError(
                f"unexpected response from the server: {error.message}",
                status=grpc.StatusCode.INTERNAL,
            ) from None

    def start_runtime(
        self, game_id: str, image_ref: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        """Start (or idempotently confirm) the engine of a game."""
        request = pb.StartRuntimeRequest(
            game_id=game_id, image_ref=image_ref, source_ref=source_ref
        )
        return self._call(self._runtime.StartRuntime, request, timeout, _runtime_of)

    def stop_runtime(
        self,
        game_id: str,
        *,
        reason: StopReason = StopReason.ADMIN_REQUEST,
        source_ref: str = "",
        timeout: float | None = None,
    ) -> RuntimeRecord:
        """Stop the engine of a game gracefully."""
        request = pb.StopRuntimeRequest(
            game_id=game_id, reason=convert.STOP_REASON_TO_PB[reason], source_ref=source_ref
        )
        return self._call(self._runtime.StopRuntime, request, timeout, _runtime_of)

    def restart_runtime(
        self, game_id: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        """Recreate the engine with its current image."""
        request = pb.RestartRuntimeRequest(game_id=game_id, source_ref=source_ref)
        return self._call(self._runtime.RestartRuntime, request, timeout, _runtime_of)

    def patch_runtime(
        self, game_id: str, image_ref: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        """Recreate the engine with a same-major.minor patch image."""
        request = pb.PatchRuntimeRequest(
            game_id=game_id, image_ref=image_ref, source_ref=source_ref
        )
        return self._call(self._runtime.PatchRuntime, request, timeout, _runtime_of)

    def get_runtime(self, game_id: str, *, timeout: float | None = None) -> RuntimeRecord:
        """The runtime record of a game."""
        request = pb.GetRuntimeRequest(game_id=game_id)
        return self._call(self._runtime.GetRuntime, request, timeout, _runtime_of)

    def list_runtimes(
        self,
        *,
        status: RuntimeStatus | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> Page[RuntimeRecord]:
        """One page of runtime records, ordered by game id."""
        request = pb.ListRuntimesRequest(
            status=convert.STATUS_TO_PB[status] if status else pb.RUNTIME_STATUS_UNSPECIFIED,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(
            self._runtime.ListRuntimes,
            request,
            timeout,
            lambda reply: Page(
                [convert.record_from_pb(record) for record in reply.runtimes],
                reply.next_page_token,
            ),
        )

    def iter_runtimes(
        self, *, status: RuntimeStatus | None = None, page_size: int = 500, page_token: str = ""
    ) -> Iterator[RuntimeRecord]:
        """Every runtime record (from `page_token` on), following page tokens to the end."""
        return _every_item(
            lambda token: self.list_runtimes(status=status, page_size=page_size, page_token=token),
            page_token,
        )

    def cleanup_runtime(
        self,
        game_id: str,
        *,
        force: bool = False,
        source_ref: str = "",
        timeout: float | None = None,
    ) -> RuntimeRecord:
        """Remove a stopped runtime's container (admin); `force` stops it first."""
        request = pb.CleanupRuntimeRequest(game_id=game_id, force=force, source_ref=source_ref)
        return self._call(self._admin.CleanupRuntime, request, timeout, _runtime_of)

    def list_operations(
        self,
        *,
        game_id: str = "",
        op_kind: OpKind | None = None,
        op_source: OpSource | None = None,
        outcome: Outcome | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> Page[OperationEntry]:
        """One page of the operation log, newest first (admin)."""
        request = pb.ListOperationsRequest(
            game_id=game_id,
            op_kind=convert.OP_KIND_TO_PB[op_kind] if op_kind else pb.OP_KIND_UNSPECIFIED,
            op_source=(
                convert.OP_SOURCE_TO_PB[op_source] if op_source else pb.OP_SOURCE_UNSPECIFIED
            ),
            outcome=convert.OUTCOME_TO_PB[outcome] if outcome else pb.OUTCOME_UNSPECIFIED,
            since=convert.timestamp_to_pb(since),
            until=convert.timestamp_to_pb(until),
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(
            self._admin.ListOperations,
            request,
            timeout,
            lambda reply: Page(
                [convert.operation_from_pb(entry) for entry in reply.operations],
                reply.next_page_token,
            ),
        )

    def iter_operations(self, **filters: Any) -> Iterator[OperationEntry]:
        """Every matching operation-log entry, newest first, following page tokens."""
        return _every_item(
            lambda token: self.list_operations(page_size=500, page_token=token, **filters)
        )

    def reconcile(
        self, *, dry_run: bool = False, timeout: float | None = None
    ) -> pb.ReconcileResponse:
        """Run a reconciliation pass now (admin); with `dry_run` only plan it."""
        request = pb.ReconcileRequest(dry_run=dry_run)
        return self._call(self._admin.Reconcile, request, timeout, _as_reconcile_response)

    def explain_runtime(
        self, game_id: str, *, operations: int = 0, timeout: float | None = None
    ) -> RuntimeExplanation:
        """What is known about a game now (admin): its record, its container as Docker
        reports it, its newest `operations` log entries (0: the server's default, 20),
        the Lobby jobs for it not answered yet and who holds its lease.

        `NotFoundError` only when none of these exists (and the server's scan of the
        job streams was complete).
        """
        request = pb.ExplainRuntimeRequest(game_id=game_id, operations_limit=operations)
        return self._call(self._admin.ExplainRuntime, request, timeout, convert.explanation_from_pb)

    def watch_runtimes(
        self,
        request: pb.WatchRuntimesRequest | None = None,
        *,
        game_ids: Iterable[str] = (),
        statuses: Iterable[RuntimeStatus] = (),
        since: str = "",
        initial_snapshot: bool = False,
        timeout: float | None = None,
    ) -> Iterator[pb.WatchRuntimesResponse]:
        """Stream runtime changes (no deadline unless `timeout`); failures raise typed errors.

        The filters are given either as a `request` or as keywords (see
        `watch_request`). Keep the last `cursor` seen (events,
        SnapshotComplete, bookmarks) and pass it as `since` to resume after
        a disconnect without loss or repetition. `CursorExpiredError` means
        resync with `initial_snapshot`.

        `runtime_event(message.event)` is an event's typed form. The stop and
        start of a restart or patch (and a forced cleanup's stop) name that
        operation (`parent_op_kind`, `parent_operation_id`; `inner_step` is
        True), whose own event (`operation_id == parent_operation_id`) comes
        after them with the outcome of the whole operation: a stop with a
        parent is not the end of a game.
        """
        if request is None:
            request = watch_request(
                game_ids=game_ids,
                statuses=statuses,
                since=since,
                initial_snapshot=initial_snapshot,
            )
        try:
            yield from self._runtime.WatchRuntimes(
                request, timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None


def runtime_event(message: pb.RuntimeEvent) -> RuntimeEvent:
    """The typed form of a watched event (`WatchRuntimesResponse.event`).

    Raises `InvalidRequest` for an event this client cannot read (a value
    from a newer server, say).
    """
    return convert.event_from_pb(message)


def watch_request(
    *,
    game_ids: Iterable[str] = (),
    statuses: Iterable[RuntimeStatus] = (),
    since: str = "",
    initial_snapshot: bool = False,
) -> pb.WatchRuntimesRequest:
    """A `WatchRuntimesRequest`: only these games and statuses (none: all), resuming after
    `since`, with the current records first when `initial_snapshot`."""
    return pb.WatchRuntimesRequest(
        game_ids=list(game_ids),
        statuses=[convert.STATUS_TO_PB[status] for status in statuses],
        since=since,
        initial_snapshot=initial_snapshot,
    )


def _runtime_of(reply: Any) -> RuntimeRecord:
    """The record every lifecycle reply and `GetRuntimeResponse` carry in `runtime`."""
    return convert.record_from_pb(reply.runtime)


def _as_reconcile_response(reply: pb.ReconcileResponse) -> pb.ReconcileResponse:
    return reply


def _every_item(page_of: Callable[[str], Page[T]], page_token: str = "") -> Iterator[T]:
    """The items of every page from `page_token` on, fetching each page when reached."""
    token = page_token
    while True:
        page = page_of(token)
        yield from page.items
        token = page.next_page_token
        if not token:
            return
