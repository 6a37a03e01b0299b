"""The stable error-code vocabulary and the exceptions that carry it.

Every failure the service reports carries exactly one `ErrorCode`: in the
operation log, in gRPC error details and in metric labels. Lifecycle services
return failures as results; ports and adapters raise `RuntimeManagerError`
subclasses, which the lifecycle layer turns into results and the API layer
maps to gRPC statuses in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable failure codes; frozen, stored verbatim."""

    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    SEMVER_PATCH_ONLY = "semver_patch_only"
    IMAGE_NOT_ALLOWED = "image_not_allowed"
    IMAGE_PULL_FAILED = "image_pull_failed"
    CONTAINER_START_FAILED = "container_start_failed"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Failure:
    """A business failure: a stable code, an operator-readable message.

    `race` marks a `conflict` caused by concurrency (a busy lease or a
    stale compare-and-swap) rather than by the runtime's state; the API
    reports the former as ABORTED (retry may succeed) and the latter as
    FAILED_PRECONDITION.
    """

    code: ErrorCode
    message: str
    race: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def transient(self) -> bool:
        """Whether retrying may succeed: a dependency outage or a lost race."""
        return self.code is ErrorCode.SERVICE_UNAVAILABLE or (
            self.code is ErrorCode.CONFLICT and self.race
        )


class RuntimeManagerError(Exception):
    """Base of every expected failure raised by ports and domain helpers."""

    code: ErrorCode = ErrorCode.INTERNAL
    race: bool = False

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: Mapping[str, str] = dict(metadata or {})

    def to_failure(self) -> Failure:
        """Return this error as a `Failure` result."""
        return Failure(self.code, self.message, race=self.race, metadata=self.metadata)

    @staticmethod
    def from_failure(failure: Failure, *, prefix: str = "") -> RuntimeManagerError:
        """Return an error that carries `failure` (optionally with a message prefix)."""
        error = RuntimeManagerError(f"{prefix}{failure.message}", metadata=failure.metadata)
        error.code = failure.code
        error.race = failure.race
        return error


class InvalidRequest(RuntimeManagerError):
    """Malformed input: bad game id, image reference or enum value."""

    code = ErrorCode.INVALID_REQUEST


class NotFound(RuntimeManagerError):
    """No runtime record exists for the game."""

    code = ErrorCode.NOT_FOUND


class Conflict(RuntimeManagerError):
    """The runtime's state forbids the operation."""

    code = ErrorCode.CONFLICT


class ConcurrentModification(Conflict):
    """Another operation holds the game's lease or won a CAS race."""

    race = True


class SemverPatchOnly(RuntimeManagerError):
    """A patch target that is not a same-major.minor, other-patch version."""

    code = ErrorCode.SEMVER_PATCH_ONLY


class ImageNotAllowed(RuntimeManagerError):
    """The image reference is outside the configured allowlist."""

    code = ErrorCode.IMAGE_NOT_ALLOWED


class ImagePullFailed(RuntimeManagerError):
    """The image is not present and could not be pulled."""

    code = ErrorCode.IMAGE_PULL_FAILED


class ContainerStartFailed(RuntimeManagerError):
    """The container did not reach running (or healthy) in time."""

    code = ErrorCode.CONTAINER_START_FAILED


class EngineNetworkGone(ContainerStartFailed):
    """The engine network a backend remembered was removed behind its back.

    The backend has forgotten it; ensuring the network again and retrying
    can succeed. Left unhandled it is a start failure.
    """


class ServiceUnavailable(RuntimeManagerError):
    """Docker, PostgreSQL or Redis is unreachable or timing out."""

    code = ErrorCode.SERVICE_UNAVAILABLE


class InternalError(RuntimeManagerError):
    """A bug: an invariant the code relies on does not hold."""

    code = ErrorCode.INTERNAL
