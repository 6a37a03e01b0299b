"""The wire format of Lobby's jobs and of their answers (SPEC §4, docs/lobby-jobs.md).

A start job carries `game_id` and `image_ref`, a stop job `game_id` and an
optional `reason`; unknown fields are ignored, so Lobby can add fields
without breaking the service. Each job gets exactly one answer: an entry on
the results stream (`result_fields`) or on the dead-letter stream
(`dead_letter_fields`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from rtmanager.domain.errors import Failure
from rtmanager.domain.jobs import JobKind, JobOutcome, LobbyJob
from rtmanager.domain.operation import StopReason
from rtmanager.domain.runtime import RuntimeRecord

_MAX_SHOWN = 64  # characters of a bad field value quoted in a dead-letter reason


class MalformedJob(ValueError):
    """A job entry that cannot be applied as written; it goes to the dead letters."""


@dataclass(frozen=True)
class StartJob:
    """The fields of a start job."""

    game_id: str
    image_ref: str


@dataclass(frozen=True)
class StopJob:
    """The fields of a stop job."""

    game_id: str
    reason: StopReason


def parse_job(kind: JobKind, fields: Mapping[bytes, bytes]) -> StartJob | StopJob:
    """Check a job's fields; raise `MalformedJob` saying what is wrong.

    Only the shape is checked here (fields present, UTF-8, a known stop
    reason); whether the game id or image reference is acceptable is the
    lifecycle's call, answered as an `invalid_request` failure.
    """
    if not fields:
        raise MalformedJob("the entry no longer exists in the stream (deleted or trimmed)")
    game_id = _text_field(fields, "game_id", required=True)
    if kind is JobKind.START:
        return StartJob(game_id=game_id, image_ref=_text_field(fields, "image_ref", required=True))
    reason_text = _text_field(fields, "reason", required=False)
    if not reason_text:
        return StopJob(game_id=game_id, reason=StopReason.LOBBY_REQUEST)
    try:
        reason = StopReason(reason_text)
    except ValueError:
        known = ", ".join(member.value for member in StopReason)
        raise MalformedJob(
            f"unknown reason {_shown(reason_text.encode())}; expected one of {known}"
        ) from None
    return StopJob(game_id=game_id, reason=reason)


def game_of(fields: Mapping[bytes, bytes]) -> str:
    """The job's game id as written (for logs and ordering), "" when absent or unreadable."""
    return fields.get(b"game_id", b"").decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True)
class JobAnswer:
    """What one job's answer says; `dead_letter` answers go to the dead-letter stream."""

    fields: dict[str, str]
    outcome: str
    dead_letter: bool = False

    @property
    def error_code(self) -> str:
        """The answer's error code ("" unless it failed)."""
        return self.fields.get("error_code", "")


def result_answer(
    job: LobbyJob,
    *,
    game_id: str,
    outcome: JobOutcome,
    failure: Failure | None = None,
    record: RuntimeRecord | None = None,
    operation_id: int = 0,
    superseded_by: LobbyJob | None = None,
) -> JobAnswer:
    """A job's entry on the results stream (every field always present, "" when empty)."""
    fields = {
        "job_id": job.entry_id,
        "stream": job.stream,
        "kind": str(job.kind),
        "game_id": game_id,
        "outcome": str(outcome),
        "error_code": str(failure.code) if failure else "",
        "error_message": failure.message if failure else "",
        "superseded_by": superseded_by.entry_id if superseded_by else "",
        "superseded_by_stream": superseded_by.stream if superseded_by else "",
        "operation_id": str(operation_id) if operation_id else "",
        "record": record_json(record),
    }
    return JobAnswer(fields=fields, outcome=str(outcome))


def dead_letter_answer(
    job: LobbyJob, *, reason: str, deliveries: int, fields: Mapping[bytes, bytes]
) -> JobAnswer:
    """A job's entry on the dead-letter stream, with its original fields as JSON."""
    original = {
        key.decode("utf-8", errors="backslashreplace"): value.decode(
            "utf-8", errors="backslashreplace"
        )
        for key, value in fields.items()
    }
    answer = {
        "stream": job.stream,
        "job_id": job.entry_id,
        "reason": reason,
        "deliveries": str(deliveries),
        "fields": json.dumps(original, ensure_ascii=False, separators=(",", ":")),
    }
    return JobAnswer(fields=answer, outcome="dead_letter", dead_letter=True)


def record_json(record: RuntimeRecord | None) -> str:
    """The runtime record as published with a job result ("" when there is none)."""
    if record is None:
        return ""

    def stamp(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return json.dumps(
        {
            "game_id": record.game_id,
            "status": str(record.status),
            "current_container_id": record.current_container_id,
            "current_image_ref": record.current_image_ref,
            "engine_endpoint": record.engine_endpoint,
            "state_path": record.state_path,
            "docker_network": record.docker_network,
            "started_at": stamp(record.started_at),
            "stopped_at": stamp(record.stopped_at),
            "removed_at": stamp(record.removed_at),
            "last_op_at": stamp(record.last_op_at),
            "created_at": stamp(record.created_at),
        },
        separators=(",", ":"),
    )


def _shown(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="backslashreplace")
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def _text_field(fields: Mapping[bytes, bytes], name: str, *, required: bool) -> str:
    """A field's text; "" when absent and optional. Raises `MalformedJob`."""
    raw = fields.get(name.encode())
    if raw is None or raw == b"":
        if required:
            raise MalformedJob(f"missing {name}" if raw is None else f"empty {name}")
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJob(f"{name} {_shown(raw)} is not valid UTF-8") from None
