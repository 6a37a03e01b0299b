"""The single-host adapter's health probe: what each way of failing reports.

`ping` asks for `/_ping` and for a listing of the engine network; only a
listing that times out after the ping was answered is the libnetwork wedge
of Docker 20.10 (moby/moby#42545). The probe's own client is replaced by a
scripted one here; tests/integration/test_docker_engine.py holds real
listings of the real daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace

import docker
import pytest
import requests

from rtmanager.adapters.docker.calls import DEFAULT_PROBE_TIMEOUT, whole_seconds
from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.config import load_settings
from rtmanager.domain.errors import ServiceUnavailable

Answer = Callable[[], object]


def ok() -> object:
    return True


def read_timeout() -> object:
    raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=3)")


def refused() -> object:
    raise requests.exceptions.ConnectionError("Connection refused")


def answered(status: int, explanation: str) -> Answer:
    def fail() -> object:
        response = requests.Response()
        response.status_code = status
        raise docker.errors.APIError(f"{status}", response=response, explanation=explanation)

    return fail


class ScriptedApi:
    """The probe's APIClient: `/_ping` and the listing answer as scripted."""

    def __init__(self, ping: Answer, listing: Answer) -> None:
        self._ping = ping
        self._listing = listing
        self.listed: list[list[str]] = []

    def ping(self) -> object:
        return self._ping()

    def networks(self, names: list[str]) -> object:
        self.listed.append(names)
        return self._listing()


def probe_over(
    api: ScriptedApi, monkeypatch: pytest.MonkeyPatch, **settings: object
) -> DockerEngineAdapter:
    adapter = DockerEngineAdapter(
        base_url="unix:///nonexistent.sock",
        cluster="prod",
        engine_network="galaxy-engines-prod",
        **settings,  # type: ignore[arg-type]
    )
    client = SimpleNamespace(api=api)
    monkeypatch.setattr(adapter._probe_connection, "client", lambda: client)
    return adapter


def test_a_daemon_that_answers_the_ping_and_the_listing_is_healthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = ScriptedApi(ok, lambda: [])
    probe_over(api, monkeypatch).ping()
    assert api.listed == [["galaxy-engines-prod"]]


def test_a_listing_that_times_out_after_the_ping_is_reported_as_a_wedged_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = probe_over(ScriptedApi(ok, read_timeout), monkeypatch)
    with pytest.raises(ServiceUnavailable) as caught:
        adapter.ping()
    assert caught.value.message == (
        "Docker answers /_ping but not a network listing within 3 s: the daemon may be wedged "
        "(moby/moby#42545); see docs/operations.md, "
        "'A Docker daemon that stops answering lifecycle calls'"
    )


def test_the_wedge_message_names_the_probe_timeout_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = probe_over(
        ScriptedApi(ok, read_timeout), monkeypatch, probe_timeout=timedelta(milliseconds=1500)
    )
    with pytest.raises(ServiceUnavailable, match="not a network listing within 2 s"):
        adapter.ping()


def test_the_probe_waits_no_longer_than_the_lifecycle_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = probe_over(
        ScriptedApi(ok, read_timeout),
        monkeypatch,
        timeout=timedelta(seconds=1),
        probe_timeout=timedelta(seconds=10),
    )
    with pytest.raises(ServiceUnavailable, match="not a network listing within 1 s"):
        adapter.ping()


def test_a_ping_that_times_out_is_an_unreachable_daemon_and_lists_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = ScriptedApi(read_timeout, ok)
    with pytest.raises(ServiceUnavailable, match=r"^docker: ping: daemon unreachable"):
        probe_over(api, monkeypatch).ping()
    assert api.listed == []


def test_a_listing_on_a_dropped_connection_is_not_called_a_wedge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = probe_over(ScriptedApi(ok, refused), monkeypatch)
    with pytest.raises(ServiceUnavailable) as caught:
        adapter.ping()
    assert caught.value.message.startswith(
        "docker: list networks named galaxy-engines-prod: daemon unreachable"
    )


@pytest.mark.parametrize(("status", "words"), [(500, "daemon error"), (400, "unexpected answer")])
def test_a_listing_answered_with_an_error_is_unavailable(
    status: int, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = probe_over(ScriptedApi(ok, answered(status, "boom")), monkeypatch)
    with pytest.raises(
        ServiceUnavailable, match=f"list networks named galaxy-engines-prod: {words}"
    ):
        adapter.ping()


def test_timeouts_are_whole_seconds_rounded_up() -> None:
    assert whole_seconds(timedelta(milliseconds=1)) == 1
    assert whole_seconds(timedelta(seconds=2, milliseconds=100)) == 3
    assert whole_seconds(timedelta(seconds=3)) == 3


@pytest.mark.parametrize("bad", [timedelta(0), timedelta(seconds=-1)])
@pytest.mark.parametrize("name", ["timeout", "probe_timeout"])
def test_a_timeout_that_is_not_positive_is_refused(name: str, bad: timedelta) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        DockerEngineAdapter(base_url="unix:///nonexistent.sock", cluster="prod", **{name: bad})  # type: ignore[arg-type]


def test_the_probe_timeout_setting_defaults_to_the_adapters_default() -> None:
    assert load_settings({}).docker_probe_timeout == DEFAULT_PROBE_TIMEOUT == timedelta(seconds=3)
