"""The PostgreSQL Lobby job watermarks: one per game, never moved back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rtmanager.adapters.postgres.migrations import apply_migrations
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.jobs import JobKind, JobMark, LobbyJob
from rtmanager.domain.operation import Outcome
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
GAME = "game-1"


@pytest.fixture
def uow(pg_schema: str) -> Iterator[PostgresUnitOfWorkFactory]:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=2, timeout=10)
    try:
        yield PostgresUnitOfWorkFactory(pool, default_timeout=timedelta(seconds=10))
    finally:
        pool.close()


def mark(kind: JobKind, entry_id: str, outcome: Outcome = Outcome.SUCCESS) -> JobMark:
    stream = "runtime:start_jobs" if kind is JobKind.START else "runtime:stop_jobs"
    failed = outcome is Outcome.FAILURE
    return JobMark(
        game_id=GAME,
        job=LobbyJob(kind, stream, entry_id),
        outcome=outcome,
        applied_at=T0,
        error_code=ErrorCode.NOT_FOUND if failed else None,
        error_message="no runtime record" if failed else "",
    )


def advance(uow: PostgresUnitOfWorkFactory, new: JobMark) -> bool:
    with uow() as unit:
        moved = unit.job_marks.advance(new)
        unit.commit()
    return moved


def stored(uow: PostgresUnitOfWorkFactory) -> JobMark | None:
    with uow() as unit:
        return unit.job_marks.get(GAME)


def test_the_first_mark_is_stored_and_read_back_whole(uow: PostgresUnitOfWorkFactory) -> None:
    failed_stop = mark(JobKind.STOP, "200-3", Outcome.FAILURE)

    assert stored(uow) is None
    assert advance(uow, failed_stop) is True
    assert stored(uow) == failed_stop


def test_a_newer_mark_replaces_the_stored_one(uow: PostgresUnitOfWorkFactory) -> None:
    advance(uow, mark(JobKind.START, "100-0"))

    assert advance(uow, mark(JobKind.STOP, "100-1")) is True
    assert stored(uow) == mark(JobKind.STOP, "100-1")


@pytest.mark.parametrize(
    "older",
    [
        mark(JobKind.START, "199-9"),
        mark(JobKind.START, "200-0"),  # a start ranks before a stop of the same id
        mark(JobKind.STOP, "200-0", Outcome.FAILURE),  # the same job again
    ],
)
def test_an_older_or_equal_mark_is_refused_and_changes_nothing(
    uow: PostgresUnitOfWorkFactory, older: JobMark
) -> None:
    newer = mark(JobKind.STOP, "200-0")
    advance(uow, newer)

    assert advance(uow, older) is False
    assert stored(uow) == newer
