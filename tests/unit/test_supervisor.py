"""The supervisor's two-phase stop: nothing new first, then one shared deadline."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from rtmanager.lifecycle.reconcile import ReconcileReport
from rtmanager.workers import supervisor
from rtmanager.workers.periodic import PeriodicWorker
from rtmanager.workers.supervisor import Workers


class FakeClock:
    """`time.monotonic` of the supervisor; fake workers spend time on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeWorker:
    """Records what the supervisor asked of it; in-flight work takes `busy` seconds."""

    def __init__(self, name: str, calls: list[str], clock: FakeClock, busy: float = 0.0) -> None:
        self.name = name
        self._calls = calls
        self._clock = clock
        self._busy = busy
        self.timeouts: list[float] = []

    def start(self) -> None:
        self._calls.append(f"start {self.name}")

    def begin_drain(self) -> None:
        self._calls.append(f"drain {self.name}")

    def stop(self, timeout: float) -> bool:
        self._calls.append(f"stop {self.name}")
        self.timeouts.append(timeout)
        spent = min(self._busy, timeout)
        self._clock.now += spent
        return spent == self._busy


class FakeEvents:
    """The Docker events listener: start and stop only."""

    def __init__(self, calls: list[str]) -> None:
        self._calls = calls
        self.timeouts: list[float] = []

    def start(self) -> None:
        self._calls.append("start events")

    def stop(self, timeout: float) -> bool:
        self._calls.append("stop events")
        self.timeouts.append(timeout)
        return True


class FakeReconciler:
    def __init__(self, calls: list[str], failures: int = 0) -> None:
        self._calls = calls
        self._failures = failures
        self.passes = 0

    def run_pass(self) -> ReconcileReport:
        self.passes += 1
        self._calls.append("reconcile")
        if self.passes <= self._failures:
            raise RuntimeError("docker is down")
        return ReconcileReport(dry_run=False, actions=())


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(supervisor, "time", fake)
    return fake


def build(
    calls: list[str], clock: FakeClock, *, consumer_busy: float = 0.0, periodic_busy: float = 0.0
) -> tuple[Workers, FakeWorker, FakeWorker, FakeEvents]:
    consumer = FakeWorker("consumer", calls, clock, busy=consumer_busy)
    periodic = FakeWorker("periodic", calls, clock, busy=periodic_busy)
    events = FakeEvents(calls)
    workers = Workers(
        reconciler=FakeReconciler(calls),
        events=events,
        periodic=[periodic],
        stream_consumer=consumer,
    )
    return workers, consumer, periodic, events


def test_start_order_is_events_then_reconcile_then_ready_then_workers(clock: FakeClock) -> None:
    calls: list[str] = []
    workers, *_ = build(calls, clock)

    assert workers.start(on_ready=lambda: calls.append("ready")) is True

    assert calls == ["start events", "reconcile", "ready", "start consumer", "start periodic"]


def test_stop_drains_every_worker_before_waiting_for_any_and_stops_events_last(
    clock: FakeClock,
) -> None:
    calls: list[str] = []
    workers, *_ = build(calls, clock)
    workers.start(on_ready=lambda: None)
    calls.clear()

    assert workers.stop(10.0) is True

    assert calls == [
        "drain consumer",
        "drain periodic",
        "stop periodic",
        "stop consumer",
        "stop events",
    ]


def test_workers_share_one_deadline_instead_of_a_timeout_each(clock: FakeClock) -> None:
    calls: list[str] = []
    workers, consumer, periodic, events = build(calls, clock, periodic_busy=4.0, consumer_busy=9.0)
    workers.start(on_ready=lambda: None)
    began = clock.now

    assert workers.stop(10.0) is False  # the consumer's work outlasts the grace

    assert periodic.timeouts == [10.0]
    assert consumer.timeouts == [6.0]  # what the periodic worker left of the deadline
    assert events.timeouts == [0.0]
    assert clock.now - began == 10.0


def test_begin_drain_returns_at_once_and_reaches_every_started_worker(clock: FakeClock) -> None:
    calls: list[str] = []
    workers, *_ = build(calls, clock, consumer_busy=5.0)
    workers.start(on_ready=lambda: None)
    calls.clear()

    workers.begin_drain()

    assert calls == ["drain consumer", "drain periodic"]
    assert clock.now == 1000.0  # nothing was waited for


def test_drain_before_start_up_ends_starts_nothing_more(clock: FakeClock) -> None:
    calls: list[str] = []
    workers, *_ = build(calls, clock)
    workers.begin_drain()

    assert workers.start(on_ready=lambda: calls.append("ready")) is False
    assert workers.stop(1.0) is True

    assert calls == []  # not even the events listener


def test_drain_during_a_failing_start_up_reconcile_stops_retrying() -> None:
    calls: list[str] = []
    reconciler = FakeReconciler(calls, failures=1_000_000)
    events = FakeEvents(calls)
    workers = Workers(
        reconciler=reconciler,
        events=events,
        periodic=[],
        stream_consumer=None,
        startup_retry=timedelta(hours=1),  # only a drain can end the wait
    )
    started: list[bool] = []
    thread = threading.Thread(target=lambda: started.append(workers.start(lambda: None)))
    thread.start()
    try:
        for _ in range(1000):
            if reconciler.passes:
                break
            threading.Event().wait(0.01)
        workers.begin_drain()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        workers.begin_drain()
        thread.join(10)
    assert started == [False]
    assert reconciler.passes == 1
    assert workers.stop(1.0) is True
    assert calls == ["start events", "reconcile", "stop events"]


def test_periodic_worker_runs_no_new_job_once_drained() -> None:
    ran = threading.Event()
    worker = PeriodicWorker("tick", ran.set, timedelta(milliseconds=10))
    worker.begin_drain()
    worker.start()

    assert worker.stop(5.0) is True
    assert not ran.is_set()


def test_periodic_worker_stop_waits_for_the_run_in_progress() -> None:
    running, release, finished = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        running.set()
        release.wait(10)
        finished.set()

    worker = PeriodicWorker("slow", job, timedelta(milliseconds=10))
    worker.start()
    assert running.wait(10)
    worker.begin_drain()
    assert worker.stop(0.05) is False  # still in its run
    release.set()
    assert worker.stop(10) is True
    assert finished.is_set()
