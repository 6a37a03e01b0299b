"""The pure parts of the swarm backend: the service it asks for and how it reads tasks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rtmanager.adapters.swarm.services import service_create_args, volume_name
from rtmanager.adapters.swarm.tasks import (
    SwarmTaskEventStream,
    current_task,
    task_changes,
    task_view,
)
from rtmanager.domain import labels as galaxy_labels
from rtmanager.ports import ContainerSpec, EngineUser

CID = "c" * 64


def _spec(*, read_only: bool = False, pids: int = 128) -> ContainerSpec:
    return ContainerSpec(
        name="galaxy-game-g1",
        image_ref="galaxy/engine-stub:1.0.0",
        network="galaxy-engines",
        network_alias="galaxy-game-g1",
        labels=galaxy_labels.engine_labels(
            cluster="prod", game_id="g1", image_ref="galaxy/engine-stub:1.0.0"
        ),
        env={"GALAXY_GAME_ID": "g1"},
        state_host_path="/var/lib/galaxy/games/g1",
        state_mount_path="/var/lib/galaxy-game",
        memory_bytes=256 * 1024 * 1024,
        nano_cpus=500_000_000,
        pids_limit=pids,
        user=EngineUser(65534, 65534),
        log_max_bytes=1024 * 1024,
        log_max_files=3,
        read_only_rootfs=read_only,
    )


def _task(state: str, desired: str = "running", **extra: Any) -> dict[str, Any]:
    return {
        "ID": extra.get("id", "t1"),
        "NodeID": "n1",
        "DesiredState": desired,
        "CreatedAt": extra.get("created", "2026-12-07T05:00:00.000000001Z"),
        "Status": {
            "State": state,
            "Timestamp": "2026-12-07T05:00:01.123456789Z",
            "Err": extra.get("err", ""),
            "ContainerStatus": {
                "ContainerID": extra.get("cid", CID),
                "ExitCode": extra.get("code", 0),
            },
        },
    }


def test_the_service_is_made_with_no_replica_no_restarts_and_the_games_volume() -> None:
    args = service_create_args(
        _spec(),
        constraints=["node.labels.galaxy.engines==true"],
        volume_driver="local",
        stop_grace=timedelta(seconds=10),
        network="galaxy-engines",
    )
    assert args["name"] == "galaxy-game-g1"
    assert args["mode"] == {"replicated": {"Replicas": 0}}
    assert args["labels"][galaxy_labels.CLUSTER] == "prod"
    template = args["task_template"]
    container = template["ContainerSpec"]
    assert container["Labels"] == args["labels"]
    assert container["User"] == "65534:65534"
    assert container["CapabilityDrop"] == ["ALL"]
    assert container["Init"] is True
    assert container["Privileges"] == {"NoNewPrivileges": True}
    assert container["StopGracePeriod"] == 10_000_000_000
    assert "ReadOnly" not in container
    [mount] = container["Mounts"]
    assert (mount["Type"], mount["Source"], mount["Target"]) == (
        "volume",
        volume_name("g1"),
        "/var/lib/galaxy-game",
    )
    assert mount["VolumeOptions"]["DriverConfig"]["Name"] == "local"
    assert mount["VolumeOptions"]["Labels"][galaxy_labels.GAME_ID] == "g1"
    assert template["RestartPolicy"]["Condition"] == "none"
    assert template["Placement"]["Constraints"] == ["node.labels.galaxy.engines==true"]
    assert template["Resources"]["Limits"] == {
        "NanoCPUs": 500_000_000,
        "MemoryBytes": 256 * 1024 * 1024,
        "Pids": 128,
    }
    assert template["Resources"]["Reservations"] == {
        "NanoCPUs": 500_000_000,
        "MemoryBytes": 256 * 1024 * 1024,
    }
    assert template["LogDriver"] == {
        "Name": "json-file",
        "Options": {"max-size": "1048576", "max-file": "3"},
    }
    [network] = template["Networks"]
    assert (network["Target"], network["Aliases"]) == ("galaxy-engines", ["galaxy-game-g1"])


def test_a_read_only_engine_gets_a_tmpfs_and_no_constraints_mean_no_placement() -> None:
    args = service_create_args(
        _spec(read_only=True, pids=0),
        constraints=[],
        volume_driver="rexray",
        stop_grace=timedelta(seconds=3),
        network="galaxy-engines",
    )
    template = args["task_template"]
    container = template["ContainerSpec"]
    assert container["ReadOnly"] is True
    assert [m["Type"] for m in container["Mounts"]] == ["volume", "tmpfs"]
    assert container["Mounts"][0]["VolumeOptions"]["DriverConfig"]["Name"] == "rexray"
    assert "Placement" not in template
    assert "Pids" not in template["Resources"]["Limits"]


def test_a_task_runs_only_when_reported_and_desired_running_on_a_live_node() -> None:
    assert task_view(_task("running"), "ready").running
    lost = task_view(_task("running"), "down")
    assert not lost.running and lost.state == "node-down" and lost.exit_code is None
    going = task_view(_task("running", desired="shutdown"), "ready")
    assert not going.running and going.state == "stopping"
    failed = task_view(
        _task("failed", desired="shutdown", code=3, err="task: non-zero exit (3)"), "ready"
    )
    assert not failed.running and failed.exit_code == 3 and failed.error.endswith("(3)")
    assert failed.finished_at is not None and failed.started_at is None
    pending = task_view(_task("pending", cid=""), None)
    assert not pending.running and pending.exit_code is None and pending.container_id == ""


def test_the_newest_task_stands_for_the_service() -> None:
    old = _task("shutdown", id="old", created="2026-12-07T04:00:00Z")
    new = _task("running", id="new", created="2026-12-07T05:00:00Z")
    assert current_task([new, old]) is new
    assert current_task([]) is None


def test_polls_turn_into_start_and_die_events() -> None:
    a, b, c = "a" * 64, "b" * 64, "d" * 64
    before = {a: ("g1", True), b: ("g2", True), c: ("g3", False)}
    after = {a: ("g1", True, None), b: ("g2", False, 0), c: ("g3", True, None)}
    assert sorted(task_changes(before, after)) == [("die", b, "g2", 0), ("start", c, "g3", None)]
    assert task_changes({a: ("g1", True)}, {}) == [("die", a, "g1", None)]
    assert task_changes({}, {a: ("g1", False, 3)}) == []


class _Polls:
    """Stands in for the adapter: hands out prepared polls, then closes the stream."""

    def __init__(self, *polls: dict[str, tuple[str, bool, int | None]]) -> None:
        self.polls = list(polls)
        self.last: dict[str, tuple[str, bool, int | None]] = {}
        self.stream: SwarmTaskEventStream | None = None

    def task_snapshot(self) -> dict[str, tuple[str, bool, int | None]]:
        if self.polls:
            self.last = self.polls.pop(0)
        elif self.stream is not None:
            self.stream.close()  # nothing changes in this last poll
        return self.last


def test_the_task_poll_streams_engines_starting_and_ending_until_closed() -> None:
    a, b = "a" * 64, "b" * 64
    polls = _Polls(
        {a: ("g1", True, None), b: ("g2", False, None)},
        {a: ("g1", False, None), b: ("g2", True, None)},
        {b: ("g2", False, 3)},
    )
    stream = SwarmTaskEventStream(polls, {a: ("g1", True, None)}, interval=0.0)
    polls.stream = stream
    events = [(e.action, e.container_id, e.game_id, e.exit_code) for e in stream]
    assert events == [
        ("die", a, "g1", None),  # e.g. its node went down
        ("start", b, "g2", None),
        ("die", b, "g2", 3),
    ]
