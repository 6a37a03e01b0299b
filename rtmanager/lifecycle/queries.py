"""Read-only use cases: one runtime, a page of runtimes, a page of the audit log, and
everything known about one game (`RuntimeExplainer`); the first two also as
coroutines for the server's event loop (`RuntimeReads`)."""

from __future__ import annotations

from datetime import timedelta

from rtmanager.deadlines import bounded
from rtmanager.domain.errors import InvalidRequest, NotFound
from rtmanager.domain.explanation import ContainerState, RuntimeExplanation
from rtmanager.domain.ids import container_name, parse_game_id
from rtmanager.domain.operation import OperationEntry
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.recorder import load_record
from rtmanager.ports import (
    ContainerInfo,
    EngineBackend,
    GameLeases,
    JobStreams,
    OperationFilter,
    Page,
    RecordReader,
    UnitOfWorkFactory,
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# ExplainRuntime: how many of the game's newest operation-log entries by
# default and at most, and how many entries of each kind (pending,
# undelivered) of each job stream are looked at for the game's jobs.
DEFAULT_EXPLAIN_OPERATIONS = 20
MAX_EXPLAIN_OPERATIONS = 100
PENDING_JOBS_SCAN = 1000


def effective_page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is capped; negative is invalid."""
    if requested < 0:
        raise InvalidRequest(
            f"page_size {requested} must not be negative", metadata={"field": "page_size"}
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class RuntimeQueries:
    """Reads runtime records and the operation log through a unit of work."""

    def __init__(
        self, units_of_work: UnitOfWorkFactory, *, timeout: timedelta = timedelta(seconds=10)
    ) -> None:
        self._units_of_work = units_of_work
        self._timeout = timeout

    def get_runtime(self, game_id: str) -> RuntimeRecord:
        """Return the game's record; `InvalidRequest` for a bad id, `NotFound` if none."""
        parse_game_id(game_id)
        return self._units_of_work.read(
            lambda uow: uow.records.get(game_id), timeout=bounded(self._timeout)
        )

    def list_runtimes(
        self,
        *,
        status: RuntimeStatus | None,
        page_size: int,
        page_token: str,
    ) -> Page[RuntimeRecord]:
        """Return one page of records ordered by game id, optionally of one status."""
        size = effective_page_size(page_size)
        return self._units_of_work.read(
            lambda uow: uow.records.list(status=status, page_size=size, page_token=page_token),
            timeout=bounded(self._timeout),
        )

    def list_operations(
        self,
        filters: OperationFilter,
        *,
        page_size: int,
        page_token: str,
    ) -> Page[OperationEntry]:
        """Return one page of the operation log, newest first."""
        if filters.game_id is not None:
            parse_game_id(filters.game_id)
        if filters.since and filters.until and filters.until < filters.since:
            raise InvalidRequest("until must not be before since", metadata={"field": "until"})
        size = effective_page_size(page_size)
        return self._units_of_work.read(
            lambda uow: uow.operations.list(filters, page_size=size, page_token=page_token),
            timeout=bounded(self._timeout),
        )


class RuntimeReads:
    """`GetRuntime` and `ListRuntimes` as coroutines, for the server's event loop.

    The same checks and bounds as `RuntimeQueries.get_runtime` and
    `list_runtimes` (a malformed game id or page size is refused before
    any I/O; the statement is bounded by the caller's deadline), read
    through a `RecordReader` that awaits PostgreSQL without a thread.
    """

    def __init__(self, reader: RecordReader, *, timeout: timedelta = timedelta(seconds=10)) -> None:
        self._reader = reader
        self._timeout = timeout

    async def get_runtime(self, game_id: str) -> RuntimeRecord:
        """Return the game's record; `InvalidRequest` for a bad id, `NotFound` if none."""
        parse_game_id(game_id)
        return await self._reader.get(game_id, timeout=bounded(self._timeout))

    async def list_runtimes(
        self, *, status: RuntimeStatus | None, page_size: int, page_token: str
    ) -> Page[RuntimeRecord]:
        """Return one page of records ordered by game id, optionally of one status."""
        return await self._reader.list(
            status=status,
            page_size=effective_page_size(page_size),
            page_token=page_token,
            timeout=bounded(self._timeout),
        )


def explain_operations_limit(requested: int) -> int:
    """0 means the default; more than the maximum is capped; negative is invalid."""
    if requested < 0:
        raise InvalidRequest(
            f"operations_limit {requested} must not be negative",
            metadata={"field": "operations_limit"},
        )
    return min(requested or DEFAULT_EXPLAIN_OPERATIONS, MAX_EXPLAIN_OPERATIONS)


class RuntimeExplainer:
    """ExplainRuntime: one game's record, container, latest operations, unanswered
    Lobby jobs and lease holder, read from PostgreSQL, Docker and Redis.

    Only reads, takes no lease: what it shows of a game that is being worked
    on may be a moment old, which is what an operator asking "what is going
    on with this game?" needs. Any source being unreachable makes the whole
    answer `ServiceUnavailable` (naming the source).
    """

    def __init__(
        self,
        units_of_work: UnitOfWorkFactory,
        engine: EngineBackend,
        leases: GameLeases,
        job_streams: JobStreams,
        *,
        timeout: timedelta = timedelta(seconds=10),
    ) -> None:
        self._units_of_work = units_of_work
        self._engine = engine
        self._leases = leases
        self._job_streams = job_streams
        self._timeout = timeout

    def explain(self, game_id: str, *, operations: int = 0) -> RuntimeExplanation:
        """What is known about `game_id`; `operations` newest log entries (0: the default).

        `InvalidRequest` for a bad game id or a negative `operations`, before
        any I/O. `NotFound` only when nothing at all is known of the game:
        no record, no container, no operation-log entry, no unanswered
        Lobby job (in a complete scan of the job streams) and no lease. So a
        game whose first start failed (no record, but its failed operation)
        or one Lobby asked for that no replica has started yet (a pending
        job) is explained, not unknown.
        """
        parse_game_id(game_id)
        limit = explain_operations_limit(operations)
        record = self._units_of_work.read(
            lambda uow: load_record(uow, game_id), timeout=bounded(self._timeout)
        )
        entries = self._units_of_work.read(
            lambda uow: uow.operations.list(OperationFilter(game_id=game_id), page_size=limit),
            timeout=bounded(self._timeout),
        ).items
        container = self._container_of(game_id, record)
        lease = self._leases.holder(game_id)
        pending = self._job_streams.pending_jobs(game_id, PENDING_JOBS_SCAN)
        if (
            record is None
            and container is None
            and not entries
            and not pending.jobs
            and not pending.truncated
            and lease is None
        ):
            raise NotFound(
                f"nothing is known of game {game_id}: no runtime record, container, "
                "operation, unanswered Lobby job or lease",
                metadata={"game_id": game_id},
            )
        return RuntimeExplanation(
            game_id=game_id,
            record=record,
            container=container,
            operations=tuple(entries),
            pending_jobs=tuple(pending.jobs),
            pending_jobs_truncated=pending.truncated,
            lease=lease,
        )

    def _container_of(self, game_id: str, record: RuntimeRecord | None) -> ContainerState | None:
        """The record's container, else whatever container bears the game's name."""
        if record is not None and record.current_container_id:
            info = self._engine.inspect(record.current_container_id)
            if info is not None:
                return container_state(info)
        info = self._engine.inspect(container_name(game_id))
        return None if info is None else container_state(info)


def container_state(info: ContainerInfo) -> ContainerState:
    """What an explanation shows of an inspected container."""
    return ContainerState(
        id=info.id,
        name=info.name,
        status=info.state,
        running=info.running,
        owned=info.owned,
        image_ref=info.image_ref,
        image_id=info.image_id,
        exit_code=info.exit_code,
        oom_killed=info.oom_killed,
        health=info.health,
        started_at=info.started_at,
        finished_at=info.finished_at,
        restart_count=info.restart_count,
        node_id=info.node_id,
        node_hostname=info.node_hostname,
    )
