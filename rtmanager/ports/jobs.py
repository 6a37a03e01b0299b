"""The Lobby job streams' port: reading, answering and handing over the jobs of
the start and stop streams."""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Protocol

from rtmanager.domain.jobs import JobKind, LobbyJob, PendingJob


@dataclass(frozen=True)
class JobEntry:
    """One entry of a Lobby job stream, delivered to this consumer.

    `fields` is empty when the entry was deleted or trimmed from its stream
    while still pending. `deliveries` counts how often Redis has handed the
    entry to a consumer, this delivery included.
    """

    job: LobbyJob
    fields: Mapping[bytes, bytes]
    deliveries: int

    @property
    def stream(self) -> str:
        """The job stream the entry belongs to."""
        return self.job.stream

    @property
    def entry_id(self) -> str:
        """The entry's id in its stream."""
        return self.job.entry_id


class AnswerOutcome(StrEnum):
    """What became of an answer handed to `JobStreams.answer`."""

    # Published and the entry acknowledged, in one atomic step.
    ANSWERED = "answered"
    # The job had been answered before: acknowledged, nothing published.
    ALREADY_ANSWERED = "already_answered"
    # The entry is no longer pending for this consumer (another consumer
    # took it over, or it was acknowledged): nothing was done; whoever
    # holds it now answers it.
    NOT_OURS = "not_ours"


@dataclass(frozen=True)
class PendingJobs:
    """A game's unanswered Lobby jobs in Lobby's order, from a bounded scan.

    `truncated` says the scan stopped at its bound: more of the game's jobs
    may wait behind the entries it looked at.
    """

    jobs: Sequence[PendingJob]
    truncated: bool = False


class JobStreams(Protocol):
    """Lobby's job streams as one consumer of the consumer group sees them (SPEC §4).

    The consumer is named (`RTMANAGER_INSTANCE_ID`); its *presence* (a key
    with a TTL, renewed by `keep_name`) tells other consumers it is alive.
    Entries pending on a consumer without presence are *abandoned* and may
    be claimed by another consumer once idle long enough; entries of a live
    consumer are never taken from it. Every job gets exactly one answer (a
    result or a dead letter): `answer` publishes it and acknowledges the
    entry atomically, only while the entry is pending for this consumer,
    and never a second time for the same job.

    Every method raises `ServiceUnavailable` when Redis is unreachable or
    times out. A missing stream or consumer group is recreated by the
    adapter, never reported.
    """

    def ensure_groups(self) -> None:
        """Create the consumer group on both job streams unless it exists."""
        ...

    def claim_name(self) -> bool:
        """Take this consumer's presence; False while another live process holds the name."""
        ...

    def keep_name(self) -> bool:
        """Renew this consumer's presence; False when it was lost (call `claim_name`)."""
        ...

    def release_name(self) -> None:
        """Give up this consumer's presence (on shutdown), if still ours."""
        ...

    def redeliver_own(self, kind: JobKind, after: str, count: int) -> builtins.list[JobEntry]:
        """Up to `count` entries of the `kind` stream pending on this consumer, ids > `after`.

        Used on start-up to take back what this consumer held when it last
        ran; each counts as a delivery again (a crash on an entry counts).
        Entries deleted from the stream meanwhile are dead-lettered instead
        of returned; an empty list means nothing more is pending.
        """
        ...

    def read_new(self, count: int, block: timedelta) -> builtins.list[JobEntry]:
        """Up to `count` new entries of each stream, waiting up to `block` when none.

        Each returned entry is pending on this consumer (its first delivery).
        """
        ...

    def claim_abandoned(self, min_idle: timedelta, count: int) -> builtins.list[JobEntry]:
        """Take up to `count` entries idle for `min_idle` on consumers without presence."""
        ...

    def answer(
        self, entry: JobEntry, fields: Mapping[str, str], *, dead_letter: bool = False
    ) -> AnswerOutcome:
        """Publish `fields` to the results (or dead-letter) stream and acknowledge `entry`.

        Atomic: either both happen or neither (see `AnswerOutcome`). The
        target stream is trimmed to its configured length.
        """
        ...

    def remove_idle_consumers(self, min_idle: timedelta) -> builtins.list[str]:
        """Delete group consumers idle for `min_idle`, without presence or pending entries."""
        ...

    def lag(self) -> dict[str, int]:
        """Entries of each job stream the group has not read yet."""
        ...

    def pending_jobs(self, game_id: str, scan: int) -> PendingJobs:
        """The jobs of `game_id` in both job streams that the group has not acknowledged.

        Both those delivered to a consumer and pending there and those not
        delivered yet (after the group's last-delivered id), in Lobby's
        order. Bounded: in each stream at most `scan` pending entries and
        `scan` undelivered ones are looked at, oldest first (`truncated`
        when a bound was reached). An entry deleted from its stream while
        pending is not reported (its game cannot be told). Only reads; works
        for any consumer of the group, and with no group yet (then every
        entry is undelivered).
        """
        ...
