"""`RuntimeQueries` and `RuntimeReads`: the read-only use cases, against the fake
unit of work."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from rtmanager.deadlines import deadline_scope
from rtmanager.domain.errors import InvalidRequest, NotFound
from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.queries import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    RuntimeQueries,
    RuntimeReads,
    effective_page_size,
)
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.ports import OperationFilter, Page
from tests.unit.harness import Harness


@pytest.fixture
def queries(h: Harness) -> RuntimeQueries:
    return RuntimeQueries(h.units_of_work)


def test_get_runtime_returns_the_committed_record(h: Harness, queries: RuntimeQueries) -> None:
    record = h.seed_running("game-1")

    assert queries.get_runtime("game-1") == record


def test_get_runtime_of_unknown_game_is_not_found(queries: RuntimeQueries) -> None:
    with pytest.raises(NotFound):
        queries.get_runtime("game-1")


def test_get_runtime_of_malformed_game_id_is_invalid_request_without_reading(
    h: Harness, queries: RuntimeQueries
) -> None:
    with pytest.raises(InvalidRequest):
        queries.get_runtime("../etc")
    assert h.units_of_work.units == []


def test_list_runtimes_pages_by_game_id_and_filters_by_status(
    h: Harness, queries: RuntimeQueries
) -> None:
    for game_id in ("game-c", "game-a", "game-b"):
        h.seed_running(game_id)
    h.seed_stopped("game-d")

    first = queries.list_runtimes(status=RuntimeStatus.RUNNING, page_size=2, page_token="")
    rest = queries.list_runtimes(
        status=RuntimeStatus.RUNNING, page_size=2, page_token=first.next_page_token
    )

    assert [r.game_id for r in first.items] == ["game-a", "game-b"]
    assert ([r.game_id for r in rest.items], rest.next_page_token) == (["game-c"], "")


@pytest.mark.parametrize(
    ("requested", "effective"),
    [(0, DEFAULT_PAGE_SIZE), (1, 1), (MAX_PAGE_SIZE, MAX_PAGE_SIZE), (10**6, MAX_PAGE_SIZE)],
)
def test_page_size_zero_means_the_default_and_large_ones_are_capped(
    requested: int, effective: int
) -> None:
    assert effective_page_size(requested) == effective


def test_a_capped_page_size_is_what_the_store_is_asked_for(
    h: Harness, queries: RuntimeQueries
) -> None:
    for n in range(3):
        h.seed_running(f"game-{n}")

    page = queries.list_runtimes(status=None, page_size=10**6, page_token="")

    assert len(page.items) == 3


def test_negative_page_size_is_invalid_request(queries: RuntimeQueries) -> None:
    with pytest.raises(InvalidRequest):
        queries.list_runtimes(status=None, page_size=-1, page_token="")
    with pytest.raises(InvalidRequest):
        queries.list_operations(OperationFilter(), page_size=-1, page_token="")


def test_list_operations_returns_the_audit_log_newest_first(
    h: Harness, queries: RuntimeQueries
) -> None:
    h.seed_running("game-1")
    h.stop.handle(StopRequest(game_id="game-1", op_source=OpSource.ADMIN_REST))
    h.stop.handle(StopRequest(game_id="game-1", op_source=OpSource.GM_REST))

    page = queries.list_operations(
        OperationFilter(game_id="game-1", op_kind=OpKind.STOP), page_size=0, page_token=""
    )

    assert [e.op_source for e in page.items] == [OpSource.GM_REST, OpSource.ADMIN_REST]


def test_list_operations_refuses_a_malformed_game_id_and_an_inverted_time_range(
    h: Harness, queries: RuntimeQueries
) -> None:
    now = utc_now()
    with pytest.raises(InvalidRequest):
        queries.list_operations(OperationFilter(game_id="../etc"), page_size=0, page_token="")
    with pytest.raises(InvalidRequest):
        queries.list_operations(
            OperationFilter(since=now, until=now - timedelta(seconds=1)),
            page_size=0,
            page_token="",
        )
    assert h.units_of_work.units == []


class FakeReader:
    """A `RecordReader` over the harness's records that notes how it was asked."""

    def __init__(self, h: Harness) -> None:
        self._queries = RuntimeQueries(h.units_of_work)
        self.calls: list[tuple[str, object, timedelta | None]] = []

    async def get(self, game_id: str, *, timeout: timedelta | None = None) -> RuntimeRecord:
        self.calls.append(("get", game_id, timeout))
        return self._queries.get_runtime(game_id)

    async def list(
        self,
        *,
        status: RuntimeStatus | None,
        page_size: int,
        page_token: str,
        timeout: timedelta | None = None,
    ) -> Page[RuntimeRecord]:
        self.calls.append(("list", page_size, timeout))
        return self._queries.list_runtimes(
            status=status, page_size=page_size, page_token=page_token
        )


def test_reads_on_the_loop_answer_as_the_queries_do_within_the_callers_deadline(
    h: Harness,
) -> None:
    record = h.seed_running("game-1")
    reader = FakeReader(h)
    reads = RuntimeReads(reader, timeout=timedelta(seconds=10))

    async def read() -> tuple[RuntimeRecord, Page[RuntimeRecord]]:
        with deadline_scope(2.0):
            return (
                await reads.get_runtime("game-1"),
                await reads.list_runtimes(status=None, page_size=0, page_token=""),
            )

    started = time.monotonic()
    got, page = asyncio.run(read())
    took = timedelta(seconds=time.monotonic() - started)

    assert got == record and list(page.items) == [record]
    (get_call, list_call) = reader.calls
    assert list_call[1] == DEFAULT_PAGE_SIZE
    for _, _, timeout in (get_call, list_call):
        assert timeout is not None
        assert timedelta(seconds=2) - took <= timeout <= timedelta(seconds=2)


def test_reads_on_the_loop_refuse_a_bad_id_or_page_size_without_reading(h: Harness) -> None:
    reader = FakeReader(h)
    reads = RuntimeReads(reader)

    with pytest.raises(InvalidRequest):
        asyncio.run(reads.get_runtime("../etc"))
    with pytest.raises(InvalidRequest):
        asyncio.run(reads.list_runtimes(status=None, page_size=-1, page_token=""))
    assert reader.calls == []
    asyncio.run(reads.list_runtimes(status=None, page_size=MAX_PAGE_SIZE + 1, page_token=""))
    assert reader.calls[0][1] == MAX_PAGE_SIZE
