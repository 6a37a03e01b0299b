"""The single-host backend's engine container: a `ContainerSpec` as Docker's create arguments.

Every engine container gets the same hardening (no capabilities, no new
privileges, no restarts behind rtmanager's back), the spec's limits, a
bounded json-file log and a typed bind mount of its state directory. One
pure function says so, apart from the request and the failures it meets.
"""

from __future__ import annotations

from typing import Any

import docker
from docker.types import LogConfig, Mount

from rtmanager.ports import ContainerSpec

__all__ = ["container_create_args"]

# /tmp of a read-only engine: writable scratch space, no setuid files or devices.
_TMPFS_OPTIONS = "rw,nosuid,nodev,size=64m"


def container_create_args(
    api: docker.APIClient, spec: ContainerSpec, network: str
) -> dict[str, Any]:
    """The arguments of `APIClient.create_container` for the engine container of `spec`.

    Sends nothing: `api` only lends docker-py's config builders its API
    version. The container joins `network` (a name or an id) under the
    spec's network alias.
    """
    host_config = api.create_host_config(
        init=True,
        # rtmanager owns restarts; Docker restarting an engine
        # behind its back would confuse records and the reconciler.
        restart_policy={"Name": "no"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges=true"],
        privileged=False,
        pids_limit=spec.pids_limit if spec.pids_limit > 0 else None,
        mem_limit=spec.memory_bytes if spec.memory_bytes > 0 else None,
        # Memory plus swap equal to memory: no swap at all.
        memswap_limit=spec.memory_bytes if spec.memory_bytes > 0 else None,
        nano_cpus=spec.nano_cpus if spec.nano_cpus > 0 else None,
        # Bounded whatever the daemon's default: a chatty engine
        # must not fill the host's disk. json-file, because the
        # log tail of a failed start is read back through Docker.
        log_config=LogConfig(
            type=LogConfig.types.JSON,
            config={
                "max-size": str(spec.log_max_bytes),
                "max-file": str(spec.log_max_files),
            },
        ),
        read_only=True if spec.read_only_rootfs else None,
        # A path inside the container, not a host temp file.
        tmpfs={"/tmp": _TMPFS_OPTIONS} if spec.read_only_rootfs else None,  # noqa: S108
        # A typed bind mount fails on a missing source instead of
        # silently creating a root-owned directory on the host.
        mounts=[
            Mount(
                target=spec.state_mount_path,
                source=spec.state_host_path,
                type="bind",
                read_only=False,
            )
        ],
        network_mode=network,
    )
    return {
        "image": spec.image_ref,
        "name": spec.name,
        "hostname": spec.name,
        "labels": dict(spec.labels),
        "environment": dict(spec.env),
        "user": str(spec.user),
        "host_config": host_config,
        # What `create_networking_config` builds (its stub takes
        # one endpoint config, the function a dict of them).
        "networking_config": {
            "EndpointsConfig": {network: api.create_endpoint_config(aliases=[spec.network_alias])}
        },
    }
