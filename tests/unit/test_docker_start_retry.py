"""The single-host adapter's start, when a duplicate engine network is on its way out.

Replicas starting together may each create the engine network; the
duplicates are removed again (see `ensure_network`), and a container
started meanwhile fails on the name: "ambiguous" on a plain engine, "could
not attach ... not found" on an engine in swarm mode. Both are retried for a
short while; anything else fails the start at once.
"""

from __future__ import annotations

import docker
import pytest
import requests

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.domain.errors import ContainerStartFailed, EngineNetworkGone

AMBIGUOUS = "network galaxy-engines is ambiguous (2 matches found based on name)"
SWARM_NOT_FOUND = (
    "Could not attach to network galaxy-engines: rpc error: code = NotFound "
    "desc = network galaxy-engines not found"
)


GONE_ID = "0e06edcd3f7c7384baa320da269b71881ab396e3f68c9eee799f9c433f079386"


class FlakyApi:
    """An APIClient whose start fails with `errors` (of `status`) first, then succeeds."""

    def __init__(self, errors: list[str], status: int = 500) -> None:
        self.errors = list(errors)
        self.status = status
        self.starts = 0

    def start(self, container_id: str) -> None:
        self.starts += 1
        if self.errors:
            response = requests.Response()
            response.status_code = self.status
            raise docker.errors.APIError(
                f"{self.status} Server Error", response=response, explanation=self.errors.pop(0)
            )


def adapter_over(api: FlakyApi, monkeypatch: pytest.MonkeyPatch) -> DockerEngineAdapter:
    adapter = DockerEngineAdapter(base_url="unix:///nonexistent.sock", cluster="prod")
    monkeypatch.setattr(adapter, "_api", lambda: api)
    return adapter


@pytest.mark.parametrize("words", [AMBIGUOUS, SWARM_NOT_FOUND], ids=["plain", "swarm-mode"])
def test_a_start_on_a_crowded_network_name_is_retried_until_it_goes(
    words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FlakyApi([words, words])

    assert adapter_over(api, monkeypatch).start("c" * 64) == "c" * 64
    assert api.starts == 3


@pytest.mark.parametrize(
    "words",
    [
        "OCI runtime create failed: exec: no such file",
        "Could not attach to network galaxy-engines: permission denied",
    ],
)
def test_any_other_start_failure_fails_at_once(words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    api = FlakyApi([words])

    with pytest.raises(ContainerStartFailed, match="could not start container"):
        adapter_over(api, monkeypatch).start("c" * 64)
    assert api.starts == 1


@pytest.mark.parametrize(
    ("words", "status"),
    [
        (f"network {GONE_ID} not found", 404),
        ("network galaxy-engines not found", 404),
        (
            f"Could not attach to network {GONE_ID}: rpc error: code = NotFound "
            f"desc = network {GONE_ID} not found",
            500,
        ),
    ],
    ids=["removed-id", "removed-name", "swarm-mode-removed-id"],
)
def test_a_start_on_a_removed_network_is_network_gone_at_once_and_forgets_it(
    words: str, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FlakyApi([words], status=status)
    adapter = adapter_over(api, monkeypatch)
    adapter._network_ids["galaxy-engines"] = GONE_ID

    with pytest.raises(EngineNetworkGone, match="not found"):
        adapter.start("c" * 64)
    assert api.starts == 1
    assert adapter._network_ids == {}
