"""Read-only use cases: one runtime, a page of runtimes, a page of the audit log."""

from __future__ import annotations

from datetime import timedelta

from rtmanager.deadlines import bounded
from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.ids import parse_game_id
from rtmanager.domain.operation import OperationEntry
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.ports import OperationFilter, Page, UnitOfWorkFactory

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


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
