"""The operation log's vocabularies and its append-only row.

The vocabularies are frozen and stored verbatim; they match the SQL CHECK
constraints of `operation_log` (and those of the original service, so the
same tables can be shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.timeutil import require_utc


class OpKind(StrEnum):
    """What an operation did."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    PATCH = "patch"
    CLEANUP_CONTAINER = "cleanup_container"
    RECONCILE_ADOPT = "reconcile_adopt"
    RECONCILE_DISPOSE = "reconcile_dispose"


class StopReason(StrEnum):
    """Why a runtime is being stopped."""

    ADMIN_REQUEST = "admin_request"
    LOBBY_REQUEST = "lobby_request"
    GAME_FINISHED = "game_finished"
    ENGINE_EXITED = "engine_exited"


class OpSource(StrEnum):
    """Where an operation entered the service."""

    LOBBY_STREAM = "lobby_stream"
    GM_REST = "gm_rest"
    ADMIN_REST = "admin_rest"
    AUTO_TTL = "auto_ttl"
    AUTO_RECONCILE = "auto_reconcile"


class Outcome(StrEnum):
    """Whether an operation succeeded."""

    SUCCESS = "success"
    FAILURE = "failure"


# Operations that run other operations as their inner steps (SPEC §3): a
# restart or patch runs an inner stop and an inner start, a forced cleanup an
# inner stop. Only stops and starts are ever inner steps.
COMPOSITE_KINDS = frozenset({OpKind.RESTART, OpKind.PATCH, OpKind.CLEANUP_CONTAINER})
INNER_KINDS = frozenset({OpKind.STOP, OpKind.START})


class InvalidOperationEntry(ValueError):
    """An operation entry breaks an operation-log invariant."""


@dataclass(frozen=True)
class OperationEntry:
    """One append-only row of the operation log.

    `id` is 0 until the log assigns it. Empty strings stand for SQL NULL in
    the optional text columns.

    An inner step of a composite operation names it: `parent_op_kind` and
    `parent_operation_id` (the outer row's id, drawn before the inner steps
    ran, since the outer row is appended after them). Both are unset (None
    and 0) for every other operation.
    """

    game_id: str
    op_kind: OpKind
    op_source: OpSource
    outcome: Outcome
    started_at: datetime
    finished_at: datetime | None = None
    source_ref: str = ""
    image_ref: str = ""
    container_id: str = ""
    error_code: str = ""
    error_message: str = ""
    parent_op_kind: OpKind | None = None
    parent_operation_id: int = 0
    id: int = 0

    def validate(self) -> None:
        """Raise `InvalidOperationEntry` unless every invariant holds."""
        if not self.game_id.strip():
            raise InvalidOperationEntry("game id must not be empty")
        for name, value, vocabulary in (
            ("op kind", self.op_kind, OpKind),
            ("op source", self.op_source, OpSource),
        ):
            if value not in vocabulary.__members__.values():
                raise InvalidOperationEntry(f"{name} {value!r} is unsupported")
        try:
            outcome = Outcome(self.outcome)
        except ValueError:
            raise InvalidOperationEntry(f"outcome {self.outcome!r} is unsupported") from None
        require_utc("started at", self.started_at, InvalidOperationEntry)
        if self.finished_at is not None:
            require_utc("finished at", self.finished_at, InvalidOperationEntry)
            if self.finished_at < self.started_at:
                raise InvalidOperationEntry("finished at must not be before started at")
        if outcome is Outcome.FAILURE:
            if not self.error_code.strip():
                raise InvalidOperationEntry("error code must not be empty for failure entries")
            if self.error_code not in ErrorCode.__members__.values():
                raise InvalidOperationEntry(f"error code {self.error_code!r} is unsupported")
        elif self.error_code:
            raise InvalidOperationEntry("error code must be empty for success entries")
        self._validate_parent()

    def _validate_parent(self) -> None:
        if self.parent_op_kind is None:
            if self.parent_operation_id != 0:
                raise InvalidOperationEntry("a parent operation id needs a parent op kind")
            return
        if self.parent_op_kind not in COMPOSITE_KINDS:
            raise InvalidOperationEntry(
                f"parent op kind {self.parent_op_kind!r} is not a composite operation"
            )
        if self.op_kind not in INNER_KINDS:
            raise InvalidOperationEntry(f"a {self.op_kind} operation is never an inner step")
        if isinstance(self.parent_operation_id, bool) or self.parent_operation_id <= 0:
            raise InvalidOperationEntry("an inner step needs its parent operation's id")
        if self.parent_operation_id == self.id:
            raise InvalidOperationEntry("an operation cannot be its own parent")
