"""The fakes keep the ports' contracts, so lifecycle tests built on them mean something."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest

from rtmanager.domain import labels
from rtmanager.domain.errors import (
    ConcurrentModification,
    Conflict,
    ImagePullFailed,
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from rtmanager.domain.explanation import LeaseHolder
from rtmanager.domain.jobs import JobKind
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import (
    InvalidRuntimeRecord,
    InvalidTransition,
    RuntimeRecord,
    RuntimeStatus,
)
from rtmanager.domain.timeutil import utc_now
from rtmanager.ports import (
    AnswerOutcome,
    ContainerSpec,
    EngineUser,
    OperationFilter,
    PullPolicy,
    StatusChange,
)
from tests.unit.fakes import (
    CRASHES,
    DELETED_REASON,
    FakeBackend,
    FakeLeases,
    FakeRedisStreams,
    FakeUnitOfWorkFactory,
)

NOW = utc_now()


def running(game_id: str = "game-1", container_id: str = "c1") -> RuntimeRecord:
    return RuntimeRecord(
        game_id=game_id,
        status=RuntimeStatus.RUNNING,
        engine_endpoint=f"http://galaxy-game-{game_id}:8080",
        state_path=f"/games/{game_id}",
        docker_network="galaxy-engines",
        last_op_at=NOW - timedelta(hours=1),
        created_at=NOW - timedelta(hours=2),
        current_container_id=container_id,
        current_image_ref="galaxy/engine:1.0.0",
        started_at=NOW - timedelta(hours=1),
    )


def entry(game_id: str = "game-1", **changes: object) -> OperationEntry:
    base = OperationEntry(
        game_id=game_id,
        op_kind=OpKind.START,
        op_source=OpSource.ADMIN_REST,
        outcome=Outcome.SUCCESS,
        started_at=NOW,
        finished_at=NOW,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def stop_change(**changes: object) -> StatusChange:
    base = StatusChange(
        game_id="game-1",
        expected_from=RuntimeStatus.RUNNING,
        to=RuntimeStatus.STOPPED,
        now=NOW,
        expected_container_id="c1",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- units of work ------------------------------------------------------------------


def test_writes_are_visible_inside_the_unit_of_work_and_reach_the_store_on_commit() -> None:
    units = FakeUnitOfWorkFactory()
    with units() as uow:
        uow.records.upsert(running())
        appended = uow.operations.append(entry())
        assert uow.records.get("game-1") == running()
        assert uow.operations.list(OperationFilter()).items == [appended]
        assert units.store.records == {}
        uow.commit()

    assert units.store.record("game-1") == running()
    assert units.store.entries() == [appended]


def test_leaving_a_unit_of_work_without_commit_discards_its_writes() -> None:
    units = FakeUnitOfWorkFactory()
    with units() as uow:
        uow.records.upsert(running())
        uow.operations.append(entry())

    assert units.store.records == {} and units.store.entries() == []


def test_an_exception_in_the_block_discards_the_writes() -> None:
    units = FakeUnitOfWorkFactory()
    with pytest.raises(RuntimeError), units() as uow:
        uow.records.upsert(running())
        raise RuntimeError

    assert units.store.records == {}


def test_a_unit_of_work_cannot_be_used_outside_its_block() -> None:
    units = FakeUnitOfWorkFactory()
    with units() as uow:
        pass

    with pytest.raises(RuntimeError):
        uow.records.get("game-1")


def test_scheduled_failures_hit_enter_or_commit_of_the_chosen_units() -> None:
    units = FakeUnitOfWorkFactory()
    units.fail_next(1, at="commit", after=1)
    with units():
        pass
    with pytest.raises(ServiceUnavailable), units() as uow:
        uow.records.upsert(running())
        uow.commit()
    units.down = True
    with pytest.raises(ServiceUnavailable), units():
        pass

    assert units.store.records == {}


def test_operation_ids_increase_and_listing_is_newest_first_with_filters() -> None:
    units = FakeUnitOfWorkFactory()
    with units() as uow:
        first = uow.operations.append(entry("game-1"))
        second = uow.operations.append(entry("game-2", op_kind=OpKind.STOP))
        later = NOW + timedelta(seconds=1)
        third = uow.operations.append(entry("game-1", started_at=later, finished_at=later))
        uow.commit()

    with units() as uow:
        assert [e.id for e in uow.operations.list(OperationFilter()).items] == [
            third.id,
            second.id,
            first.id,
        ]
        assert uow.operations.list(OperationFilter(game_id="game-1")).items == [third, first]
        assert uow.operations.list(OperationFilter(op_kind=OpKind.STOP)).items == [second]
        assert uow.operations.list(OperationFilter(since=NOW + timedelta(seconds=1))).items == [
            third
        ]
        assert (
            third
            not in uow.operations.list(OperationFilter(until=NOW + timedelta(seconds=1))).items
        )
        page = uow.operations.list(OperationFilter(), page_size=2)
        assert page.items == [third, second]
        rest = uow.operations.list(OperationFilter(), page_size=2, page_token=page.next_page_token)
        assert (rest.items, rest.next_page_token) == ([first], "")
        with pytest.raises(InvalidRequest):
            uow.operations.list(OperationFilter(), page_token="garbage")


def test_append_validates_the_entry_and_can_be_made_to_fail() -> None:
    units = FakeUnitOfWorkFactory()
    units.store.fail_next_appends()
    with units() as uow:
        with pytest.raises(ValueError):
            uow.operations.append(entry(outcome=Outcome.FAILURE))
        with pytest.raises(ServiceUnavailable):
            uow.operations.append(entry())
        uow.operations.append(entry())


# --- records ------------------------------------------------------------------------


def test_get_of_a_missing_record_is_not_found_and_get_for_update_is_none() -> None:
    with FakeUnitOfWorkFactory()() as uow:
        with pytest.raises(NotFound):
            uow.records.get("game-1")
        assert uow.records.get_for_update("game-1") is None


def test_upsert_validates_the_record() -> None:
    with FakeUnitOfWorkFactory()() as uow, pytest.raises(InvalidRuntimeRecord):
        uow.records.upsert(replace(running(), started_at=None))


def test_update_status_applies_the_cas_and_derives_timestamps() -> None:
    units = FakeUnitOfWorkFactory()
    units.store.put(running())
    with units() as uow:
        stopped = uow.records.update_status(stop_change())
        uow.commit()

    assert stopped == running().with_status(RuntimeStatus.STOPPED, NOW)
    assert units.store.record("game-1") == stopped


@pytest.mark.parametrize(
    "change",
    [
        stop_change(expected_container_id="other"),
        stop_change(expected_container_id=""),
        stop_change(expected_from=RuntimeStatus.STOPPED, to=RuntimeStatus.REMOVED),
    ],
)
def test_update_status_with_a_failing_guard_is_concurrent_modification(
    change: StatusChange,
) -> None:
    units = FakeUnitOfWorkFactory()
    units.store.put(running())
    with units() as uow, pytest.raises(ConcurrentModification):
        uow.records.update_status(change)


def test_update_status_without_container_guard_checks_only_the_status() -> None:
    units = FakeUnitOfWorkFactory()
    units.store.put(running())
    with units() as uow:
        record = uow.records.update_status(stop_change(expected_container_id=None))
    assert record.status is RuntimeStatus.STOPPED


def test_update_status_rejects_forbidden_transitions_and_missing_records() -> None:
    units = FakeUnitOfWorkFactory()
    with units() as uow:
        with pytest.raises(InvalidTransition):
            uow.records.update_status(
                stop_change(expected_from=RuntimeStatus.REMOVED, to=RuntimeStatus.RUNNING)
            )
        with pytest.raises(NotFound):
            uow.records.update_status(stop_change())


def test_update_status_producing_a_broken_record_is_internal() -> None:
    units = FakeUnitOfWorkFactory()
    units.store.put(running())
    with units() as uow, pytest.raises(InternalError):
        uow.records.update_status(stop_change(now=NOW - timedelta(days=1)))


def test_record_listings() -> None:
    units = FakeUnitOfWorkFactory()
    units.store.put(running("game-b", "cb"))
    units.store.put(running("game-a", "ca").with_status(RuntimeStatus.STOPPED, NOW))
    units.store.put(running("game-c", "cc"))
    with units() as uow:
        page = uow.records.list(page_size=2)
        assert [r.game_id for r in page.items] == ["game-a", "game-b"]
        rest = uow.records.list(page_size=2, page_token=page.next_page_token)
        assert ([r.game_id for r in rest.items], rest.next_page_token) == (["game-c"], "")
        assert [r.game_id for r in uow.records.list(status=RuntimeStatus.RUNNING).items] == [
            "game-b",
            "game-c",
        ]
        assert [r.game_id for r in uow.records.list_by_status(RuntimeStatus.STOPPED)] == ["game-a"]
        assert [
            r.game_id for r in uow.records.list_stopped_before(NOW + timedelta(seconds=1), 10)
        ] == ["game-a"]
        assert uow.records.list_stopped_before(NOW, 10) == []
        with pytest.raises(InvalidRequest):
            uow.records.list(page_size=0)


# --- leases -------------------------------------------------------------------------


def test_leases_are_exclusive_and_token_checked() -> None:
    leases = FakeLeases()
    lease = leases.acquire("game-1", timedelta(seconds=1))
    assert lease is not None
    assert leases.acquire("game-1", timedelta(seconds=1)) is None
    leases.expire("game-1")
    assert leases.renew(lease, timedelta(seconds=1)) is False
    newer = leases.acquire("game-1", timedelta(seconds=1))
    assert newer is not None
    assert leases.release(lease) is False
    assert leases.release(newer) is True
    leases.busy.add("game-2")
    assert leases.acquire("game-2", timedelta(seconds=1)) is None


def test_leases_name_their_holder() -> None:
    leases = FakeLeases(instance_id="replica-a")
    lease = leases.acquire("game-1", timedelta(seconds=3))
    assert lease is not None and lease.token.startswith("replica-a/")
    assert leases.holder("game-1") == LeaseHolder("replica-a", timedelta(seconds=3))
    assert leases.renew(lease, timedelta(seconds=5))
    assert leases.holder("game-1") == LeaseHolder("replica-a", timedelta(seconds=5))
    leases.busy.add("game-2")
    assert leases.holder("game-2") == leases.busy_holder
    assert leases.release(lease)
    assert leases.holder("game-1") is None
    leases.go_down("holder")
    with pytest.raises(ServiceUnavailable):
        leases.holder("game-1")


# --- docker -------------------------------------------------------------------------


def spec(name: str = "galaxy-game-game-1", image_ref: str = "galaxy/engine:1.0.0") -> ContainerSpec:
    return ContainerSpec(
        name=name,
        image_ref=image_ref,
        network="galaxy-engines",
        network_alias=name,
        labels=labels.engine_labels(cluster="prod", game_id="game-1", image_ref=image_ref),
        env={},
        state_host_path="/games/game-1",
        state_mount_path="/state",
        memory_bytes=1,
        nano_cpus=1,
        pids_limit=1,
        user=EngineUser(65534, 65534),
        log_max_bytes=1024,
        log_max_files=1,
    )


def test_docker_creates_starts_stops_and_removes_containers() -> None:
    docker = FakeBackend(cluster="prod", images={"galaxy/engine:1.0.0"})
    container_id = docker.create(spec())
    with pytest.raises(Conflict):
        docker.create(spec())
    docker.start(container_id)
    info = docker.inspect("galaxy-game-game-1")
    assert info is not None and info.running and info.owned and info.game_id == "game-1"
    with pytest.raises(Conflict):
        docker.remove(container_id)
    docker.stop(container_id, timedelta(seconds=1))
    docker.remove(container_id)
    docker.remove(container_id)
    docker.stop(container_id, timedelta(seconds=1))
    assert docker.inspect(container_id) is None


def test_docker_ownership_follows_the_cluster() -> None:
    docker = FakeBackend(cluster="prod")
    ours = docker.add_engine("game-1", "galaxy/engine:1.0.0")
    staging = docker.add_engine("game-2", "galaxy/engine:1.0.0", cluster="staging")
    assert [info.id for info in docker.list_owned()] == [ours]
    info = docker.inspect(staging)
    assert info is not None and not info.owned


def test_docker_inspect_reports_oom_kills_restarts_and_the_image_id_a_listing_lacks() -> None:
    docker = FakeBackend(cluster="prod")
    killed = docker.add_engine("game-1", "galaxy/engine:1.0.0", running=False)
    other = docker.add_engine("game-2", "galaxy/engine:1.0.0")
    docker.containers[killed].oom_killed = True
    docker.containers[killed].restart_count = 2
    info = docker.inspect(killed)
    assert info is not None
    assert (info.oom_killed, info.restart_count) == (True, 2)
    assert info.image_id.startswith("sha256:")
    assert info.image_id == docker.containers[other].image_id
    listed = {c.id: c for c in docker.list_owned()}
    assert (listed[killed].oom_killed, listed[killed].restart_count) == (False, 0)
    assert listed[killed].image_id == info.image_id


@pytest.mark.parametrize(
    ("policy", "image", "pulled", "ok"),
    [
        (PullPolicy.IF_MISSING, "present:1", [], True),
        (PullPolicy.IF_MISSING, "pullable:1", ["pullable:1"], True),
        (PullPolicy.IF_MISSING, "missing:1", ["missing:1"], False),
        (PullPolicy.ALWAYS, "present:1", ["present:1"], False),
        (PullPolicy.ALWAYS, "pullable:1", ["pullable:1"], True),
        (PullPolicy.NEVER, "present:1", [], True),
        (PullPolicy.NEVER, "pullable:1", [], False),
    ],
)
def test_docker_pull_policies(policy: PullPolicy, image: str, pulled: list[str], ok: bool) -> None:
    docker = FakeBackend(images={"present:1"}, pullable={"pullable:1"})
    if ok:
        docker.ensure_image(image, policy)
    else:
        with pytest.raises(ImagePullFailed):
            docker.ensure_image(image, policy)
    assert docker.pulled == pulled


def test_docker_engine_behaviours_and_failure_injection() -> None:
    docker = FakeBackend(cluster="prod", images={"galaxy/engine:1.0.0"})
    docker.behaviours["galaxy/engine:1.0.0"] = CRASHES
    container_id = docker.create(spec())
    docker.start(container_id)
    info = docker.inspect(container_id)
    assert info is not None and not info.running and info.exit_code == 3
    assert "panic" in docker.logs_tail(container_id, 1)
    docker.fail("ping", times=2)
    for _ in range(2):
        with pytest.raises(ServiceUnavailable):
            docker.ping()
    docker.ping()
    assert docker.call_names("ping") == ["ping"] * 3
    with pytest.raises(NotImplementedError):
        docker.follow_events()


# --- job streams ----------------------------------------------------------------------


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


NO_WAIT = timedelta(0)


def test_new_entries_are_first_deliveries_in_lobbys_order_across_both_streams() -> None:
    redis = FakeRedisStreams()
    stop = redis.add_stop("g1")
    start = redis.add_start("g1", "galaxy/engine:1.0.0")
    tie = redis.add_stop("g2", entry_id="1800000000000-0")
    tied = redis.add_start("g2", "galaxy/engine:1.0.0", entry_id="1800000000000-0")
    streams = redis.consumer("c1")

    first = streams.read_new(3, NO_WAIT)
    rest = streams.read_new(10, NO_WAIT)

    assert [e.job for e in first] == [stop, start, tied]
    assert [e.job for e in rest] == [tie]
    assert all(e.deliveries == 1 for e in first + rest)
    assert first[1].fields == {b"game_id": b"g1", b"image_ref": b"galaxy/engine:1.0.0"}
    assert redis.pending_on("c1") == [stop, start, tied, tie]
    assert streams.read_new(10, NO_WAIT) == []
    assert redis.consumer("c2").read_new(10, NO_WAIT) == []


def test_entry_ids_must_grow_per_stream() -> None:
    redis = FakeRedisStreams()
    redis.add_stop("g1", entry_id="5-0")

    with pytest.raises(ValueError, match="not above"):
        redis.add_stop("g1", entry_id="5-0")
    assert redis.add_start("g1", "x", entry_id="5-0").entry_id == "5-0"


def test_an_answer_is_published_and_acknowledged_once_and_only_by_the_holder() -> None:
    redis = FakeRedisStreams()
    job = redis.add_start("g1", "galaxy/engine:1.0.0")
    holder, other = redis.consumer("c1"), redis.consumer("c2")
    (entry,) = holder.read_new(10, NO_WAIT)

    assert other.answer(entry, {"job_id": job.entry_id}) is AnswerOutcome.NOT_OURS
    assert redis.results() == []
    fields = {"stream": job.stream, "job_id": job.entry_id}
    assert holder.answer(entry, fields) is AnswerOutcome.ANSWERED
    assert redis.results() == [fields] and redis.owner_of(job) is None
    redis.redeliver(job, to="c1")  # the acknowledgement lost
    assert holder.answer(entry, fields) is AnswerOutcome.ALREADY_ANSWERED
    assert other.answer(entry, fields) is AnswerOutcome.ALREADY_ANSWERED
    assert redis.answer_of(job) == fields and redis.owner_of(job) is None


def test_dead_letters_go_to_their_own_stream_and_streams_are_trimmed() -> None:
    redis = FakeRedisStreams(results_maxlen=2)
    streams = redis.consumer("c1")
    jobs = [redis.add_stop(f"g{n}") for n in range(4)]
    entries = streams.read_new(10, NO_WAIT)
    for entry in entries[:3]:
        streams.answer(entry, {"stream": entry.stream, "job_id": entry.entry_id})
    streams.answer(entries[3], {"job_id": entries[3].entry_id}, dead_letter=True)

    assert [r["job_id"] for r in redis.results()] == [jobs[1].entry_id, jobs[2].entry_id]
    assert redis.dead_letters() == [{"job_id": jobs[3].entry_id}]


def test_only_idle_entries_of_consumers_without_presence_are_claimed() -> None:
    clock = ManualClock()
    redis = FakeRedisStreams(clock=clock)
    job = redis.add_start("g1", "galaxy/engine:1.0.0")
    owner = redis.consumer("c1", presence_ttl=timedelta(hours=1))
    taker = redis.consumer("c2")
    assert owner.claim_name()
    owner.read_new(10, NO_WAIT)
    clock.advance(60)

    assert taker.claim_abandoned(timedelta(seconds=30), 10) == []  # c1 is alive
    redis.expire_presence("c1")
    assert taker.claim_abandoned(timedelta(seconds=61), 10) == []  # not idle long enough
    (entry,) = taker.claim_abandoned(timedelta(seconds=30), 10)

    assert (entry.job, entry.deliveries) == (job, 2)
    assert redis.owner_of(job) == "c2"
    assert owner.claim_abandoned(timedelta(seconds=30), 10) == []  # c2 took it just now
    assert redis.consumer("c3").claim_abandoned(timedelta(0), 10)[0].deliveries == 3


def test_an_entry_deleted_while_pending_is_dead_lettered_when_claimed() -> None:
    redis = FakeRedisStreams()
    job = redis.add_start("g1", "galaxy/engine:1.0.0")
    redis.consumer("c1").read_new(10, NO_WAIT)
    redis.delete_entry(job)

    assert redis.consumer("c2").claim_abandoned(NO_WAIT, 10) == []

    assert redis.answer_of(job)["reason"] == DELETED_REASON
    assert redis.owner_of(job) is None


def test_own_pending_entries_are_taken_back_after_an_id_each_counting_a_delivery() -> None:
    redis = FakeRedisStreams()
    jobs = [redis.add_stop(f"g{n}") for n in range(3)]
    redis.add_start("g9", "galaxy/engine:1.0.0")
    redis.consumer("c1").read_new(10, NO_WAIT)
    again = redis.consumer("c1")

    first = again.redeliver_own(JobKind.STOP, "", 2)
    rest = again.redeliver_own(JobKind.STOP, first[-1].entry_id, 2)

    assert [e.job for e in first + rest] == jobs
    assert [e.deliveries for e in first + rest] == [2, 2, 2]
    assert again.redeliver_own(JobKind.STOP, jobs[-1].entry_id, 2) == []
    assert redis.consumer("c2").redeliver_own(JobKind.STOP, "", 10) == []


def test_a_name_is_held_by_one_live_process_until_its_presence_expires() -> None:
    clock = ManualClock()
    redis = FakeRedisStreams(clock=clock)
    first = redis.consumer("c1", presence_ttl=timedelta(seconds=10))
    second = redis.consumer("c1", presence_ttl=timedelta(seconds=10))

    assert first.claim_name() and first.claim_name()
    assert not second.claim_name() and not second.keep_name()
    clock.advance(9)
    assert first.keep_name()
    clock.advance(9)
    assert not second.claim_name()
    clock.advance(2)
    assert second.claim_name()
    assert not first.keep_name()
    first.release_name()  # not its own any more: nothing happens
    assert redis.present("c1")
    second.release_name()
    assert not redis.present("c1")


def test_idle_consumers_without_presence_or_pending_entries_are_removed() -> None:
    clock = ManualClock()
    redis = FakeRedisStreams(clock=clock)
    redis.add_stop("g1")
    for name in ("busy", "idle", "alive"):
        redis.consumer(name).read_new(10, NO_WAIT)
    assert redis.consumer("alive", presence_ttl=timedelta(hours=1)).claim_name()
    me = redis.consumer("me")
    clock.advance(100)

    assert me.remove_idle_consumers(timedelta(seconds=200)) == []
    assert me.remove_idle_consumers(timedelta(seconds=50)) == ["idle"]
    assert set(redis.group_consumers) == {"busy", "alive"}


def test_lag_counts_entries_not_yet_read() -> None:
    redis = FakeRedisStreams()
    for n in range(3):
        redis.add_stop(f"g{n}")
    redis.add_start("g1", "x")
    streams = redis.consumer("c1")
    streams.read_new(2, NO_WAIT)

    assert streams.lag() == {"runtime:start_jobs": 1, "runtime:stop_jobs": 1}


def test_job_streams_down_raise_service_unavailable() -> None:
    redis = FakeRedisStreams()
    streams = redis.consumer("c1")
    streams.down = True
    with pytest.raises(ServiceUnavailable):
        streams.read_new(1, NO_WAIT)
    streams.down = False
    redis.down = True
    with pytest.raises(ServiceUnavailable):
        streams.claim_name()
    assert streams.calls == ["read_new", "claim_name"]


def test_read_new_waits_for_an_entry_up_to_its_block() -> None:
    redis = FakeRedisStreams()
    streams = redis.consumer("c1")

    assert streams.read_new(1, timedelta(milliseconds=5)) == []
    threading.Timer(0.01, lambda: redis.add_stop("g1")).start()
    (entry,) = streams.read_new(1, timedelta(seconds=5))
    assert entry.deliveries == 1


def test_unanswered_jobs_of_a_game_are_the_pending_and_the_undelivered_in_lobbys_order() -> None:
    clock = ManualClock()
    redis = FakeRedisStreams(clock=clock)
    delivered = redis.add_start("g1", "galaxy/engine:1.0.0")
    other_game = redis.add_start("g2", "galaxy/engine:1.0.0")
    answered = redis.add_start("g1", "galaxy/engine:1.0.0")
    streams = redis.consumer("c1")
    entries = {e.job: e for e in streams.read_new(10, NO_WAIT)}
    streams.answer(entries[answered], {"job_id": answered.entry_id})
    waiting_start = redis.add_start("g1", "galaxy/engine:1.0.1")
    waiting_stop = redis.add_stop("g1", "game_finished")
    gone = redis.add_start("g1", "galaxy/engine:1.0.2")
    assert len(redis.consumer("c2").read_new(1, NO_WAIT)) == 1  # waiting_start, to c2
    redis.delete_entry(gone)
    clock.advance(2.5)

    found = streams.pending_jobs("g1", 10)

    assert found.truncated is False
    assert [j.job for j in found.jobs] == [delivered, waiting_start, waiting_stop]
    first, second, third = found.jobs
    assert first.fields == {"game_id": "g1", "image_ref": "galaxy/engine:1.0.0"}
    assert (first.consumer, first.deliveries, first.idle) == ("c1", 1, timedelta(seconds=2.5))
    assert (second.consumer, second.delivered) == ("c2", True)
    assert (third.delivered, third.deliveries, third.idle) == (False, 0, None)
    assert third.fields == {"game_id": "g1", "reason": "game_finished"}
    assert [j.job for j in streams.pending_jobs("g2", 10).jobs] == [other_game]
    bounded = streams.pending_jobs("g1", 1)
    assert bounded.truncated is True
    assert [j.job for j in bounded.jobs] == [delivered, waiting_stop]
