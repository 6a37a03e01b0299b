"""`GameLock`: hold a game's lease for an operation, renew it while it runs, always release it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from rtmanager.domain.errors import ConcurrentModification, ErrorCode, ServiceUnavailable
from rtmanager.lifecycle.leasing import GameLock, LeaseLost
from rtmanager.ports import Lease
from tests.unit.fakes import FakeLeases

SHORT_TTL = timedelta(milliseconds=150)  # renewed every 50 ms
LONG_TTL = timedelta(seconds=30)


def wait_until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def renewals(leases: FakeLeases, lease: Lease) -> int:
    return sum(1 for renewed in leases.renewed if renewed == lease)


def test_hold_takes_the_lease_for_the_block_and_releases_it() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)

    with lock.hold("game-1") as lease:
        assert lease.game_id == "game-1"
        assert leases.tokens == {"game-1": lease.token}
        assert lock.held_games == ["game-1"]

    assert leases.released == [lease]
    assert leases.tokens == {}
    assert lock.held_games == []
    assert leases.ttls == [LONG_TTL]


def test_held_games_names_the_games_whose_leases_are_held() -> None:
    lock = GameLock(FakeLeases(), LONG_TTL)

    with lock.hold("game-2"), lock.hold("game-1"):
        assert lock.held_games == ["game-1", "game-2"]


def test_hold_of_a_busy_game_raises_concurrent_modification_and_releases_nothing() -> None:
    leases = FakeLeases()
    leases.busy.add("game-1")
    lock = GameLock(leases, LONG_TTL)

    with pytest.raises(ConcurrentModification) as raised, lock.hold("game-1"):
        pytest.fail("the block must not run")

    assert raised.value.code is ErrorCode.CONFLICT
    assert raised.value.race is True
    assert raised.value.metadata == {"game_id": "game-1"}
    assert leases.released == []
    assert lock.held_games == []


def test_a_second_hold_of_the_same_game_is_refused_while_the_first_runs() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)

    with lock.hold("game-1"), pytest.raises(ConcurrentModification), lock.hold("game-1"):
        pass

    assert leases.all_released


def test_hold_releases_the_lease_when_the_block_raises() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)

    with pytest.raises(KeyError), lock.hold("game-1"):
        raise KeyError("boom")

    assert leases.all_released
    assert lock.held_games == []


def test_hold_when_redis_is_down_raises_service_unavailable() -> None:
    leases = FakeLeases()
    leases.go_down()
    lock = GameLock(leases, LONG_TTL)

    with pytest.raises(ServiceUnavailable), lock.hold("game-1"):
        pytest.fail("the block must not run")

    assert lock.held_games == []


def test_hold_renews_the_lease_periodically_while_the_block_runs() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)

    with lock.hold("game-1") as lease:
        assert wait_until(lambda: renewals(leases, lease) >= 3)

    assert leases.all_released


def test_renewal_extends_with_the_configured_ttl_and_the_lease_token() -> None:
    leases = FakeLeases()
    extended: list[tuple[Lease, timedelta]] = []
    original = leases.renew

    def spy(lease: Lease, ttl: timedelta) -> bool:
        extended.append((lease, ttl))
        return original(lease, ttl)

    leases.renew = spy  # type: ignore[method-assign]
    lock = GameLock(leases, SHORT_TTL)

    with lock.hold("game-1") as lease:
        assert wait_until(lambda: bool(extended))

    assert extended[0] == (lease, SHORT_TTL)


def test_every_held_game_is_renewed() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)

    with lock.hold("game-1") as first, lock.hold("game-2") as second:
        assert wait_until(lambda: renewals(leases, first) >= 2 and renewals(leases, second) >= 2)

    assert leases.all_released


def test_renewal_stops_once_the_lease_is_released() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)
    with lock.hold("game-1") as lease:
        assert wait_until(lambda: renewals(leases, lease) >= 1)
    time.sleep(0.12)  # a renewal already under way may still finish
    settled = renewals(leases, lease)

    time.sleep(0.2)

    assert renewals(leases, lease) == settled


def test_renewal_resumes_for_a_later_hold() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)
    with lock.hold("game-1"):
        pass
    time.sleep(0.12)  # the renewer finds nothing held and ends

    with lock.hold("game-1") as lease:
        assert wait_until(lambda: renewals(leases, lease) >= 2)


def test_a_renewal_that_fails_does_not_break_the_operation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leases = FakeLeases()
    leases.go_down("renew")
    lock = GameLock(leases, SHORT_TTL)

    with caplog.at_level(logging.WARNING), lock.hold("game-1"):
        assert wait_until(
            lambda: any(r.getMessage() == "could not renew game lease" for r in caplog.records)
        )

    assert leases.all_released


def test_a_lease_lost_while_held_is_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)

    with caplog.at_level(logging.ERROR), lock.hold("game-1"):
        leases.expire("game-1")
        assert wait_until(
            lambda: any(
                r.getMessage() == "lost a game lease while its operation runs"
                for r in caplog.records
            )
        )


def test_a_release_that_fails_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    leases = FakeLeases()
    leases.go_down("release")
    lock = GameLock(leases, LONG_TTL)

    with caplog.at_level(logging.WARNING), lock.hold("game-1"):
        pass

    assert lock.held_games == []
    assert any(
        r.getMessage() == "could not release game lease; trying again until it would expire"
        for r in caplog.records
    )
    leases.failing.clear()  # let the background release land, not retry for the whole TTL
    assert wait_until(lambda: leases.tokens == {}, seconds=5)


def test_a_release_redis_could_not_take_is_tried_again_until_it_lands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Left alone, the lease would keep the game busy for the rest of its TTL.
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)

    with caplog.at_level(logging.INFO):
        with lock.hold("game-1") as lease:
            leases.go_down("release")
        assert lock.held_games == []  # the operation is over at once
        assert leases.tokens == {"game-1": lease.token}
        time.sleep(0.6)  # two background attempts fail
        leases.failing.clear()  # Redis is back
        assert wait_until(lambda: leases.tokens == {}, seconds=5)

    assert leases.released == [lease]
    assert any(r.getMessage() == "released game lease late" for r in caplog.records)
    # The game can be taken again at once.
    with lock.hold("game-1"):
        pass


def test_a_late_release_never_deletes_a_newer_holders_lease() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)
    with lock.hold("game-1"):
        leases.go_down("release")
    leases.expire("game-1")  # as if its TTL ran out meanwhile...
    leases.failing.clear()
    newer = leases.acquire("game-1", LONG_TTL)  # ...and another holder took the game
    assert newer is not None

    assert wait_until(lambda: len(leases.released) == 1, seconds=5)  # the late attempt ran
    assert leases.tokens == {"game-1": newer.token}


def test_late_releases_stop_once_the_lease_would_have_expired(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = 0

    class CountingLeases(FakeLeases):
        def release(self, lease: Lease) -> bool:
            nonlocal attempts
            attempts += 1
            return super().release(lease)

    leases = CountingLeases()
    lock = GameLock(leases, timedelta(milliseconds=400))  # bounds this test's length only
    leases.go_down("release")
    gave_up = "game lease left to expire: Redis did not take its release in time"

    with caplog.at_level(logging.WARNING):
        with lock.hold("game-1"):
            pass
        assert wait_until(lambda: any(r.getMessage() == gave_up for r in caplog.records), 5)
    tried = attempts
    time.sleep(2.5)  # longer than the longest pause between attempts
    assert attempts == tried
    assert 1 < tried < 5  # the first release and the background attempts within 400 ms


def test_finish_releases_returns_at_once_when_every_release_landed() -> None:
    lock = GameLock(FakeLeases(), LONG_TTL)
    with lock.hold("game-1"):
        pass
    started = time.monotonic()
    assert lock.finish_releases(5.0) == []
    assert time.monotonic() - started < 0.1


def test_finish_releases_waits_for_a_late_release_to_land() -> None:
    # A shutdown during a Redis restart: the release lands once Redis is back.
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)
    with lock.hold("game-1") as lease:
        leases.go_down("release")
    threading.Timer(0.4, leases.failing.clear).start()  # Redis comes back

    started = time.monotonic()
    assert lock.finish_releases(5.0) == []
    assert time.monotonic() - started < 3.0  # woken when the release landed
    assert leases.released == [lease]
    assert leases.tokens == {}


def test_finish_releases_names_the_games_still_pending_when_its_time_is_up() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)
    leases.go_down("release")
    for game_id in ("game-2", "game-1"):
        with lock.hold(game_id):
            pass

    started = time.monotonic()
    assert lock.finish_releases(0.3) == ["game-1", "game-2"]
    assert 0.3 <= time.monotonic() - started < 1.0
    leases.failing.clear()  # let the background releases land, not retry for the whole TTL
    assert lock.finish_releases(5.0) == []
    assert leases.tokens == {}


def test_releasing_a_lease_that_already_expired_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)

    with caplog.at_level(logging.WARNING), lock.hold("game-1"):
        leases.expire("game-1")

    assert any(r.getMessage() == "game lease had expired before release" for r in caplog.records)


def test_acquire_latency_is_observed_once_per_hold() -> None:
    leases = FakeLeases()
    observed: list[float] = []
    lock = GameLock(leases, LONG_TTL, on_acquire_latency=observed.append)

    with lock.hold("game-1"):
        pass
    leases.busy.add("game-2")
    with pytest.raises(ConcurrentModification), lock.hold("game-2"):
        pass

    assert len(observed) == 2
    assert all(seconds >= 0 for seconds in observed)


class BlockingRenewLeases(FakeLeases):
    """Renewing game `a` waits until told to go on (to order it against a release)."""

    def __init__(self) -> None:
        super().__init__()
        self.renewing_a = threading.Event()
        self.go_on = threading.Event()

    def renew(self, lease: Lease, ttl: timedelta) -> bool:
        if lease.game_id == "a" and not self.renewing_a.is_set():
            self.renewing_a.set()
            self.go_on.wait(2)
        return super().renew(lease, ttl)


def test_a_lease_released_while_its_renewal_is_in_flight_is_not_reported_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    leases = BlockingRenewLeases()
    lock = GameLock(leases, SHORT_TTL)

    with caplog.at_level(logging.ERROR):
        with lock.hold("a"):
            assert leases.renewing_a.wait(2)
        # Released (the token is gone) while the renewal still waits.
        leases.go_on.set()
        time.sleep(0.05)

    assert not [r for r in caplog.records if "lost a game lease" in r.getMessage()]


def test_check_passes_while_the_lease_is_held_and_for_games_not_held_here() -> None:
    lock = GameLock(FakeLeases(), SHORT_TTL)
    lock.check("elsewhere")
    with lock.hold("game-1"):
        time.sleep(0.2)  # several renewals
        lock.check("game-1")


def test_a_lease_taken_by_another_holder_fails_the_check_as_a_conflict() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)
    with lock.hold("game-1"):
        leases.expire("game-1")
        leases.tokens["game-1"] = "another-holder"
        assert wait_until(lambda: _found_lost(lock, "game-1"))
        with pytest.raises(LeaseLost) as lost:
            lock.check("game-1")
    assert lost.value.code is ErrorCode.CONFLICT
    assert lost.value.to_failure().metadata["lease"] == "lost"
    assert leases.tokens["game-1"] == "another-holder"  # our release deleted nothing


def test_a_lease_that_cannot_be_renewed_within_its_ttl_fails_the_check_as_unavailable() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)
    with lock.hold("game-1"):
        leases.go_down("renew")
        lock.check("game-1")  # still within its TTL
        time.sleep(SHORT_TTL.total_seconds() + 0.05)
        with pytest.raises(ServiceUnavailable) as unconfirmed:
            lock.check("game-1")
    assert unconfirmed.value.code is ErrorCode.SERVICE_UNAVAILABLE


def test_a_slow_renewal_of_one_game_does_not_starve_another() -> None:
    class SlowForOne(FakeLeases):
        def renew(self, lease: Lease, ttl: timedelta) -> bool:
            if lease.game_id == "slow":
                time.sleep(1.0)  # a Redis call waiting out its timeout
            return super().renew(lease, ttl)

    leases = SlowForOne()
    lock = GameLock(leases, SHORT_TTL)
    with lock.hold("slow"), lock.hold("quick") as quick:
        time.sleep(0.6)
        assert renewals(leases, quick) >= 5
        lock.check("quick")


def _found_lost(lock: GameLock, game_id: str) -> bool:
    """Whether the renewer has found the lease taken.

    Until its next renewal runs the check passes, or, when that renewal is
    late past the TTL (a loaded machine), says the lease is unconfirmed:
    both mean "not found out yet".
    """
    try:
        lock.check(game_id)
    except ConcurrentModification:
        return True
    except ServiceUnavailable:
        return False
    return False


def renewer_threads(game_id: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"lease-{game_id}"]


def test_an_operation_that_ends_before_its_first_renewal_gets_no_renewer_thread() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, LONG_TTL)  # first renewal due after 10 s

    for _ in range(3):
        with lock.hold("game-1"):
            assert renewer_threads("game-1") == []

    assert leases.renewed == []
    assert renewer_threads("game-1") == []


def test_a_lease_held_past_its_first_renewal_gets_a_renewer_thread_of_its_own() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)

    with lock.hold("game-1") as lease:
        assert renewer_threads("game-1") == []  # due only 50 ms after the acquire
        assert wait_until(lambda: renewals(leases, lease) >= 1)
        assert len(renewer_threads("game-1")) == 1

    assert wait_until(lambda: renewer_threads("game-1") == [])


def test_leases_taken_one_after_another_are_each_renewed_when_due() -> None:
    leases = FakeLeases()
    lock = GameLock(leases, SHORT_TTL)

    with lock.hold("game-1") as first:
        time.sleep(0.02)
        with lock.hold("game-2") as second:
            assert wait_until(lambda: renewals(leases, second) >= 2)
            assert renewals(leases, first) >= 2
