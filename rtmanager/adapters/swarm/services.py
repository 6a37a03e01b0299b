"""The swarm backend's engine service: a `ContainerSpec` as the arguments of Docker's create.

What a game's service is made of (its volume, limits, hardening, log
rotation, placement and network) is one pure function, apart from the
requests, so that it reads and is unit-tested on its own;
`SwarmEngineAdapter.create` sends what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from docker.types import (
    ContainerSpec as SwarmContainerSpec,
)
from docker.types import (
    DriverConfig,
    Mount,
    NetworkAttachmentConfig,
    Placement,
    Resources,
    RestartPolicy,
    ServiceMode,
    TaskTemplate,
)

from rtmanager.domain import labels as galaxy_labels
from rtmanager.ports import ContainerSpec

__all__ = ["service_create_args", "volume_name"]

_TMPFS_BYTES = 64 * 1024 * 1024


def volume_name(game_id: str) -> str:
    """The named volume holding a game's state."""
    return f"galaxy-state-{game_id}"


def _game_of(spec: ContainerSpec) -> str:
    return spec.labels.get(galaxy_labels.GAME_ID) or spec.name.removeprefix("galaxy-game-")


def service_create_args(
    spec: ContainerSpec,
    *,
    constraints: Iterable[str],
    volume_driver: str,
    stop_grace: timedelta,
    network: str,
) -> dict[str, Any]:
    """The arguments of `APIClient.create_service` for one game's engine service.

    Pure, so it is unit-tested: 0 replicas, restart condition `none`, the
    labels on the service and its container, the game's volume, limits and
    reservations, the hardening swarm can express, json-file log rotation,
    placement constraints and the network alias.
    """
    game_id = _game_of(spec)
    volume_labels = {
        key: value
        for key, value in spec.labels.items()
        if key in (galaxy_labels.OWNER, galaxy_labels.CLUSTER, galaxy_labels.GAME_ID)
    }
    mounts = [
        Mount(
            target=spec.state_mount_path,
            source=volume_name(game_id),
            type="volume",
            read_only=False,
            labels=volume_labels,
            driver_config=DriverConfig(volume_driver),
        )
    ]
    if spec.read_only_rootfs:
        # A path inside the container, not a host temp file.
        mounts.append(Mount(target="/tmp", source=None, type="tmpfs", tmpfs_size=_TMPFS_BYTES))  # noqa: S108
    container = SwarmContainerSpec(
        spec.image_ref,
        hostname=spec.name,
        env=[f"{key}={value}" for key, value in spec.env.items()],
        user=str(spec.user),
        labels=dict(spec.labels),
        mounts=mounts,
        stop_grace_period=max(0, int(stop_grace.total_seconds() * 1_000_000_000)),
        read_only=True if spec.read_only_rootfs else None,
        init=True,
        cap_drop=["ALL"],
    )
    # Daemons of API 1.46 and later apply it; older ones ignore the field
    # (run their dockerd with --no-new-privileges, docs/operations.md).
    container["Privileges"] = {"NoNewPrivileges": True}
    resources = Resources(
        cpu_limit=spec.nano_cpus or None,
        mem_limit=spec.memory_bytes or None,
        cpu_reservation=spec.nano_cpus or None,
        mem_reservation=spec.memory_bytes or None,
    )
    if spec.pids_limit > 0:
        resources.setdefault("Limits", {})["Pids"] = spec.pids_limit
    template = TaskTemplate(
        container_spec=container,
        resources=resources,
        restart_policy=RestartPolicy(condition="none"),
        placement=Placement(constraints=list(constraints)) if constraints else None,
        log_driver=DriverConfig(
            "json-file",
            {"max-size": str(spec.log_max_bytes), "max-file": str(spec.log_max_files)},
        ),
        networks=[NetworkAttachmentConfig(target=network, aliases=[spec.network_alias])],
    )
    return {
        "task_template": template,
        "name": spec.name,
        "labels": dict(spec.labels),
        "mode": ServiceMode("replicated", replicas=0),
    }
