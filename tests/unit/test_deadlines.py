"""The caller's deadline as lifecycle code sees it."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from rtmanager.deadlines import bounded, cut_by_deadline, deadline_scope, require_time_left
from rtmanager.domain.errors import ServiceUnavailable

TEN = timedelta(seconds=10)


def test_without_a_deadline_waits_keep_their_ceiling() -> None:
    assert bounded(TEN) == TEN
    assert not cut_by_deadline(TEN)
    require_time_left("anything")
    with deadline_scope(None):
        assert bounded(TEN) == TEN
    with deadline_scope(10**9):  # how gRPC reports "no deadline"
        assert bounded(TEN) == TEN


def test_a_deadline_shortens_waits_and_ends_with_its_scope() -> None:
    with deadline_scope(1.0):
        assert timedelta(seconds=0.5) < bounded(TEN) <= timedelta(seconds=1)
        assert cut_by_deadline(TEN)
        assert bounded(timedelta(milliseconds=100)) == timedelta(milliseconds=100)
    assert bounded(TEN) == TEN


def test_a_passed_deadline_stops_the_next_step() -> None:
    with deadline_scope(0.01):
        time.sleep(0.02)
        assert bounded(TEN) == timedelta(milliseconds=10)
        with pytest.raises(ServiceUnavailable, match="before pulling"):
            require_time_left("pulling")
