"""The single-host engine container's create arguments (`container_create_args`):
the hardening every engine gets and what comes from its spec, without a daemon."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import docker
import pytest

from rtmanager.adapters.docker.containers import container_create_args
from rtmanager.ports import ContainerSpec, EngineUser

# A fixed API version: docker-py asks the daemon for nothing.
API = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version="1.41")


def spec(**changes: Any) -> ContainerSpec:
    base = ContainerSpec(
        name="galaxy-game-g1",
        image_ref="galaxy/engine-stub:1.0.0",
        network="galaxy-engines",
        network_alias="galaxy-game-g1",
        labels={"com.galaxy.rtmanager.game_id": "g1"},
        env={"GALAXY_GAME_ID": "g1"},
        state_host_path="/var/lib/galaxy/games/g1",
        state_mount_path="/var/lib/galaxy-game",
        memory_bytes=256 * 1024 * 1024,
        nano_cpus=500_000_000,
        pids_limit=128,
        user=EngineUser(10001, 10001),
        log_max_bytes=1024 * 1024,
        log_max_files=3,
    )
    return replace(base, **changes)


def test_every_engine_is_hardened_the_same_way() -> None:
    host = container_create_args(API, spec(), "galaxy-engines")["host_config"]
    assert host["Init"] is True
    assert host["RestartPolicy"] == {"Name": "no"}
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges=true"]
    assert not host.get("Privileged", False)  # docker-py leaves out its false default
    # Memory plus swap equal to memory: no swap.
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024 * 1024
    assert (host["NanoCpus"], host["PidsLimit"]) == (500_000_000, 128)
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": str(1024 * 1024), "max-file": "3"},
    }


def test_the_state_directory_is_a_typed_bind_mount_and_the_network_carries_the_alias() -> None:
    args = container_create_args(API, spec(), "net-id-1")
    (mount,) = args["host_config"]["Mounts"]
    assert (mount["Type"], mount["Source"], mount["Target"], mount["ReadOnly"]) == (
        "bind",
        "/var/lib/galaxy/games/g1",
        "/var/lib/galaxy-game",
        False,
    )
    assert args["host_config"]["NetworkMode"] == "net-id-1"
    endpoint = args["networking_config"]["EndpointsConfig"]["net-id-1"]
    assert endpoint["Aliases"] == ["galaxy-game-g1"]


def test_identity_labels_environment_and_user_come_from_the_spec() -> None:
    args = container_create_args(API, spec(), "galaxy-engines")
    assert (args["image"], args["name"], args["hostname"]) == (
        "galaxy/engine-stub:1.0.0",
        "galaxy-game-g1",
        "galaxy-game-g1",
    )
    assert args["labels"] == {"com.galaxy.rtmanager.game_id": "g1"}
    assert args["environment"] == {"GALAXY_GAME_ID": "g1"}
    assert args["user"] == "10001:10001"


@pytest.mark.parametrize("read_only", [False, True])
def test_a_read_only_root_gets_a_bounded_tmp(read_only: bool) -> None:
    host = container_create_args(API, spec(read_only_rootfs=read_only), "n")["host_config"]
    if read_only:
        assert host["ReadonlyRootfs"] is True
        assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=64m"}
    else:
        assert "ReadonlyRootfs" not in host
        assert "Tmpfs" not in host


def test_unset_limits_are_left_to_docker() -> None:
    host = container_create_args(API, spec(memory_bytes=0, nano_cpus=0, pids_limit=0), "n")[
        "host_config"
    ]
    for key in ("Memory", "MemorySwap", "NanoCpus", "PidsLimit"):
        assert key not in host
