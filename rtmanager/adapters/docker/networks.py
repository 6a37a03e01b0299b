"""The single-host backend's engine network: settling on one, and the start failures it explains.

Docker does not keep network names unique, so replicas creating the engine
network together settle on one without a lock (`settle_network`, whose
rules `DockerEngineAdapter.ensure_network` sets out); a container start on
a name that a yielded duplicate still shares, or on a network removed
since, fails in words that `network_crowded` and `network_gone` recognise.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from typing import Any, cast

import docker
import docker.errors

from rtmanager.adapters.docker.calls import explain, status_code
from rtmanager.domain.errors import ServiceUnavailable

__all__ = ["NETWORK_CROWDED_SECONDS", "network_crowded", "network_gone", "settle_network"]

logger = logging.getLogger(__name__)

# How long `ensure_network` may take to settle on one network, and how long
# several networks of one name must stay listed before they count as left
# behind (rather than a concurrent creator's about to yield).
_NETWORK_SETTLE_SECONDS = 30.0
NETWORK_CROWDED_SECONDS = 5.0
# How long a network another process created must be listed alone before
# this one uses it.
_NETWORK_QUIET_SECONDS = 2.0

# How an engine in swarm mode reports a network id that no longer exists.
_GONE_NETWORK_ID = re.compile(r"network [0-9a-f]{64} not found")


def network_crowded(exc: docker.errors.APIError) -> bool:
    """Whether a start failed on a network name that a duplicate, being removed, still shares
    (and not on a network that is gone: see `network_gone`)."""
    words = explain(exc)
    if "is ambiguous" in words:
        return True
    # An engine in swarm mode resolves the name through the swarm too; its
    # "could not attach" names the network by id when the network is gone.
    lowered = words.lower()
    return (
        "could not attach to network" in lowered
        and "not found" in lowered
        and not network_gone(exc)
    )


def network_gone(exc: docker.errors.APIError) -> bool:
    """Whether Docker refused a container because a network it names no longer exists.

    Docker 20.10 accepts a create on a removed network's id and fails the
    start with 404 "network <id> not found"; newer engines check at create.
    An engine in swarm mode says "could not attach to network <id>: ...
    network <id> not found" instead, which names an id, where a name
    crowded by a duplicate is named by its name (`network_crowded`).
    """
    words = explain(exc).lower()
    if status_code(exc) == 404 and words.startswith("network ") and words.endswith(" not found"):
        return True
    return _GONE_NETWORK_ID.search(words) is not None


def settle_network(api: docker.APIClient, name: str, labels: dict[str, str]) -> str:
    """Settle on one network `name` by the rules of `DockerEngineAdapter.ensure_network`; its id."""
    deadline = time.monotonic() + _NETWORK_SETTLE_SECONDS
    crowded_since: float | None = None
    alone: tuple[str, float] | None = None
    while True:
        found = _networks_named(api, name)
        ids = [str(n["Id"]) for n in found]
        if len(ids) == 1:
            # Someone else's network: its creator may still be about to
            # yield it (and Docker lets a network go while containers are
            # only created on it), so it is used once it stayed alone
            # for longer than a creator takes to list after creating.
            if alone is None or alone[0] != ids[0]:
                alone = (ids[0], time.monotonic())
            if time.monotonic() - alone[1] >= _NETWORK_QUIET_SECONDS:
                return ids[0]
        elif not ids:
            alone = crowded_since = None
            ours = _create_network(api, name, labels)
            if ours:
                if [n["Id"] for n in _networks_named(api, name)] == [ours]:
                    return ours
                logger.info("network %s was created concurrently; ours yields", name)
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_network(ours)
        else:
            alone = None
            crowded_since = crowded_since or time.monotonic()
            if time.monotonic() - crowded_since >= NETWORK_CROWDED_SECONDS:
                return _keeper_of(api, found, labels)
        if time.monotonic() >= deadline:
            raise ServiceUnavailable(
                f"docker: ensure network {name}: could not settle on one network "
                f"within {_NETWORK_SETTLE_SECONDS:g}s"
            )
        # Jitter: replicas that all yielded must not start over in step.
        time.sleep(random.uniform(0.05, 0.25))


def _create_network(api: docker.APIClient, name: str, labels: dict[str, str]) -> str:
    """Create the network and return its id; "" when Docker saw a duplicate first."""
    try:
        created = api.create_network(
            name, driver="bridge", internal=True, labels=dict(labels), check_duplicate=True
        )
    except docker.errors.APIError as exc:
        if status_code(exc) == 409:  # a concurrent creator's network is listed now
            return ""
        raise
    return str(created.get("Id", ""))


def _keeper_of(api: docker.APIClient, found: list[dict[str, Any]], labels: dict[str, str]) -> str:
    keeper = min(found, key=lambda n: (str(n.get("Created", "")), str(n["Id"])))
    for network in found:
        if network["Id"] == keeper["Id"]:
            continue
        theirs = network.get("Labels") or {}
        if any(theirs.get(key) != value for key, value in labels.items()):
            continue
        with contextlib.suppress(docker.errors.APIError):
            detail = cast("dict[str, Any]", api.inspect_network(network["Id"]))
            if not detail.get("Containers"):
                api.remove_network(network["Id"])
    logger.warning(
        "several networks named %s; using the oldest",
        keeper.get("Name"),
        extra={"network_id": keeper["Id"]},
    )
    return str(keeper["Id"])


def _networks_named(api: docker.APIClient, name: str) -> list[dict[str, Any]]:
    # The daemon's name filter matches substrings: keep exact matches only.
    found = cast("list[dict[str, Any]]", api.networks(names=[name]) or [])
    return [n for n in found if n.get("Name") == name]
