"""What is known about one game at one moment: the answer of `ExplainRuntime`.

The runtime record, its engine container as Docker reports it, its newest
operation-log entries, the Lobby jobs for it that are still unanswered and
who holds its lease: what an operator asks first when a game misbehaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rtmanager.domain.jobs import PendingJob
from rtmanager.domain.operation import OperationEntry
from rtmanager.domain.runtime import RuntimeRecord


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a game's lease, and for how much longer unless renewed.

    `instance_id` is the holder's `RTMANAGER_INSTANCE_ID`; empty when its
    lease token does not name one (a holder older than that format). `ttl`
    is None for a lease without expiry (never one the service takes).
    """

    instance_id: str
    ttl: timedelta | None


@dataclass(frozen=True)
class ContainerState:
    """A game's engine container as Docker reports it at the moment of asking.

    `status` is Docker's (`created`, `running`, `paused`, `restarting`,
    `exited`, `dead`); `owned` says it is labelled as this deployment's.
    `image_ref` is the reference the engine was started from, `image_id`
    the image it runs. `exit_code` is None until it has exited; `health`
    None without a health check; `restart_count` counts restarts Docker
    made (rtmanager asks for none). `node_id` and `node_hostname` name the
    cluster node it is placed on (empty on a single host).
    """

    id: str
    name: str
    status: str
    running: bool
    owned: bool
    image_ref: str = ""
    image_id: str = ""
    exit_code: int | None = None
    oom_killed: bool = False
    health: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    restart_count: int = 0
    node_id: str = ""
    node_hostname: str = ""


@dataclass(frozen=True)
class RuntimeExplanation:
    """Everything known about one game at one moment (`ExplainRuntime`).

    Each part may be missing on its own: no record (never started, or its
    first start failed), no container ("none" is an answer: removed,
    vanished, or never created), no operations, no pending jobs, nobody
    holding the lease. `operations` are the newest entries, newest first;
    `pending_jobs` are in Lobby's order, and `pending_jobs_truncated` says
    the bounded scan of the job streams may have missed some.
    """

    game_id: str
    record: RuntimeRecord | None = None
    container: ContainerState | None = None
    operations: tuple[OperationEntry, ...] = ()
    pending_jobs: tuple[PendingJob, ...] = ()
    pending_jobs_truncated: bool = False
    lease: LeaseHolder | None = None
