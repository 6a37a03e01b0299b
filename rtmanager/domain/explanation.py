"""What is known about one game at one moment: the answer of `ExplainRuntime`.

The runtime record, its engine container as Docker reports it, its newest
operation-log entries, the Lobby jobs for it that are still unanswered and
who holds its lease: what an operator asks first when a game misbehaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a game's lease, and for how much longer unless renewed.

    `instance_id` is the holder's `RTMANAGER_INSTANCE_ID`; empty when its
    lease token does not name one (a holder older than that format). `ttl`
    is None for a lease without expiry (never one the service takes).
    """

    instance_id: str
    ttl: timedelta | None
