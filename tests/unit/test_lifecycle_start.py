"""Start (SPEC §3 Start) against in-memory fakes: every branch of `StartService`."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from rtmanager.domain import labels
from rtmanager.domain.errors import EngineNetworkGone, ErrorCode
from rtmanager.domain.operation import OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.recorder import OperationResult
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.ports import ContainerSpec, EngineUser, PullPolicy
from tests.unit.fakes import CRASHES, HEALTHY, NEVER_HEALTHY, UNHEALTHY, EngineBehaviour
from tests.unit.harness import (
    CLUSTER,
    CPUS,
    ENGINE_USER,
    EXTRA_LABELS,
    IMAGE,
    IMAGE_MISSING,
    IMAGE_PATCH,
    IMAGE_PULLABLE,
    LOG_MAX_BYTES,
    LOG_MAX_FILES,
    MEMORY,
    NETWORK,
    PIDS,
    STATE_MOUNT,
    Harness,
    failure_code,
    make_harness,
)

GAME = "game-1"


def start(
    h: Harness, image_ref: str = IMAGE, game_id: str = GAME, source_ref: str = ""
) -> OperationResult:
    return h.start.handle(
        StartRequest(
            game_id=game_id,
            image_ref=image_ref,
            op_source=OpSource.LOBBY_STREAM,
            source_ref=source_ref,
        )
    )


def created_spec(h: Harness) -> ContainerSpec:
    (call,) = h.docker.method_calls("create")
    spec = call.args[0]
    assert isinstance(spec, ContainerSpec)
    return spec


# Another user than the test process's own.
OTHER = EngineUser(65534, 65534)


def owner(path: Path) -> EngineUser:
    status = path.lstat()
    return EngineUser(status.st_uid, status.st_gid)


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="giving files away needs root")


# --- a new game ---------------------------------------------------------------------


def test_start_of_new_game_records_running_runtime_with_endpoint_state_path_and_network(
    h: Harness,
) -> None:
    result = start(h)

    assert result.ok, result.failure
    record = h.record(GAME)
    assert record == result.record
    assert record.status is RuntimeStatus.RUNNING
    assert record.engine_endpoint == "http://galaxy-game-game-1:8080"
    assert record.state_path == str(h.settings.state_dir(GAME))
    assert record.docker_network == NETWORK
    assert record.current_image_ref == IMAGE
    assert record.current_container_id in h.docker.containers
    assert h.docker.containers[record.current_container_id].running
    assert record.started_at == record.created_at == record.last_op_at
    assert record.stopped_at is None and record.removed_at is None


def test_start_creates_container_with_engine_name_labels_env_mount_and_limits(h: Harness) -> None:
    start(h)

    spec = created_spec(h)
    assert spec.name == "galaxy-game-game-1"
    assert spec.network_alias == "galaxy-game-game-1"
    assert spec.network == NETWORK
    assert spec.image_ref == IMAGE
    assert spec.labels == {
        **EXTRA_LABELS,
        labels.OWNER: labels.OWNER_VALUE,
        labels.CLUSTER: CLUSTER,
        labels.GAME_ID: GAME,
        labels.IMAGE_REF: IMAGE,
    }
    assert spec.env["GALAXY_GAME_ID"] == GAME
    assert spec.env["GALAXY_STATE_DIR"] == str(STATE_MOUNT)
    assert spec.state_host_path == str(h.settings.state_dir(GAME))
    assert spec.state_mount_path == str(STATE_MOUNT)
    assert spec.memory_bytes == MEMORY
    assert spec.nano_cpus == int(CPUS * 1_000_000_000)
    assert spec.pids_limit == PIDS
    assert spec.user == ENGINE_USER
    assert spec.log_max_bytes == LOG_MAX_BYTES
    assert spec.log_max_files == LOG_MAX_FILES
    assert spec.read_only_rootfs is False


@needs_root
def test_start_runs_the_engine_as_the_configured_user_with_the_configured_log_rotation(
    tmp_path: Path,
) -> None:
    h = make_harness(
        tmp_path, engine_user=OTHER, engine_log_max_size=20 * 1024 * 1024, engine_log_max_files=7
    )

    assert start(h).ok

    spec = created_spec(h)
    assert str(spec.user) == "65534:65534"
    assert (spec.log_max_bytes, spec.log_max_files) == (20 * 1024 * 1024, 7)


def test_start_with_read_only_setting_asks_for_read_only_root_filesystem(tmp_path: Path) -> None:
    h = make_harness(tmp_path, engine_read_only=True)

    start(h)

    assert created_spec(h).read_only_rootfs is True


def test_extra_container_labels_cannot_override_ownership_labels(tmp_path: Path) -> None:
    h = make_harness(
        tmp_path, container_labels={labels.OWNER: "someone-else", labels.CLUSTER: "staging"}
    )

    start(h)

    spec = created_spec(h)
    assert spec.labels[labels.OWNER] == labels.OWNER_VALUE
    assert spec.labels[labels.CLUSTER] == CLUSTER


def test_start_creates_the_state_directory_under_the_state_root(h: Harness) -> None:
    start(h)

    state_dir = h.settings.state_dir(GAME)
    assert state_dir.is_dir()
    assert state_dir.parent == h.settings.state_root.resolve()
    assert state_dir.name == GAME


def test_start_keeps_an_existing_state_directory_and_its_files(h: Harness) -> None:
    state_dir = h.settings.state_dir(GAME)
    state_dir.mkdir()
    (state_dir / "world.dat").write_text("turn 42")

    assert start(h).ok

    assert (state_dir / "world.dat").read_text() == "turn 42"


# --- the state directory belongs to the engine's user ---------------------------------


@needs_root
def test_start_gives_a_new_state_directory_to_the_engine_user(tmp_path: Path) -> None:
    h = make_harness(tmp_path, engine_user=OTHER)

    assert start(h).ok

    state_dir = h.settings.state_dir(GAME)
    assert owner(state_dir) == OTHER
    assert owner(h.settings.state_root) == EngineUser(0, 0)
    # A directory already theirs is not walked again on the next start.
    (state_dir / "put-there-by-root").write_text("x")
    assert h.stop.handle(StopRequest(game_id=GAME, op_source=OpSource.GM_REST)).ok
    assert start(h).ok
    assert owner(state_dir / "put-there-by-root") == EngineUser(0, 0)


@needs_root
def test_start_gives_the_engine_user_what_engines_of_another_user_left_in_the_state_directory(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, engine_user=OTHER)
    state_dir = h.settings.state_dir(GAME)
    (state_dir / "saves").mkdir(parents=True)
    (state_dir / "saves" / "turn-41.dat").write_text("turn 41")
    (state_dir / "world.dat").write_text("turn 42")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the game's")
    # An engine could leave a link to anything: the link is given, never its target.
    (state_dir / "link").symlink_to(outside)
    (state_dir / "dir-link").symlink_to(tmp_path)

    assert start(h).ok

    for path in (
        state_dir,
        state_dir / "saves",
        state_dir / "saves" / "turn-41.dat",
        state_dir / "world.dat",
        state_dir / "link",
        state_dir / "dir-link",
    ):
        assert owner(path) == OTHER, path
    assert owner(outside) == owner(tmp_path) == EngineUser(0, 0)
    assert (state_dir / "world.dat").read_text() == "turn 42"


def test_start_whose_state_directory_cannot_be_given_to_the_engine_user_fails_before_docker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, engine_user=OTHER)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)

    result = start(h)

    assert failure_code(result) == ErrorCode.INTERNAL
    assert result.failure is not None
    message = result.failure.message
    assert str(h.settings.state_dir(GAME)) in message
    assert "engine user 65534:65534" in message
    assert "Operation not permitted" in message
    assert h.docker.call_names("create") == []
    assert h.kinds(GAME) == [(OpKind.START, "failure")]


def test_start_ensures_the_engine_network_with_owner_and_cluster_labels(h: Harness) -> None:
    start(h)

    assert h.docker.networks[NETWORK] == {
        **EXTRA_LABELS,
        labels.OWNER: labels.OWNER_VALUE,
        labels.CLUSTER: CLUSTER,
    }


def test_start_acts_on_docker_in_order_pull_network_create_start(h: Harness) -> None:
    start(h)

    assert h.docker.call_names() == [
        "ensure_image",
        "ensure_network",
        "create",
        "start",
    ]


def test_start_commits_the_record_and_one_success_row_in_one_transaction(h: Harness) -> None:
    result = start(h, source_ref="1700000000000-0")

    (commit,) = h.units_of_work.commits()
    assert [r.game_id for r in commit.records] == [GAME]
    (row,) = commit.operations
    assert h.rows() == [row]
    assert row.id == result.operation_id
    assert row.op_kind is OpKind.START
    assert row.op_source is OpSource.LOBBY_STREAM
    assert row.outcome is Outcome.SUCCESS
    assert row.source_ref == "1700000000000-0"
    assert row.image_ref == IMAGE
    assert row.container_id == h.record(GAME).current_container_id
    assert row.error_code == "" and row.error_message == ""
    assert row.finished_at is not None and row.finished_at >= row.started_at


def test_start_releases_the_game_lease_after_success(h: Harness) -> None:
    start(h)

    assert h.leases.acquires_of(GAME) == 1
    assert h.leases.all_released
    assert h.lock.held_games == []


# --- replays and existing records ---------------------------------------------------


def test_start_of_running_runtime_with_same_image_is_idempotent_and_creates_no_container(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)

    result = start(h, source_ref="replayed-job")

    assert result.ok
    assert result.record == before
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []
    assert len(h.docker.containers) == 1
    row = h.only_row(GAME)
    assert (row.op_kind, row.outcome) == (OpKind.START, Outcome.SUCCESS)
    assert row.container_id == before.current_container_id
    assert row.source_ref == "replayed-job"
    assert h.leases.all_released


def test_start_of_running_runtime_with_another_image_is_conflict_not_race(h: Harness) -> None:
    before = h.seed_running(GAME)

    result = start(h, image_ref=IMAGE_PATCH)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is False
    assert "PatchRuntime" in result.failure.message
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []
    row = h.only_row(GAME)
    assert (row.outcome, row.error_code) == (Outcome.FAILURE, "conflict")
    assert h.leases.all_released


def test_start_of_removed_runtime_is_conflict(h: Harness) -> None:
    before = h.seed_removed(GAME)

    result = start(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and not result.failure.race
    assert h.record(GAME) == before
    assert h.docker.mutating_calls() == []
    assert h.only_row(GAME).error_code == "conflict"


def test_start_of_stopped_runtime_recreates_container_removes_old_one_and_keeps_created_at(
    h: Harness,
) -> None:
    before = h.seed_stopped(GAME)
    old_id = before.current_container_id

    result = start(h)

    assert result.ok, result.failure
    record = h.record(GAME)
    assert record.status is RuntimeStatus.RUNNING
    assert record.current_container_id != old_id
    assert old_id not in h.docker.containers
    assert h.docker.containers[record.current_container_id].running
    assert record.created_at == before.created_at
    assert record.started_at is not None and record.started_at > before.stopped_at  # type: ignore[operator]
    assert record.stopped_at is None
    assert record.engine_endpoint == before.engine_endpoint
    assert h.docker.call_names("remove", "create") == [
        "remove",
        "create",
    ]


def test_start_of_stopped_runtime_without_container_creates_one(h: Harness) -> None:
    h.seed_stopped(GAME, container=False)

    result = start(h)

    assert result.ok, result.failure
    assert h.record(GAME).status is RuntimeStatus.RUNNING
    assert h.docker.call_names("remove") == []
    assert len(h.docker.containers) == 1


def test_start_of_stopped_runtime_may_use_another_image(h: Harness) -> None:
    h.seed_stopped(GAME)

    result = start(h, image_ref=IMAGE_PATCH)

    assert result.ok, result.failure
    assert h.record(GAME).current_image_ref == IMAGE_PATCH


def test_start_of_running_runtime_whose_container_is_gone_recreates_it(h: Harness) -> None:
    before = h.seed_running(GAME, container=False)

    result = start(h)

    assert result.ok, result.failure
    record = h.record(GAME)
    assert record.status is RuntimeStatus.RUNNING
    assert record.current_container_id != before.current_container_id
    assert h.docker.containers[record.current_container_id].running
    assert record.created_at == before.created_at
    assert h.docker.call_names("create") == ["create"]


def test_start_of_running_runtime_whose_container_exited_replaces_it(h: Harness) -> None:
    before = h.seed_running(GAME)
    h.docker.containers[before.current_container_id].state = "exited"

    result = start(h)

    assert result.ok, result.failure
    assert before.current_container_id not in h.docker.containers
    assert h.record(GAME).current_container_id != before.current_container_id


def test_start_removes_an_orphan_container_of_ours_holding_the_name(h: Harness) -> None:
    # Left behind by an operation interrupted before it could record it.
    orphan = h.docker.add_engine(GAME, IMAGE)

    result = start(h)

    assert result.ok, result.failure
    assert orphan not in h.docker.containers
    assert ("remove", (orphan, True)) in h.docker.calls


@pytest.mark.parametrize(
    "foreign_labels",
    [
        pytest.param({}, id="no-owner-label"),
        pytest.param({labels.OWNER: "someone-else"}, id="other-owner"),
        pytest.param(
            labels.engine_labels(cluster="staging", game_id=GAME, image_ref=IMAGE),
            id="other-cluster",
        ),
        pytest.param({labels.OWNER: labels.OWNER_VALUE}, id="owner-without-cluster-is-default"),
    ],
)
def test_start_with_foreign_container_holding_the_name_is_conflict_and_leaves_it_untouched(
    h: Harness, foreign_labels: dict[str, str]
) -> None:
    foreign = h.docker.add_container(
        name="galaxy-game-game-1", image_ref="nginx:latest", labels=foreign_labels
    )

    result = start(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and not result.failure.race
    assert "does not own is in the way" in result.failure.message
    assert h.docker.containers[foreign].running
    # The create finds the name taken; nothing is stopped, removed or started.
    assert h.docker.call_names() == ["ensure_image", "ensure_network", "create"]
    assert GAME not in h.store.records
    assert h.only_row(GAME).error_code == "conflict"
    assert h.leases.all_released


def test_start_of_running_runtime_whose_container_is_foreign_is_conflict(h: Harness) -> None:
    before = h.seed_running(GAME)
    h.docker.containers[before.current_container_id].labels[labels.CLUSTER] = "staging"

    result = start(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.docker.mutating_calls() == []
    assert h.record(GAME) == before


def test_start_whose_name_is_taken_again_after_removing_our_orphan_is_conflict(
    h: Harness,
) -> None:
    h.docker.add_engine(GAME, IMAGE)
    # Another orphan of ours takes the name again before the second create.
    h.docker.before(
        "remove", lambda *_: h.docker.before("create", lambda *_: h.docker.add_engine(GAME, IMAGE))
    )

    result = start(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert h.docker.call_names("create", "remove") == ["create", "remove", "create"]
    assert GAME not in h.store.records


# --- what the backend remembered is gone --------------------------------------------


def test_start_whose_image_was_removed_since_it_was_seen_follows_the_pull_policy(
    h: Harness,
) -> None:
    # The backend took the image as present; it is gone by the create, and
    # the registry has it.
    h.docker.pullable.add(IMAGE)

    def remove_image_once(*_: object) -> None:
        h.docker.images.discard(IMAGE)
        h.docker.before("create", None)

    h.docker.before("create", remove_image_once)

    result = start(h)

    assert result.ok, result.failure
    assert h.docker.call_names() == [
        "ensure_image",
        "ensure_network",
        "create",
        "ensure_image",
        "create",
        "start",
    ]
    assert h.docker.pulled == [IMAGE]


def test_start_whose_image_was_removed_since_it_was_seen_under_policy_never_is_image_pull_failed(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, image_pull_policy=PullPolicy.NEVER)
    h.docker.before("create", lambda *_: h.docker.images.discard(IMAGE))

    result = start(h)

    assert failure_code(result) == ErrorCode.IMAGE_PULL_FAILED
    assert "policy is never" in (result.failure.message if result.failure else "")
    assert h.docker.pulled == []
    assert h.docker.containers == {}
    assert GAME not in h.store.records


def test_start_whose_engine_network_is_gone_ensures_it_again_and_retries_once(
    h: Harness,
) -> None:
    h.docker.fail("start", error=EngineNetworkGone("network galaxy-engines not found"))

    result = start(h)

    assert result.ok, result.failure
    assert h.docker.call_names() == [
        "ensure_image",
        "ensure_network",
        "create",
        "start",
        "remove",
        "ensure_network",
        "create",
        "start",
    ]
    assert len(h.docker.containers) == 1


def test_start_whose_engine_network_stays_gone_is_container_start_failed(h: Harness) -> None:
    h.docker.fail("start", times=2, error=EngineNetworkGone("network galaxy-engines not found"))

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert h.docker.call_names("create", "start", "remove") == [
        "create",
        "start",
        "remove",
        "create",
        "start",
        "remove",
    ]
    assert h.docker.containers == {}
    assert GAME not in h.store.records


def test_start_whose_engine_network_is_gone_at_create_ensures_it_again(h: Harness) -> None:
    h.docker.fail("create", error=EngineNetworkGone("network galaxy-engines not found"))

    result = start(h)

    assert result.ok, result.failure
    assert h.docker.call_names("ensure_network", "create") == [
        "ensure_network",
        "create",
        "ensure_network",
        "create",
    ]


# --- validation ---------------------------------------------------------------------


def test_start_of_image_outside_the_allowlist_is_image_not_allowed(h: Harness) -> None:
    result = start(h, image_ref="evil/miner:1.0.0")

    assert failure_code(result) == ErrorCode.IMAGE_NOT_ALLOWED
    assert h.docker.calls == []
    assert h.leases.acquired == []
    row = h.only_row(GAME)
    assert (row.error_code, row.image_ref) == ("image_not_allowed", "evil/miner:1.0.0")


def test_allowlist_prefix_matches_whole_path_components(h: Harness) -> None:
    result = start(h, image_ref="galaxyevil/engine:1.0.0")

    assert failure_code(result) == ErrorCode.IMAGE_NOT_ALLOWED


@pytest.mark.parametrize("image_ref", ["", "Galaxy/Engine:1.0.0", "galaxy/engine:", "galaxy//x"])
def test_start_of_malformed_image_is_invalid_request(h: Harness, image_ref: str) -> None:
    result = start(h, image_ref=image_ref)

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert h.docker.calls == []
    assert h.leases.acquired == []
    assert h.only_row(GAME).error_code == "invalid_request"


@pytest.mark.parametrize(
    "game_id", ["../etc", "", "Game-1", "game 1", "game/1", "-game", "g" * 52, "x" * 1024]
)
def test_start_of_malformed_game_id_is_invalid_request_without_audit_row_or_lease(
    h: Harness, game_id: str
) -> None:
    result = start(h, game_id=game_id)

    assert failure_code(result) == ErrorCode.INVALID_REQUEST
    assert result.outcome is Outcome.FAILURE
    assert h.rows() == []
    assert h.units_of_work.units == []
    assert h.leases.acquired == []
    assert h.docker.calls == []
    assert list(h.settings.state_root.iterdir()) == []


# --- images -------------------------------------------------------------------------


def test_start_of_image_that_cannot_be_pulled_is_image_pull_failed_and_creates_nothing(
    h: Harness,
) -> None:
    result = start(h, image_ref=IMAGE_MISSING)

    assert failure_code(result) == ErrorCode.IMAGE_PULL_FAILED
    assert h.docker.call_names("create") == []
    assert h.docker.containers == {}
    assert GAME not in h.store.records
    assert h.only_row(GAME).error_code == "image_pull_failed"
    assert h.leases.all_released


def test_start_pulls_a_missing_image_that_can_be_pulled(h: Harness) -> None:
    result = start(h, image_ref=IMAGE_PULLABLE)

    assert result.ok, result.failure
    assert h.docker.pulled == [IMAGE_PULLABLE]


@pytest.mark.parametrize("policy", list(PullPolicy))
def test_start_passes_the_configured_pull_policy_to_docker(
    tmp_path: Path, policy: PullPolicy
) -> None:
    h = make_harness(tmp_path, image_pull_policy=policy)
    h.docker.pullable.add(IMAGE)

    start(h)

    assert h.docker.method_calls("ensure_image")[0].args == (IMAGE, policy)


def test_start_with_pull_policy_never_and_absent_image_is_image_pull_failed(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, image_pull_policy=PullPolicy.NEVER)

    result = start(h, image_ref=IMAGE_PULLABLE)

    assert failure_code(result) == ErrorCode.IMAGE_PULL_FAILED
    assert h.docker.pulled == []


# --- the engine does not come up ----------------------------------------------------


def test_start_of_crashing_engine_is_container_start_failed_with_log_tail_and_container_removed(
    h: Harness,
) -> None:
    h.docker.behaviours[IMAGE] = CRASHES

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert result.failure is not None
    assert "exited with code 3" in result.failure.message
    assert "panic: corrupt state file" in result.failure.message
    assert h.docker.containers == {}
    assert GAME not in h.store.records
    row = h.only_row(GAME)
    assert row.error_code == "container_start_failed"
    assert "panic: corrupt state file" in row.error_message
    assert h.leases.all_released


def test_start_of_engine_dying_within_the_settle_period_is_container_start_failed(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, start_settle=timedelta(milliseconds=30))
    h.docker.behaviours[IMAGE] = EngineBehaviour(exits_on_inspect=2, exit_code=137)

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert result.failure is not None and "code 137" in result.failure.message
    assert h.docker.containers == {}


def test_start_without_health_check_succeeds_once_the_engine_outlives_the_settle_period(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path, start_settle=timedelta(milliseconds=30))

    result = start(h)

    assert result.ok, result.failure
    assert len(h.docker.method_calls("inspect")) >= 2


def test_start_of_unhealthy_engine_is_container_start_failed(h: Harness) -> None:
    h.docker.behaviours[IMAGE] = UNHEALTHY

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert result.failure is not None and "unhealthy" in result.failure.message
    assert "health check: 503" in result.failure.message
    assert h.docker.containers == {}
    assert GAME not in h.store.records


def test_start_of_engine_never_becoming_healthy_times_out_as_container_start_failed(
    h: Harness,
) -> None:
    h.docker.behaviours[IMAGE] = NEVER_HEALTHY

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert result.failure is not None
    assert "did not become healthy within 0.15s" in result.failure.message
    assert "still warming up" in result.failure.message
    assert h.docker.containers == {}
    assert h.leases.all_released


def test_start_waits_for_the_engine_to_become_healthy(h: Harness) -> None:
    h.docker.behaviours[IMAGE] = EngineBehaviour(healthy_after_inspects=2)

    result = start(h)

    assert result.ok, result.failure
    assert len(h.docker.method_calls("inspect")) >= 2


def test_start_of_healthy_engine_succeeds_at_once(h: Harness) -> None:
    h.docker.behaviours[IMAGE] = HEALTHY

    assert start(h).ok


def test_start_refused_by_docker_is_container_start_failed_and_container_removed(
    h: Harness,
) -> None:
    h.docker.behaviours[IMAGE] = EngineBehaviour(refuses_start=True)

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert h.docker.containers == {}
    assert h.docker.call_names()[-1] == "remove"


def test_start_still_fails_cleanly_when_the_failed_container_cannot_be_removed(
    h: Harness,
) -> None:
    h.docker.behaviours[IMAGE] = CRASHES
    h.docker.fail("remove")

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert GAME not in h.store.records
    assert h.leases.all_released


# --- leases and outages -------------------------------------------------------------


def test_start_when_the_lease_is_busy_is_conflict_race_and_touches_nothing(h: Harness) -> None:
    h.leases.busy.add(GAME)

    result = start(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.docker.calls == []
    assert GAME not in h.store.records
    assert h.only_row(GAME).error_code == "conflict"
    assert h.leases.released == []


def test_start_when_redis_is_down_is_service_unavailable(h: Harness) -> None:
    h.leases.go_down()

    result = start(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.calls == []
    assert h.only_row(GAME).error_code == "service_unavailable"


@pytest.mark.parametrize("method", ["inspect", "ensure_image", "ensure_network", "create"])
def test_start_when_docker_fails_before_the_container_exists_is_service_unavailable(
    h: Harness, method: str
) -> None:
    h.docker.fail(method)

    result = start(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.containers == {}
    assert GAME not in h.store.records
    assert h.leases.all_released


def test_start_when_docker_fails_starting_the_container_removes_it(h: Harness) -> None:
    h.docker.fail("start")

    result = start(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.containers == {}


def test_start_whose_record_commit_fails_removes_the_container_and_reports_failure(
    h: Harness,
) -> None:
    # Unit 1 reads the record, unit 2 commits it: fail the commit of unit 2.
    h.units_of_work.fail_next(at="commit", after=1)

    result = start(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.containers == {}
    assert h.docker.call_names()[-1] == "remove"
    assert GAME not in h.store.records
    assert h.kinds(GAME) == [(OpKind.START, "failure")]
    assert h.leases.all_released


def test_start_when_the_database_is_down_fails_before_touching_docker(h: Harness) -> None:
    h.units_of_work.down = True

    result = start(h)

    assert failure_code(result) == ErrorCode.SERVICE_UNAVAILABLE
    assert h.docker.calls == []
    assert h.rows() == []
    assert h.leases.all_released


def test_start_losing_a_race_for_the_record_removes_its_container_and_is_conflict_race(
    h: Harness,
) -> None:
    other = h.docker.add_engine("other", IMAGE)

    def someone_records_the_game_meanwhile(container_id: str) -> None:
        h.store.put(h.running_record(GAME, other))

    h.docker.before("start", someone_records_the_game_meanwhile)

    result = start(h)

    assert failure_code(result) == ErrorCode.CONFLICT
    assert result.failure is not None and result.failure.race is True
    assert h.record(GAME).current_container_id == other
    assert set(h.docker.containers) == {other}


def test_inner_start_runs_without_taking_the_lease_and_names_its_parent(h: Harness) -> None:
    patch = h.recorder.begin(
        game_id=GAME, op_kind=OpKind.PATCH, op_source=OpSource.ADMIN_REST, source_ref="corr-1"
    )

    result = h.start.run(patch, IMAGE)

    assert result.ok, result.failure
    assert h.leases.acquired == []
    row = h.only_row(GAME)
    assert (row.op_kind, row.source_ref, row.image_ref) == (OpKind.START, "corr-1", IMAGE)
    assert patch.reserved_id > 0
    assert (row.parent_op_kind, row.parent_operation_id) == (OpKind.PATCH, patch.reserved_id)


# --- clocks and unexpected errors --------------------------------------------------


def test_start_whose_commit_fails_unexpectedly_removes_the_container_and_is_internal(
    h: Harness,
) -> None:
    h.store.fail_next_appends(error=RuntimeError("driver bug"))

    result = start(h)

    assert failure_code(result) == ErrorCode.INTERNAL
    assert h.docker.containers == {}
    assert GAME not in h.store.records
    assert h.leases.all_released


def test_start_of_record_stamped_ahead_by_a_skewed_replica_keeps_timestamps_in_order(
    h: Harness,
) -> None:
    # A replica whose clock runs ahead stopped the game "in the future".
    stopped = h.seed_stopped(GAME)
    future = utc_now() + timedelta(minutes=5)
    h.store.put(
        replace(stopped, created_at=future, started_at=future, stopped_at=future, last_op_at=future)
    )

    result = start(h)

    assert result.ok, result.failure
    record = h.record(GAME)
    assert record.last_op_at >= future
    assert record.started_at is not None and record.started_at >= record.created_at
    assert h.docker.containers[record.current_container_id].running


def test_failed_start_of_stopped_runtime_does_not_leave_record_pointing_at_removed_container(
    h: Harness,
) -> None:
    before = h.seed_stopped(GAME)
    h.docker.behaviours[IMAGE] = CRASHES

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    assert before.current_container_id not in h.docker.containers
    record = h.record(GAME)
    assert record.status is RuntimeStatus.STOPPED
    assert record.current_container_id == ""
    assert record.current_image_ref == before.current_image_ref
    # The unbinding commits with the failure row, not on its own.
    last = h.units_of_work.commits()[-1]
    assert last.records == (record,)
    assert [row.outcome for row in last.operations] == [Outcome.FAILURE]


def test_failed_start_of_running_runtime_with_exited_container_records_it_stopped(
    h: Harness,
) -> None:
    before = h.seed_running(GAME)
    h.docker.containers[before.current_container_id].state = "exited"
    h.docker.behaviours[IMAGE] = CRASHES

    result = start(h)

    assert failure_code(result) == ErrorCode.CONTAINER_START_FAILED
    record = h.record(GAME)
    assert record.status is RuntimeStatus.STOPPED
    assert record.current_container_id == ""
    assert h.docker.containers == {}
