"""Each game's Lobby job watermark, as the recorder and the start/stop lifecycles keep it.

SPEC §4: the newest applied Lobby job of a game is kept in the same
transaction as the record change and audit row; a job it settles (that
job itself, or an older one) is not applied again; transient failures
leave it alone so the job can be retried; operations that are not Lobby
jobs never touch it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.jobs import JobKind, JobMark, LobbyJob
from rtmanager.domain.operation import OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.cleanup import CleanupRequest
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.restart import RestartRequest
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.ports import Lease
from tests.unit.harness import IMAGE, Harness, failure_code

GAME = "game-1"
START_STREAM, STOP_STREAM = "runtime:start_jobs", "runtime:stop_jobs"


def start_job(entry_id: str) -> LobbyJob:
    return LobbyJob(JobKind.START, START_STREAM, entry_id)


def stop_job(entry_id: str) -> LobbyJob:
    return LobbyJob(JobKind.STOP, STOP_STREAM, entry_id)


def start(h: Harness, job: LobbyJob, image_ref: str = IMAGE) -> OperationResult:
    return h.start.handle(
        StartRequest(GAME, image_ref, OpSource.LOBBY_STREAM, source_ref=job.entry_id, job=job)
    )


def stop(h: Harness, job: LobbyJob, game_id: str = GAME) -> OperationResult:
    return h.stop.handle(
        StopRequest(
            game_id,
            OpSource.LOBBY_STREAM,
            reason=StopReason.LOBBY_REQUEST,
            source_ref=job.entry_id,
            job=job,
        )
    )


def seed_mark(h: Harness, job: LobbyJob, outcome: Outcome = Outcome.SUCCESS) -> JobMark:
    mark = JobMark(
        game_id=GAME,
        job=job,
        outcome=outcome,
        applied_at=utc_now() - timedelta(minutes=1),
        error_code=ErrorCode.CONFLICT if outcome is Outcome.FAILURE else None,
        error_message="runtime is removed" if outcome is Outcome.FAILURE else "",
        operation_id=41,
    )
    h.store.job_marks[GAME] = mark
    return mark


# --- applied jobs advance the watermark with their audit row ------------------------------


def test_an_applied_start_writes_its_mark_in_the_commit_of_its_record_and_audit_row(
    h: Harness,
) -> None:
    job = start_job("100-0")

    result = start(h, job)

    assert result.ok
    row = h.only_row(GAME)
    (commit,) = [c for c in h.units_of_work.commits() if c.operations]
    assert commit.operations == (row,)
    assert [r.game_id for r in commit.records] == [GAME]
    assert commit.job_marks == (h.store.job_marks[GAME],)
    mark = h.store.job_marks[GAME]
    assert (mark.job, mark.outcome, mark.operation_id) == (job, Outcome.SUCCESS, row.id)
    assert mark.applied_at == row.finished_at
    assert mark.failure is None


def test_an_applied_stop_advances_the_mark_past_the_start(h: Harness) -> None:
    assert start(h, start_job("100-0")).ok

    result = stop(h, stop_job("200-0"))

    assert result.ok and h.record(GAME).status is RuntimeStatus.STOPPED
    assert h.store.job_marks[GAME].job == stop_job("200-0")
    assert h.store.job_marks[GAME].operation_id == h.rows(GAME)[-1].id


def test_a_replayed_start_of_an_engine_already_running_still_advances_the_mark(
    h: Harness,
) -> None:
    h.seed_running(GAME)

    result = start(h, start_job("100-0"))

    assert result.ok and not result.replayed
    assert h.store.job_marks[GAME].job == start_job("100-0")
    assert h.docker.call_names("create") == []


def test_a_mark_is_not_written_when_the_audit_row_cannot_be(h: Harness) -> None:
    h.store.fail_next_appends(1)  # the success row

    result = start(h, start_job("100-0"))

    # A job's outage is retried: it is not audited as a failure either.
    assert failure_code(result) == "service_unavailable" and not result.unrecorded
    assert h.store.job_marks == {}
    assert h.rows() == []


def test_a_jobs_final_failure_that_cannot_be_recorded_is_reported_unrecorded(h: Harness) -> None:
    h.store.fail_next_appends(1)  # the failure row

    result = start(h, start_job("100-0"), image_ref="evil/engine:1.0.0")

    assert failure_code(result) == "image_not_allowed" and result.unrecorded
    assert h.store.job_marks == {}


def test_a_mark_is_not_written_when_the_commit_fails(h: Harness) -> None:
    h.seed_running(GAME)
    # Once the engine is stopped, the next unit of work (the commit) fails.
    h.docker.before("stop", lambda *_: h.units_of_work.fail_next(1, at="commit"))

    result = stop(h, stop_job("100-0"))

    assert failure_code(result) == "service_unavailable"
    assert h.store.job_marks == {}
    assert h.record(GAME).status is RuntimeStatus.RUNNING


# --- failures: final ones advance it, transient ones leave it --------------------------


def test_a_final_failure_advances_the_mark_with_its_code_and_message(h: Harness) -> None:
    result = start(h, start_job("100-0"), image_ref="evil/engine:1.0.0")

    assert failure_code(result) == "image_not_allowed"
    row = h.only_row(GAME)
    mark = h.store.job_marks[GAME]
    assert (mark.outcome, mark.error_code, mark.operation_id) == (
        Outcome.FAILURE,
        ErrorCode.IMAGE_NOT_ALLOWED,
        row.id,
    )
    assert result.failure is not None and mark.failure is not None
    assert mark.error_message == row.error_message == result.failure.message
    assert mark.failure.code is result.failure.code


def test_a_stop_of_an_unknown_game_is_a_final_failure_that_advances_the_mark(
    h: Harness,
) -> None:
    result = stop(h, stop_job("100-0"))

    assert failure_code(result) == "not_found"
    assert h.store.job_marks[GAME].error_code is ErrorCode.NOT_FOUND


def test_a_final_failure_is_recorded_before_the_lease_is_given_back(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another replica takes the lease the moment it is released: it must
    # already see the failed stop's watermark, or an older start would apply.
    marks_at_release: list[JobMark | None] = []
    release = h.leases.release

    def spying_release(lease: Lease) -> bool:
        marks_at_release.append(h.store.job_marks.get(lease.game_id))
        return release(lease)

    monkeypatch.setattr(h.leases, "release", spying_release)

    result = stop(h, stop_job("200-0"))

    assert failure_code(result) == "not_found"
    (mark,) = marks_at_release
    assert mark is not None and mark.job == stop_job("200-0")
    assert h.rows(GAME)[-1].error_code == "not_found"


def test_a_failed_starts_record_change_is_written_before_the_lease_is_given_back(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = h.seed_running(GAME)
    h.docker.containers[old.current_container_id].state = "exited"
    h.docker.fail("start")
    records_at_release: list[RuntimeStatus] = []
    release = h.leases.release

    def spying_release(lease: Lease) -> bool:
        records_at_release.append(h.record(GAME).status)
        return release(lease)

    monkeypatch.setattr(h.leases, "release", spying_release)

    result = start(h, start_job("300-0"))

    assert not result.ok
    # The old container was removed before the failure: the record says so
    # while the lease is still held.
    assert records_at_release == [RuntimeStatus.STOPPED]
    assert h.record(GAME).current_container_id == ""


def test_an_older_start_whose_game_a_newer_job_settled_meanwhile_lands_nothing(
    h: Harness,
) -> None:
    # The watermark moves past the start while it works (a replica that lost
    # track of the lease): its commit is refused, the engine it made removed.
    newer = JobMark(
        game_id=GAME,
        job=stop_job("200-0"),
        outcome=Outcome.FAILURE,
        applied_at=utc_now(),
        error_code=ErrorCode.NOT_FOUND,
        error_message="no runtime record",
    )

    def newer_job_applied(*_: object) -> None:
        h.store.job_marks[GAME] = newer

    h.docker.before("start", newer_job_applied)

    result = start(h, start_job("100-0"))

    assert result.ok and result.superseded_by == newer.job
    assert h.store.job_marks[GAME] == newer
    assert GAME not in h.store.records
    assert h.rows(GAME) == []
    assert [
        c for c in h.docker.containers.values() if c.labels.get(galaxy_labels.GAME_ID) == GAME
    ] == []
    assert h.leases.all_released


def test_a_busy_lease_leaves_the_mark_alone(h: Harness) -> None:
    h.leases.busy.add(GAME)

    result = start(h, start_job("100-0"))

    assert result.failure is not None and result.failure.transient
    assert h.store.job_marks == {}


def test_an_outage_leaves_the_mark_alone(h: Harness) -> None:
    h.docker.fail("ensure_image")

    result = start(h, start_job("100-0"))

    assert failure_code(result) == "service_unavailable"
    assert h.rows(GAME) == []  # retried, so not audited as a failure
    assert h.store.job_marks == {}


def test_a_database_outage_leaves_the_mark_alone_and_reports_the_failure_unrecorded(
    h: Harness,
) -> None:
    h.units_of_work.down = True

    result = stop(h, stop_job("100-0"))

    assert failure_code(result) == "service_unavailable" and result.unrecorded
    assert h.store.job_marks == {}


def test_after_a_transient_failure_the_same_job_applies(h: Harness) -> None:
    job = start_job("100-0")
    h.leases.busy.add(GAME)
    assert not start(h, job).ok
    h.leases.busy.clear()

    result = start(h, job)

    assert result.ok and not result.replayed
    assert h.store.job_marks[GAME].job == job


# --- settled jobs -------------------------------------------------------------------------


def test_an_older_job_is_superseded_without_an_audit_row_or_docker_call(h: Harness) -> None:
    h.seed_stopped(GAME)
    newer = seed_mark(h, stop_job("200-0"))
    docker_calls = len(h.docker.mutating_calls())

    result = start(h, start_job("100-0"))

    assert result.ok and result.superseded_by == newer.job and not result.replayed
    assert result.operation_id == 0 and result.failure is None
    assert result.record is not None and result.record.status is RuntimeStatus.STOPPED
    assert h.rows() == []
    assert len(h.docker.mutating_calls()) == docker_calls
    assert h.store.job_marks[GAME] == newer
    # The check ran under the game's lease, which is given back.
    assert h.leases.acquires_of(GAME) == 1 and h.leases.all_released


def test_an_older_job_of_a_game_without_a_record_is_superseded_with_no_record(
    h: Harness,
) -> None:
    seed_mark(h, stop_job("200-0"))

    result = stop(h, stop_job("150-0"))

    assert result.superseded_by == stop_job("200-0") and result.record is None
    assert h.rows() == []


def test_an_older_start_is_superseded_before_its_image_is_judged(h: Harness) -> None:
    seed_mark(h, stop_job("200-0"))

    result = start(h, start_job("100-0"), image_ref="evil/engine:1.0.0")

    assert result.superseded_by == stop_job("200-0")
    assert result.failure is None and h.rows() == []


def test_a_start_with_the_same_entry_id_as_the_applied_stop_is_superseded(h: Harness) -> None:
    # On a tie the start comes first in Lobby's order.
    seed_mark(h, stop_job("200-0"))

    assert start(h, start_job("200-0")).superseded_by == stop_job("200-0")


def test_a_stop_with_the_same_entry_id_as_the_applied_start_is_applied(h: Harness) -> None:
    assert start(h, start_job("200-0")).ok

    result = stop(h, stop_job("200-0"))

    assert result.ok and result.superseded_by is None
    assert h.record(GAME).status is RuntimeStatus.STOPPED


def test_the_job_of_the_mark_seen_again_repeats_its_outcome_without_acting(h: Harness) -> None:
    job = start_job("100-0")
    first = start(h, job)
    rows, containers = len(h.rows()), len(h.docker.containers)

    again = start(h, job)

    assert again.replayed and again.ok and again.superseded_by is None
    assert again.operation_id == first.operation_id
    assert again.record == h.record(GAME)
    assert (len(h.rows()), len(h.docker.containers)) == (rows, containers)
    assert h.docker.call_names("create") == ["create"]


def test_a_failed_job_seen_again_repeats_its_failure(h: Harness) -> None:
    job = stop_job("100-0")
    first = stop(h, job)

    again = stop(h, job)

    assert again.replayed and not again.ok
    assert again.failure is not None and first.failure is not None
    assert (again.failure.code, again.failure.message) == (
        first.failure.code,
        first.failure.message,
    )
    assert again.operation_id == first.operation_id
    assert len(h.rows()) == 1


def test_a_settled_job_is_judged_under_the_lease(h: Harness) -> None:
    # With the lease busy the job is retried later, not answered superseded.
    seed_mark(h, stop_job("200-0"))
    h.leases.busy.add(GAME)

    result = start(h, start_job("100-0"))

    assert result.superseded_by is None
    assert result.failure is not None and result.failure.transient


def test_a_newer_job_than_the_mark_is_applied(h: Harness) -> None:
    h.seed_stopped(GAME)
    seed_mark(h, stop_job("200-0"))

    result = start(h, start_job("300-0"))

    assert result.ok and result.superseded_by is None
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.store.job_marks[GAME].job == start_job("300-0")


# --- operations that are not Lobby jobs ---------------------------------------------------


def test_operations_that_are_not_lobby_jobs_never_touch_the_mark(h: Harness) -> None:
    h.seed_stopped(GAME)
    mark = seed_mark(h, stop_job("900-0"))

    results = [
        h.start.handle(StartRequest(GAME, IMAGE, OpSource.ADMIN_REST)),
        h.restart.handle(RestartRequest(GAME, OpSource.ADMIN_REST)),
        h.stop.handle(StopRequest(GAME, OpSource.ADMIN_REST)),
        h.cleanup.handle(CleanupRequest(GAME, OpSource.ADMIN_REST)),
    ]

    assert [r.ok for r in results] == [True, True, True, True]
    assert all(r.superseded_by is None and not r.replayed for r in results)
    assert h.store.job_marks == {GAME: mark}
    assert all(commit.job_marks == () for commit in h.units_of_work.commits())
    assert {row.op_kind for row in h.rows()} >= {OpKind.START, OpKind.STOP, OpKind.RESTART}


def test_admin_operations_never_read_the_mark(h: Harness) -> None:
    h.seed_running(GAME)
    units = len(h.units_of_work.units)

    assert h.stop.handle(StopRequest(GAME, OpSource.ADMIN_REST)).ok

    # One unit to read the record, one to commit: no watermark check.
    assert len(h.units_of_work.units) - units == 2
