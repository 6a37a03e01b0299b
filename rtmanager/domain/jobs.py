"""Lobby's jobs as the domain sees them: where a job stands in Lobby's order.

Lobby appends start and stop jobs to two Redis streams. Entry ids order
them across both streams (milliseconds, then sequence); for each game the
newest job applied so far is its *watermark* (`JobMark`), kept in
PostgreSQL with the record change the job caused. A job older than its
game's watermark is superseded: Lobby's last word wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from rtmanager.domain.errors import ErrorCode, Failure
from rtmanager.domain.operation import Outcome
from rtmanager.domain.timeutil import require_utc

_MAX_PART = 2**64 - 1


class JobKind(StrEnum):
    """Which job stream a job came from."""

    START = "start"
    STOP = "stop"


class JobOutcome(StrEnum):
    """The `outcome` field of a job's result entry."""

    SUCCESS = "success"
    FAILURE = "failure"
    SUPERSEDED = "superseded"


def parse_entry_id(value: bytes | str) -> tuple[int, int]:
    """A stream entry id (`ms-seq`) as a comparable pair; `ValueError` if malformed."""
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
    ms, sep, seq = text.partition("-")
    if not sep or not (ms + seq).isascii() or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream entry id: {text!r}")
    pair = int(ms), int(seq)
    if max(pair) > _MAX_PART:
        raise ValueError(f"not a stream entry id: {text!r}")
    return pair


@dataclass(frozen=True, order=True)
class JobPosition:
    """A job's place in Lobby's order: entry id, then start before stop on a tie.

    The two streams assign ids independently, so a start and a stop may
    share one id; the start is then taken to come first.
    """

    ms: int
    seq: int
    rank: int

    @classmethod
    def of(cls, kind: JobKind, entry_id: str) -> JobPosition:
        """The position of entry `entry_id` of the `kind` stream."""
        ms, seq = parse_entry_id(entry_id)
        return cls(ms, seq, 0 if kind is JobKind.START else 1)


@dataclass(frozen=True)
class LobbyJob:
    """One Lobby job: the stream it came from and its entry id there."""

    kind: JobKind
    stream: str
    entry_id: str

    @property
    def position(self) -> JobPosition:
        """Where the job stands in Lobby's order."""
        return JobPosition.of(self.kind, self.entry_id)

    def __str__(self) -> str:
        return f"{self.stream}/{self.entry_id}"


@dataclass(frozen=True)
class JobMark:
    """A game's watermark: the newest Lobby job applied to it, and how it ended.

    A failure keeps its code and message, so the job seen again (after a
    crash between applying and answering it) gets the same answer.
    """

    game_id: str
    job: LobbyJob
    outcome: Outcome
    applied_at: datetime
    error_code: ErrorCode | None = None
    error_message: str = ""
    operation_id: int = 0

    def __post_init__(self) -> None:
        require_utc("applied_at", self.applied_at, ValueError)
        if (self.outcome is Outcome.FAILURE) != (self.error_code is not None):
            raise ValueError("a job mark has an error code exactly when its outcome is failure")

    @property
    def failure(self) -> Failure | None:
        """The failure the job ended with, or None when it succeeded."""
        if self.error_code is None:
            return None
        return Failure(self.error_code, self.error_message)

    def settles(self, job: LobbyJob) -> bool:
        """Whether `job` must not be applied: it is this mark's job or older."""
        return job.position <= self.job.position


@dataclass(frozen=True)
class PendingJob:
    """A Lobby job not answered yet, as its stream and the consumer group show it.

    Either delivered to `consumer` (`deliveries` times, the last `idle` ago)
    and not acknowledged, or not delivered to any consumer yet (`consumer`
    empty, `deliveries` 0, `idle` None). `fields` are the entry's fields as
    Lobby wrote them.
    """

    job: LobbyJob
    fields: Mapping[str, str] = field(default_factory=dict)
    consumer: str = ""
    deliveries: int = 0
    idle: timedelta | None = None

    @property
    def delivered(self) -> bool:
        """Whether a consumer has been handed the job (and not acknowledged it)."""
        return bool(self.consumer)

    @property
    def game_id(self) -> str:
        """The game the job is for (its `game_id` field)."""
        return self.fields.get("game_id", "")
