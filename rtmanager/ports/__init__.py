"""The ports: what the lifecycle layer needs from PostgreSQL, Redis and the engine backend.

Each port is a `typing.Protocol` whose docstring is its contract. Adapters in
`rtmanager.adapters` implement them against the real systems; tests exercise
the contracts against those adapters and use fakes for fast unit tests.

Every port method may raise `ServiceUnavailable` when its backing system is
unreachable or times out; other errors are listed per method.

The ports are grouped by concern, and every name is importable from here:

- `storage`: runtime records, the operation log, the outbox of record
  changes and the Lobby job marks, and the unit of work that writes them;
- `feed`: the watch feed of committed changes;
- `leases`: the per-game leases;
- `engine`: the engine backend (Docker or a swarm);
- `jobs`: the Lobby job streams.
"""

from rtmanager.ports.engine import (
    BackendCapabilities,
    BackendMismatch,
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    EngineBackend,
    EngineUser,
    EventStream,
    PullPolicy,
)
from rtmanager.ports.feed import (
    EVERY_EVENT,
    CursorExpired,
    EventFilter,
    FeedClosed,
    RuntimeFeed,
    SubscriberOverflow,
    Subscription,
    TooManyWatchers,
)
from rtmanager.ports.jobs import (
    AnswerOutcome,
    JobEntry,
    JobStreams,
    PendingJobs,
)
from rtmanager.ports.leases import (
    GameLeases,
    Lease,
)
from rtmanager.ports.storage import (
    JobMarkStore,
    OperationFilter,
    OperationLog,
    Page,
    RecordReader,
    RuntimeEvent,
    RuntimeEventLog,
    RuntimeRecordStore,
    StatusChange,
    UnitOfWork,
    UnitOfWorkFactory,
)

__all__ = [
    "EVERY_EVENT",
    "AnswerOutcome",
    "BackendCapabilities",
    "BackendMismatch",
    "ContainerEvent",
    "ContainerInfo",
    "ContainerSpec",
    "CursorExpired",
    "EngineBackend",
    "EngineUser",
    "EventFilter",
    "EventStream",
    "FeedClosed",
    "GameLeases",
    "JobEntry",
    "JobMarkStore",
    "JobStreams",
    "Lease",
    "OperationFilter",
    "OperationLog",
    "Page",
    "PendingJobs",
    "PullPolicy",
    "RecordReader",
    "RuntimeEvent",
    "RuntimeEventLog",
    "RuntimeFeed",
    "RuntimeRecordStore",
    "StatusChange",
    "SubscriberOverflow",
    "Subscription",
    "TooManyWatchers",
    "UnitOfWork",
    "UnitOfWorkFactory",
]
