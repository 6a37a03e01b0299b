"""A typed Python client of rtmanager, for Game Master and tools.

Every call returns domain objects (`RuntimeRecord`, `OperationEntry`) and
raises one exception type per stable error code, so callers branch with
`except NotFoundError:` instead of parsing messages::

    with RuntimeManagerClient("127.0.0.1:50051", token=GM_TOKEN) as client:
        try:
            record = client.restart_runtime("game-42", source_ref="req-17")
        except ConflictError as error:
            if error.retryable: ...   # another operation holds the game
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Self

import grpc

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api import convert
from rtmanager.api.errors import ERROR_DOMAIN, error_info_of
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import Page, RuntimeEvent


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

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def start_runtime(
        self, game_id: str, image_ref: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        """Start (or idempotently confirm) the engine of a game."""
        request = pb.StartRuntimeRequest(
            game_id=game_id, image_ref=image_ref, source_ref=source_ref
        )
        reply = self._call(self._runtime.StartRuntime, request, timeout)
        return convert.record_from_pb(reply.runtime)

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
        reply = self._call(self._runtime.StopRuntime, request, timeout)
        return convert.record_from_pb(reply.runtime)

    def restart_runtime(
        self, game_id: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        """Recreate the engine with its current image."""
        request = pb.RestartRuntimeRequest(game_id=game_id, source_ref=source_ref)
        reply = self._call(self._runtime.RestartRuntime, request, timeout)
        return convert.record_from_pb(reply.runtime)

    def patch_runtime(
        self, game_id: str, image_ref: str, *, source_ref: str = "", timeout: float | None = None
    ) -> RuntimeRecord:
        """Recreate the engine with a same-major.minor patch image."""
        request = pb.PatchRuntimeRequest(
            game_id=game_id, image_ref=image_ref, source_ref=source_ref
        )
        reply = self._call(self._runtime.PatchRuntime, request, timeout)
        return convert.record_from_pb(reply.runtime)

    def get_runtime(self, game_id: str, *, timeout: float | None = None) -> RuntimeRecord:
        """The runtime record of a game."""
        reply = self._call(self._runtime.GetRuntime, pb.GetRuntimeRequest(game_id=game_id), timeout)
        return convert.record_from_pb(reply.runtime)

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
        reply = self._call(self._runtime.ListRuntimes, request, timeout)
        return Page(
            [convert.record_from_pb(record) for record in reply.runtimes], reply.next_page_token
        )

    def iter_runtimes(self, *, status: RuntimeStatus | None = None) -> Iterator[RuntimeRecord]:
        """Every runtime record, following page tokens."""
        token = ""
        while True:
            page = self.list_runtimes(status=status, page_size=500, page_token=token)
            yield from page.items
            token = page.next_page_token
            if not token:
                return

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
        reply = self._call(self._admin.CleanupRuntime, request, timeout)
        return convert.record_from_pb(reply.runtime)

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
        reply = self._call(self._admin.ListOperations, request, timeout)
        return Page(
            [convert.operation_from_pb(entry) for entry in reply.operations],
            reply.next_page_token,
        )

    def iter_operations(self, **filters: Any) -> Iterator[OperationEntry]:
        """Every matching operation-log entry, newest first, following page tokens."""
        token = ""
        while True:
            page = self.list_operations(page_size=500, page_token=token, **filters)
            yield from page.items
            token = page.next_page_token
            if not token:
                return

    def reconcile(
        self, *, dry_run: bool = False, timeout: float | None = None
    ) -> pb.ReconcileResponse:
        """Run a reconciliation pass now (admin); with `dry_run` only plan it."""
        reply: pb.ReconcileResponse = self._call(
            self._admin.Reconcile, pb.ReconcileRequest(dry_run=dry_run), timeout
        )
        return reply

    def watch_runtimes(
        self, request: pb.WatchRuntimesRequest, *, timeout: float | None = None
    ) -> Iterator[pb.WatchRuntimesResponse]:
        """Stream runtime changes (no deadline unless `timeout`); failures raise typed errors.

        Keep the last `cursor` seen (events, SnapshotComplete, bookmarks) and
        pass it as `since` to resume after a disconnect without loss or
        repetition. `CursorExpiredError` means resync with `initial_snapshot`.

        `runtime_event(message.event)` is an event's typed form. The stop and
        start of a restart or patch (and a forced cleanup's stop) name that
        operation (`parent_op_kind`, `parent_operation_id`; `inner_step` is
        True), whose own event (`operation_id == parent_operation_id`) comes
        after them with the outcome of the whole operation: a stop with a
        parent is not the end of a game.
        """
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
