"""`Backoff`: capped exponential delays with equal jitter (half fixed, half random)."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from rtmanager.backoff import Backoff

BASE, CAP = timedelta(milliseconds=200), timedelta(seconds=5)


@pytest.fixture
def highest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitter at its top: the full delay."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


@pytest.fixture
def lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitter at its bottom: half the delay."""
    monkeypatch.setattr(random, "uniform", lambda low, high: low)


@pytest.mark.usefixtures("highest")
def test_delays_double_from_the_base_up_to_the_cap() -> None:
    delays = [Backoff(BASE, CAP).delay(n) for n in range(1, 9)]

    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


@pytest.mark.usefixtures("lowest")
def test_the_fixed_half_of_each_delay_is_never_skipped() -> None:
    delays = [Backoff(BASE, CAP).delay(n) for n in range(1, 8)]

    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5])


@pytest.mark.parametrize("failures", [1, 2, 3, 5, 6, 20])
def test_jittered_delays_stay_between_half_and_all_of_the_capped_delay(failures: int) -> None:
    backoff = Backoff(BASE, CAP)
    full = min(CAP.total_seconds(), BASE.total_seconds() * 2 ** (failures - 1))

    delays = [backoff.delay(failures) for _ in range(300)]

    assert all(full / 2 <= d <= full for d in delays)
    assert len(set(delays)) > 1  # replicas do not retry in lockstep


@pytest.mark.parametrize("failures", [33, 1_000, 10**9, 2**70])
def test_huge_failure_counts_stay_at_the_cap_without_overflow(failures: int) -> None:
    assert CAP.total_seconds() / 2 <= Backoff(BASE, CAP).delay(failures) <= CAP.total_seconds()


@pytest.mark.usefixtures("highest")
@pytest.mark.parametrize("failures", [0, -1, -(10**9)])
def test_counts_below_one_wait_the_base(failures: int) -> None:
    assert Backoff(BASE, CAP).delay(failures) == pytest.approx(0.2)


@pytest.mark.usefixtures("highest")
def test_a_cap_equal_to_the_base_is_a_constant_delay() -> None:
    backoff = Backoff(BASE, BASE)

    assert [backoff.delay(n) for n in (1, 2, 50)] == pytest.approx([0.2] * 3)


@pytest.mark.parametrize(
    ("base", "cap", "problem"),
    [
        (timedelta(0), CAP, "base must be positive"),
        (timedelta(seconds=-1), CAP, "base must be positive"),
        (CAP, BASE, "must not be below its base"),
    ],
)
def test_nonsense_backoffs_are_refused(base: timedelta, cap: timedelta, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Backoff(base, cap)


def test_backoffs_compare_by_base_and_cap() -> None:
    assert Backoff(BASE, CAP) == Backoff(BASE, CAP) != Backoff(BASE, BASE)
