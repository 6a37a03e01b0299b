"""Failures to gRPC statuses: the one place the mapping of SPEC §2 lives.

Every error leaves the server as a `google.rpc.Status` carrying an
`ErrorInfo` whose reason is the stable code and whose domain is
`rtmanager.galaxy`, so a client can branch on the reason without parsing
messages.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from rtmanager.domain.errors import ErrorCode, Failure

ERROR_DOMAIN = "rtmanager.galaxy"
# ErrorInfo reason of a call refused because the server runs its limit of
# concurrent calls (RESOURCE_EXHAUSTED); not an operation outcome, so not
# one of the stable error codes of the operation log.
OVERLOADED_REASON = "too_many_requests"

_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: code_pb2.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: code_pb2.NOT_FOUND,
    ErrorCode.CONFLICT: code_pb2.FAILED_PRECONDITION,
    ErrorCode.SEMVER_PATCH_ONLY: code_pb2.FAILED_PRECONDITION,
    ErrorCode.IMAGE_NOT_ALLOWED: code_pb2.PERMISSION_DENIED,
    ErrorCode.IMAGE_PULL_FAILED: code_pb2.FAILED_PRECONDITION,
    ErrorCode.CONTAINER_START_FAILED: code_pb2.FAILED_PRECONDITION,
    ErrorCode.SERVICE_UNAVAILABLE: code_pb2.UNAVAILABLE,
    ErrorCode.INTERNAL: code_pb2.INTERNAL,
}


def status_code_for(failure: Failure) -> int:
    """Return the google.rpc code for a failure (a conflict race is ABORTED)."""
    if failure.code is ErrorCode.CONFLICT and failure.race:
        return int(code_pb2.ABORTED)
    return int(_STATUS[failure.code])


def to_rpc_status(failure: Failure, *, game_id: str = "") -> grpc.Status:
    """Build the rich gRPC status for a failure."""
    metadata = dict(failure.metadata)
    if game_id:
        metadata.setdefault("game_id", game_id)
    return rich_status(status_code_for(failure), str(failure.code), failure.message, metadata)


def overloaded_status(message: str, limit: int) -> grpc.Status:
    """RESOURCE_EXHAUSTED for a call refused by the concurrent-call bound."""
    return rich_status(
        code_pb2.RESOURCE_EXHAUSTED, OVERLOADED_REASON, message, {"limit": str(limit)}
    )


def rich_status(code: int, reason: str, message: str, metadata: Mapping[str, str]) -> grpc.Status:
    """A `google.rpc.Status` with one ErrorInfo detail, as a grpc.Status."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


def error_info_of(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Return the ErrorInfo detail carried by a client-side RpcError, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
