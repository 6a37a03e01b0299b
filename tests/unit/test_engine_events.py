"""The Docker events listener: which events count, and reconnecting after Docker goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.ports import ContainerEvent, ContainerInfo, EngineBackend
from rtmanager.workers.engine_events import EngineEventsListener

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def event(action: str, cid: str = "c1", game: str = "g1", code: int | None = 137) -> ContainerEvent:
    return ContainerEvent(action=action, container_id=cid, game_id=game, time=NOW, exit_code=code)


class ScriptedStream:
    """Yields its events, then fails (Docker went away) or waits until closed."""

    def __init__(self, events: list[ContainerEvent], *, then_fail: bool) -> None:
        self._events = events
        self._then_fail = then_fail
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[ContainerEvent]:
        yield from self._events
        if self._then_fail:
            raise ServiceUnavailable("docker: event stream broken")
        self._closed.wait(10)

    def close(self) -> None:
        self._closed.set()


class ScriptedBackend:
    """follow_events hands out the scripted streams in turn; the first calls may fail."""

    def __init__(self, streams: list[ScriptedStream | ServiceUnavailable]) -> None:
        self._streams = streams
        self.since: list[datetime | None] = []
        self.running: set[str] = set()

    def follow_events(self, since: datetime | None = None) -> ScriptedStream:
        self.since.append(since)
        item = self._streams.pop(0)
        if isinstance(item, ServiceUnavailable):
            raise item
        return item

    def inspect(self, cid: str) -> ContainerInfo | None:
        return ContainerInfo(id=cid, name="n", state="x", running=cid in self.running, owned=True)


class RecordingReconciler:
    """Records observed exits; an exit of a game in `hold` waits until released or stopped."""

    def __init__(self) -> None:
        self.exits: list[tuple[str, str, str, int | None]] = []
        self.passes = 0
        self.hold: set[str] = set()
        self.release = threading.Event()
        self.stopped: list[str] = []
        self.entered: list[str] = []

    def observe_exit(
        self,
        game_id: str,
        container_id: str,
        *,
        event: str,
        exit_code: int | None,
        stop: threading.Event,
    ) -> None:
        self.entered.append(game_id)
        if game_id in self.hold:
            while not self.release.wait(0.01):
                if stop.is_set():
                    self.stopped.append(game_id)
                    return
        self.exits.append((game_id, container_id, event, exit_code))

    def run_pass(self) -> None:
        self.passes += 1


def listen(docker: ScriptedBackend, reconciler: RecordingReconciler) -> EngineEventsListener:
    listener = EngineEventsListener(
        cast(EngineBackend, docker),
        cast(Reconciler, reconciler),
        backoff_base=timedelta(milliseconds=10),
        backoff_max=timedelta(milliseconds=40),
    )
    listener.start()
    return listener


def wait_for(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_die_is_passed_on_with_its_exit_code_and_other_actions_are_ignored() -> None:
    docker = ScriptedBackend(
        [ScriptedStream([event("start"), event("die", code=3), event("kill")], then_fail=False)]
    )
    reconciler = RecordingReconciler()
    listener = listen(docker, reconciler)
    try:
        wait_for(lambda: reconciler.exits)
        time.sleep(0.05)
        assert reconciler.exits == [("g1", "c1", "die", 3)]
    finally:
        assert listener.stop(5)


def test_an_oom_counts_only_when_it_left_the_engine_stopped() -> None:
    docker = ScriptedBackend(
        [
            ScriptedStream(
                [event("oom", cid="alive", code=None), event("oom", cid="dead", code=None)],
                then_fail=False,
            )
        ]
    )
    docker.running.add("alive")
    reconciler = RecordingReconciler()
    listener = listen(docker, reconciler)
    try:
        wait_for(lambda: reconciler.exits)
        time.sleep(0.05)
        assert reconciler.exits == [("g1", "dead", "oom", None)]
    finally:
        assert listener.stop(5)


def test_events_without_a_game_are_ignored() -> None:
    docker = ScriptedBackend([ScriptedStream([event("die", game="")], then_fail=False)])
    reconciler = RecordingReconciler()
    listener = listen(docker, reconciler)
    try:
        wait_for(lambda: docker.since)
        time.sleep(0.05)
        assert reconciler.exits == []
    finally:
        assert listener.stop(5)


def test_a_lost_stream_is_reconnected_from_the_last_event_and_followed_by_a_reconcile() -> None:
    docker = ScriptedBackend(
        [
            ScriptedStream([event("die")], then_fail=True),
            ServiceUnavailable("docker: daemon down"),
            ScriptedStream([], then_fail=False),
        ]
    )
    reconciler = RecordingReconciler()
    listener = listen(docker, reconciler)
    try:
        wait_for(lambda: reconciler.passes == 1)
        assert docker.since == [None, NOW, NOW]
        assert listener.connected.is_set()
        assert reconciler.exits == [("g1", "c1", "die", 137)]
    finally:
        assert listener.stop(5)


def test_stop_ends_a_listener_waiting_on_a_quiet_stream() -> None:
    docker = ScriptedBackend([ScriptedStream([], then_fail=False)])
    listener = listen(docker, RecordingReconciler())
    wait_for(listener.connected.is_set)
    started = time.monotonic()
    assert listener.stop(5)
    assert time.monotonic() - started < 2.5  # not the 5 s a listener stuck on its stream takes


def test_an_exit_waiting_for_its_games_operation_holds_up_neither_other_exits_nor_repeats() -> None:
    docker = ScriptedBackend(
        [
            ScriptedStream(
                [event("die", game="busy"), event("die", game="busy"), event("die", game="g2")],
                then_fail=False,
            )
        ]
    )
    reconciler = RecordingReconciler()
    reconciler.hold.add("busy")
    listener = listen(docker, reconciler)
    try:
        wait_for(lambda: reconciler.exits)
        assert reconciler.exits == [("g2", "c1", "die", 137)]
        reconciler.release.set()
        wait_for(lambda: len(reconciler.exits) == 2)
        time.sleep(0.05)
        # The repeated die of the container being observed was not observed twice.
        assert reconciler.exits[1] == ("busy", "c1", "die", 137)
        assert len(reconciler.exits) == 2
    finally:
        assert listener.stop(5)


def test_stop_gives_up_exits_still_waiting_for_their_games_operation() -> None:
    docker = ScriptedBackend([ScriptedStream([event("die", game="busy")], then_fail=False)])
    reconciler = RecordingReconciler()
    reconciler.hold.add("busy")
    listener = listen(docker, reconciler)
    wait_for(lambda: reconciler.entered)
    assert listener.stop(5)
    assert reconciler.stopped == ["busy"]
    assert reconciler.exits == []
