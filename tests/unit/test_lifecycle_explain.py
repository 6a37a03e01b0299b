"""`RuntimeExplainer`: everything known about one game, against the fakes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rtmanager.domain.errors import InvalidRequest, NotFound, ServiceUnavailable
from rtmanager.domain.explanation import LeaseHolder
from rtmanager.domain.jobs import JobKind
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.lifecycle.queries import (
    DEFAULT_EXPLAIN_OPERATIONS,
    MAX_EXPLAIN_OPERATIONS,
    PENDING_JOBS_SCAN,
    RuntimeExplainer,
)
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from tests.unit.fakes import CRASHES, FakeJobStreams, FakeRedisStreams
from tests.unit.harness import IMAGE, Harness, failure_code

GAME = "game-1"


@pytest.fixture
def lobby() -> FakeRedisStreams:
    return FakeRedisStreams()


@pytest.fixture
def streams(lobby: FakeRedisStreams) -> FakeJobStreams:
    return lobby.consumer("rtmanager-1")


@pytest.fixture
def explainer(h: Harness, streams: FakeJobStreams) -> RuntimeExplainer:
    return RuntimeExplainer(h.units_of_work, h.docker, h.leases, streams)


def started(h: Harness, game_id: str = GAME) -> None:
    result = h.start.handle(
        StartRequest(game_id=game_id, image_ref=IMAGE, op_source=OpSource.GM_REST)
    )
    assert result.ok, result.failure


def test_a_running_game_shows_its_record_running_container_and_operations(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    started(h)

    explained = explainer.explain(GAME)

    record = h.record(GAME)
    assert explained.game_id == GAME
    assert explained.record == record
    container = explained.container
    assert container is not None
    assert (container.id, container.name) == (record.current_container_id, "galaxy-game-game-1")
    assert (container.status, container.running, container.owned) == ("running", True, True)
    assert (container.exit_code, container.oom_killed, container.restart_count) == (None, False, 0)
    assert container.image_ref == IMAGE
    assert container.image_id == h.docker.containers[record.current_container_id].image_id
    assert container.started_at is not None and container.finished_at is None
    assert [(e.op_kind, e.outcome) for e in explained.operations] == [
        (OpKind.START, Outcome.SUCCESS)
    ]
    assert explained.pending_jobs == ()
    assert explained.pending_jobs_truncated is False
    assert explained.lease is None  # released after the start


def test_an_engine_that_died_behind_the_services_back_shows_its_exit(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    record = h.seed_running(GAME)
    dead = h.docker.containers[record.current_container_id]
    dead.state, dead.exit_code, dead.oom_killed = "exited", 137, True

    explained = explainer.explain(GAME)

    assert explained.record is not None and explained.record.status is RuntimeStatus.RUNNING
    assert explained.container is not None
    assert (explained.container.status, explained.container.running) == ("exited", False)
    assert (explained.container.exit_code, explained.container.oom_killed) == (137, True)


def test_without_the_records_container_the_container_bearing_the_games_name_is_shown(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    h.seed_stopped(GAME, container=False)
    foreign = h.docker.add_container(name="galaxy-game-game-1", image_ref="someone/else:1")

    explained = explainer.explain(GAME)

    assert explained.container is not None
    assert (explained.container.id, explained.container.owned) == (foreign, False)
    del h.docker.containers[foreign]
    assert explainer.explain(GAME).container is None  # no container is an answer


def test_a_busy_game_shows_who_holds_its_lease_and_for_how_long(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    h.seed_running(GAME)
    h.leases.busy.add(GAME)
    assert explainer.explain(GAME).lease == h.leases.busy_holder

    h.leases.busy.clear()
    lease = h.leases.acquire(GAME, timedelta(seconds=42))
    assert lease is not None
    assert explainer.explain(GAME).lease == LeaseHolder("rtmanager-1", timedelta(seconds=42))


def test_lobby_jobs_not_answered_yet_are_shown_delivered_or_not(
    h: Harness, explainer: RuntimeExplainer, lobby: FakeRedisStreams, streams: FakeJobStreams
) -> None:
    h.seed_running(GAME)
    delivered = lobby.add_start(GAME, IMAGE)
    lobby.add_start("game-2", IMAGE)
    assert len(streams.read_new(10, timedelta(0))) == 2
    waiting = lobby.add_stop(GAME, "game_finished")

    explained = explainer.explain(GAME)

    assert [(j.job, j.delivered) for j in explained.pending_jobs] == [
        (delivered, True),
        (waiting, False),
    ]
    assert explained.pending_jobs[0].consumer == "rtmanager-1"
    assert explained.pending_jobs[1].job.kind is JobKind.STOP
    assert explained.pending_jobs_truncated is False
    assert "pending_jobs" in streams.calls


def test_a_truncated_scan_of_the_job_streams_is_reported_and_is_no_not_found(
    explainer: RuntimeExplainer, lobby: FakeRedisStreams
) -> None:
    # Nothing else is known of the game, but its jobs may wait behind the bound.
    for _ in range(PENDING_JOBS_SCAN):
        lobby.add_start("game-2", IMAGE)
    lobby.add_start(GAME, IMAGE)

    explained = explainer.explain(GAME)

    assert explained.pending_jobs == ()  # behind the bound
    assert explained.pending_jobs_truncated is True


def test_a_game_only_lobby_asked_for_is_explained_not_unknown(
    explainer: RuntimeExplainer, lobby: FakeRedisStreams
) -> None:
    job = lobby.add_start(GAME, IMAGE)

    explained = explainer.explain(GAME)

    assert (explained.record, explained.container, explained.operations) == (None, None, ())
    assert [j.job for j in explained.pending_jobs] == [job]


def test_a_game_whose_first_start_failed_is_explained_by_its_failed_operation(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    h.docker.behaviours[IMAGE] = CRASHES
    result = h.start.handle(StartRequest(game_id=GAME, image_ref=IMAGE, op_source=OpSource.GM_REST))
    assert failure_code(result) == "container_start_failed"

    explained = explainer.explain(GAME)

    assert (explained.record, explained.container) == (None, None)
    (entry,) = explained.operations
    assert (entry.op_kind, entry.error_code) == (OpKind.START, "container_start_failed")


def test_a_game_with_a_lease_and_nothing_else_is_explained(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    h.leases.busy.add(GAME)
    assert explainer.explain(GAME).lease == h.leases.busy_holder


def test_a_game_nothing_is_known_of_is_not_found(explainer: RuntimeExplainer) -> None:
    with pytest.raises(NotFound, match="nothing is known of game game-1"):
        explainer.explain(GAME)


def test_a_malformed_game_id_or_operations_limit_is_invalid_before_any_io(
    h: Harness, explainer: RuntimeExplainer, streams: FakeJobStreams
) -> None:
    with pytest.raises(InvalidRequest):
        explainer.explain("../etc")
    with pytest.raises(InvalidRequest):
        explainer.explain(GAME, operations=-1)
    assert h.units_of_work.units == []
    assert h.docker.calls == []
    assert streams.calls == []


def test_operations_are_the_newest_first_default_20_at_most_100(
    h: Harness, explainer: RuntimeExplainer
) -> None:
    h.seed_running(GAME)
    for _ in range(MAX_EXPLAIN_OPERATIONS + 5):
        h.stop.handle(StopRequest(game_id=GAME, op_source=OpSource.ADMIN_REST))
    newest = h.rows(GAME)[-1]

    assert len(explainer.explain(GAME).operations) == DEFAULT_EXPLAIN_OPERATIONS
    assert len(explainer.explain(GAME, operations=3).operations) == 3
    assert explainer.explain(GAME, operations=3).operations[0] == newest
    assert len(explainer.explain(GAME, operations=10**6).operations) == MAX_EXPLAIN_OPERATIONS


def test_an_unreachable_source_makes_the_answer_service_unavailable(
    h: Harness, explainer: RuntimeExplainer, streams: FakeJobStreams
) -> None:
    h.seed_running(GAME)
    h.docker.fail("inspect")
    with pytest.raises(ServiceUnavailable):
        explainer.explain(GAME)
    h.leases.go_down("holder")
    with pytest.raises(ServiceUnavailable):
        explainer.explain(GAME)
    h.leases.failing.clear()
    streams.down = True
    with pytest.raises(ServiceUnavailable):
        explainer.explain(GAME)
