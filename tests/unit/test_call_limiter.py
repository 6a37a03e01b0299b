"""The concurrent-call bound: admit up to the limit, refuse beyond it, tell when idle."""

from __future__ import annotations

import threading

import pytest

from rtmanager.api.limits import CallLimiter, Overloaded


def test_calls_up_to_the_limit_are_admitted_and_the_next_is_refused() -> None:
    limiter = CallLimiter(2)
    with limiter.admit(), limiter.admit():
        assert limiter.running == 2
        with pytest.raises(Overloaded) as refused, limiter.admit():
            pass  # pragma: no cover - never admitted
        assert refused.value.limit == 2
        assert "limit of 2 concurrent calls" in refused.value.message
        assert limiter.running == 2  # a refusal takes no slot
    assert limiter.running == 0


def test_a_failing_call_frees_its_slot() -> None:
    limiter = CallLimiter(1)
    with pytest.raises(RuntimeError), limiter.admit():
        raise RuntimeError("boom")
    with limiter.admit():
        assert limiter.running == 1


def test_wait_idle_returns_when_the_last_call_returns() -> None:
    limiter = CallLimiter(3)
    entered, leave = threading.Event(), threading.Event()

    def call() -> None:
        with limiter.admit():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=call)
    thread.start()
    assert entered.wait(10)
    assert limiter.wait_idle(0.05) is False
    leave.set()
    assert limiter.wait_idle(10) is True
    thread.join(10)


def test_wait_idle_with_nothing_running_is_true_at_once() -> None:
    assert CallLimiter(1).wait_idle(0) is True


def test_a_limit_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        CallLimiter(0)
