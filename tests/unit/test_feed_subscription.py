"""A watcher's queue on its event loop (`event_feed._Subscription`): waits and heartbeats.

No database: the subscription is driven directly, as its loop's `_LoopFeed`
drives it, with a stand-in for the hub's position.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from rtmanager.adapters.postgres.event_feed import _Subscription
from rtmanager.ports import EVERY_EVENT, FeedClosed

T = TypeVar("T")


@dataclass
class Hub:
    position: int = 41


def subscription(capacity: int = 1000) -> _Subscription:
    return _Subscription(Hub(), EVERY_EVENT, capacity)  # type: ignore[arg-type]


def run(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(test())


def count_timers(loop: asyncio.AbstractEventLoop) -> list[float]:
    """Record the deadline of every timer scheduled on `loop` from now on."""
    armed: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        armed.append(when)
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting  # type: ignore[method-assign, assignment]
    return armed


def test_a_quiet_watcher_gets_the_position_once_its_timeout_passes() -> None:
    async def test() -> tuple[object, float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        got = await subscription().get(0.3)
        return got, loop.time() - began

    got, waited = run(test)
    assert got == 41
    assert 0.29 <= waited < 5.0


def test_a_busy_watcher_arms_one_timer_not_one_per_event() -> None:
    events = [object() for _ in range(200)]

    async def test() -> tuple[list[object], list[float]]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        armed = count_timers(loop)
        sub = subscription()
        received: list[object] = []

        async def watcher() -> None:
            while len(received) < len(events):
                received.append(await sub.get(30.0))

        task = asyncio.create_task(watcher())
        for event in events:
            await asyncio.sleep(0)  # the watcher waits again between events
            sub.offer(event)  # type: ignore[arg-type]
        await asyncio.wait_for(task, 10)
        sub.release()
        # The heartbeat's timers, not `wait_for`'s own.
        return received, [when - began for when in armed if when - began > 20]

    received, heartbeats = run(test)
    assert received == events
    assert len(heartbeats) == 1


def test_a_wait_woken_by_an_earlier_deadline_waits_on_to_its_own() -> None:
    async def test() -> tuple[object, object, object, float]:
        loop = asyncio.get_running_loop()
        sub = subscription()
        event = object()
        waiter = asyncio.create_task(sub.get(0.6))  # arms a timer 0.6 s out
        await asyncio.sleep(0.3)
        sub.offer(event)  # type: ignore[arg-type]
        got = await waiter  # that timer stays armed
        began = loop.time()
        quiet = await sub.get(1.0)  # woken at the 0.6 s timer: not due yet
        return event, got, quiet, loop.time() - began

    event, got, quiet, waited = run(test)
    assert got is event
    assert quiet == 41
    assert 0.99 <= waited < 5.0


def test_a_shorter_timeout_than_the_armed_timer_is_kept() -> None:
    async def test() -> tuple[object, float]:
        loop = asyncio.get_running_loop()
        sub = subscription()
        waiter = asyncio.create_task(sub.get(60.0))
        await asyncio.sleep(0.05)
        sub.offer(object())  # type: ignore[arg-type]
        await waiter  # a timer stays armed 60 s out
        began = loop.time()
        quiet = await sub.get(0.2)
        return quiet, loop.time() - began

    quiet, waited = run(test)
    assert quiet == 41
    assert 0.19 <= waited < 5.0


def test_a_released_watcher_leaves_no_timer_behind() -> None:
    async def test() -> int:
        loop = asyncio.get_running_loop()
        sub = subscription()
        waiter = asyncio.create_task(sub.get(60.0))
        await asyncio.sleep(0.05)
        sub.close()
        with pytest.raises(FeedClosed):
            await waiter
        sub.release()
        scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
        return sum(1 for handle in scheduled if not handle.cancelled())

    assert run(test) == 0
