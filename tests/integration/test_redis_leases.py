"""The `GameLeases` contract against a real Redis (`RedisGameLeases`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
import redis

from rtmanager.adapters.redis import leases as leases_module
from rtmanager.adapters.redis.client import create_redis
from rtmanager.adapters.redis.leases import RedisGameLeases
from rtmanager.domain.errors import ErrorCode, ServiceUnavailable
from rtmanager.domain.explanation import LeaseHolder
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.ports import Lease
from tests.conftest import REDIS_URL
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.integration

LONG = timedelta(seconds=30)
SHORT = timedelta(milliseconds=200)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = create_redis(REDIS_URL, timeout=timedelta(seconds=5))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def leases(client: redis.Redis, redis_prefix: str) -> RedisGameLeases:
    return RedisGameLeases(client, prefix=redis_prefix)


def pttl(client: redis.Redis, key: str) -> int:
    """The key's remaining time to live in milliseconds."""
    return cast(int, client.pttl(key))


def poll(condition: Callable[[], bool], *, within: float = 3.0, every: float = 0.01) -> bool:
    """Return True as soon as `condition()` holds, False after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


class FixedTokens:
    """Stands in for the `secrets` module, handing out one known token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def token_urlsafe(self, nbytes: int) -> str:
        return self.token


# --- acquiring -------------------------------------------------------------


def test_lease_key_holds_the_token_under_the_prefix(
    leases: RedisGameLeases, client: redis.Redis, redis_prefix: str
) -> None:
    lease = leases.acquire("game-1", LONG)

    assert lease is not None
    assert lease.game_id == "game-1"
    assert leases.key("game-1") == f"{redis_prefix}lease:game:game-1"
    assert client.get(f"{redis_prefix}lease:game:game-1") == lease.token.encode()
    assert 29_000 < pttl(client, leases.key("game-1")) <= 30_000


def test_every_lease_gets_a_fresh_random_token(leases: RedisGameLeases) -> None:
    tokens = set()
    for _ in range(5):
        lease = leases.acquire("game-1", LONG)
        assert lease is not None
        assert len(lease.token) >= 32
        tokens.add(lease.token)
        assert leases.release(lease)
    assert len(tokens) == 5


# --- who holds a lease ---------------------------------------------------------


def test_a_lease_token_names_the_instance_that_took_it_and_holder_reads_it_back(
    client: redis.Redis, redis_prefix: str
) -> None:
    leases = RedisGameLeases(client, prefix=redis_prefix, instance_id="replica-a")
    taken = time.monotonic()
    lease = leases.acquire("game-1", LONG)

    assert lease is not None
    instance_id, _, random_part = lease.token.partition("/")
    assert instance_id == "replica-a"
    assert len(random_part) >= 32
    held = leases.holder("game-1")
    since_taken = timedelta(seconds=time.monotonic() - taken)
    assert held is not None
    assert held.instance_id == "replica-a"
    # What is left of the TTL: no more than it, no less than it minus the time since (± Redis's ms).
    assert held.ttl is not None
    assert LONG - since_taken - timedelta(milliseconds=1) <= held.ttl <= LONG
    # Another replica reads the same holder.
    other = RedisGameLeases(client, prefix=redis_prefix, instance_id="replica-b")
    seen = other.holder("game-1")
    assert seen is not None and seen.instance_id == "replica-a"
    assert leases.holder("game-2") is None
    assert leases.release(lease)
    assert leases.holder("game-1") is None


def test_only_the_whole_token_proves_holding_a_lease_not_the_instance_id(
    client: redis.Redis, redis_prefix: str
) -> None:
    first = RedisGameLeases(client, prefix=redis_prefix, instance_id="replica-a")
    lease = first.acquire("game-1", SHORT)
    assert lease is not None
    assert wait_for(lambda: first.holder("game-1") is None)
    # The same instance (a restarted process) takes the game again.
    again = RedisGameLeases(client, prefix=redis_prefix, instance_id="replica-a")
    newer = again.acquire("game-1", LONG)
    assert newer is not None and newer.token != lease.token
    assert not first.renew(lease, LONG)
    assert not first.release(lease)
    held = again.holder("game-1")
    assert held is not None and held.instance_id == "replica-a"


def test_holder_of_a_token_naming_no_instance_is_reported_without_one(
    client: redis.Redis, leases: RedisGameLeases
) -> None:
    client.set(leases.key("game-1"), "another-replica", px=5_000)
    held = leases.holder("game-1")
    assert held is not None
    assert held.instance_id == ""
    assert held.ttl is not None and timedelta(0) < held.ttl <= timedelta(seconds=5)
    # An instance id with the separator in it is read whole.
    client.set(leases.key("game-2"), "pod/7/abcdefgh")
    assert leases.holder("game-2") == LeaseHolder("pod/7", ttl=None)  # and no expiry


def test_a_lease_taken_without_an_instance_id_is_just_the_random_token(
    leases: RedisGameLeases,
) -> None:
    lease = leases.acquire("game-1", LONG)
    assert lease is not None
    assert "/" not in lease.token
    held = leases.holder("game-1")
    assert held is not None and held.instance_id == ""


def race_for_lease(
    contenders: list[RedisGameLeases], game_id: str
) -> tuple[list[Lease | None], list[BaseException]]:
    """Let every contender acquire `game_id` at once; return their results and errors."""
    barrier = threading.Barrier(len(contenders))
    results: list[Lease | None] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def contend(leases: RedisGameLeases) -> None:
        try:
            barrier.wait(timeout=10)
            outcome = leases.acquire(game_id, LONG)
        except BaseException as error:
            with lock:
                errors.append(error)
            return
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=contend, args=(leases,)) for leases in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    return results, errors


def test_only_one_of_sixteen_racing_threads_gets_the_lease(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    for round_number in range(5):
        game_id = f"race-{round_number}"

        results, errors = race_for_lease([leases] * 16, game_id)

        assert errors == []
        assert len(results) == 16
        winners = [lease for lease in results if lease is not None]
        assert len(winners) == 1
        assert client.get(leases.key(game_id)) == winners[0].token.encode()


def test_only_one_of_many_replicas_gets_the_lease(redis_prefix: str) -> None:
    # Each contender has its own client and adapter, as separate replicas would.
    clients = [create_redis(REDIS_URL, timeout=timedelta(seconds=5)) for _ in range(8)]
    try:
        replicas = [RedisGameLeases(c, prefix=redis_prefix) for c in clients]

        results, errors = race_for_lease(replicas, "shared-game")

        assert errors == []
        assert len(results) == 8
        assert sum(lease is not None for lease in results) == 1
    finally:
        for c in clients:
            c.close()


def test_held_lease_is_not_taken_over_before_it_expires(leases: RedisGameLeases) -> None:
    started = time.monotonic()
    holder = leases.acquire("game-1", SHORT)
    assert holder is not None

    assert leases.acquire("game-1", LONG) is None

    taken: list[Lease] = []

    def take_over() -> bool:
        lease = leases.acquire("game-1", LONG)
        if lease is not None:
            taken.append(lease)
        return lease is not None

    assert poll(take_over, within=3.0)
    # The key expires 200 ms after the holder's SET, which came after `started`.
    assert time.monotonic() - started >= 0.19
    assert taken[0].token != holder.token


def test_expired_lease_is_taken_over(leases: RedisGameLeases, client: redis.Redis) -> None:
    holder = leases.acquire("game-1", SHORT)
    assert holder is not None

    assert poll(lambda: client.exists(leases.key("game-1")) == 0)
    successor = leases.acquire("game-1", LONG)

    assert successor is not None
    assert client.get(leases.key("game-1")) == successor.token.encode()


def test_acquire_while_held_leaves_the_holders_lease_untouched(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    holder = leases.acquire("game-1", timedelta(seconds=10))
    assert holder is not None

    assert leases.acquire("game-1", timedelta(seconds=60)) is None

    assert client.get(leases.key("game-1")) == holder.token.encode()
    assert pttl(client, leases.key("game-1")) <= 10_000


def test_acquire_recognises_a_lease_its_own_retried_set_already_took(
    leases: RedisGameLeases, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When a connection breaks after SET NX took the lease, the client's
    # retry finds the key holding our own token: the lease is ours.
    monkeypatch.setattr(leases_module, "secrets", FixedTokens("our-token"))
    client.set(leases.key("game-1"), "our-token", px=10_000)

    assert leases.acquire("game-1", LONG) == Lease(game_id="game-1", token="our-token")


def test_ttl_must_be_positive(leases: RedisGameLeases, client: redis.Redis) -> None:
    for ttl in (timedelta(0), timedelta(milliseconds=-1)):
        with pytest.raises(ValueError, match="positive"):
            leases.acquire("game-1", ttl)
    assert client.exists(leases.key("game-1")) == 0

    lease = leases.acquire("game-1", LONG)
    assert lease is not None
    with pytest.raises(ValueError, match="positive"):
        leases.renew(lease, timedelta(0))


def test_sub_millisecond_ttl_is_rounded_up_to_one_millisecond(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    lease = leases.acquire("game-1", timedelta(microseconds=1))

    assert lease is not None  # a ttl of 0 ms would have been refused by Redis
    assert poll(lambda: client.exists(leases.key("game-1")) == 0, within=1.0)


def test_fractional_ttl_is_rounded_up(leases: RedisGameLeases, client: redis.Redis) -> None:
    lease = leases.acquire("game-1", timedelta(seconds=20, microseconds=1))

    assert lease is not None
    assert 19_000 < pttl(client, leases.key("game-1")) <= 20_001


# --- renewing ----------------------------------------------------------------


def test_renew_extends_the_ttl(leases: RedisGameLeases, client: redis.Redis) -> None:
    lease = leases.acquire("game-1", timedelta(seconds=1))
    assert lease is not None
    assert pttl(client, leases.key("game-1")) <= 1_000

    assert leases.renew(lease, LONG) is True

    assert 29_000 < pttl(client, leases.key("game-1")) <= 30_000
    assert client.get(leases.key("game-1")) == lease.token.encode()


def test_renewed_lease_outlives_its_original_ttl(leases: RedisGameLeases) -> None:
    started = time.monotonic()
    lease = leases.acquire("game-1", timedelta(milliseconds=300))
    assert lease is not None
    time.sleep(0.1)
    assert leases.renew(lease, timedelta(seconds=5)) is True

    time.sleep(max(0.0, 0.4 - (time.monotonic() - started)))

    # Past its original 300 ms, the renewed lease is still held.
    assert leases.acquire("game-1", LONG) is None
    assert leases.release(lease) is True


def test_renew_of_an_expired_lease_fails_and_creates_nothing(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    lease = leases.acquire("game-1", SHORT)
    assert lease is not None
    assert poll(lambda: client.exists(leases.key("game-1")) == 0)

    assert leases.renew(lease, LONG) is False
    assert client.exists(leases.key("game-1")) == 0


# --- a stale holder ----------------------------------------------------------


def test_stale_holder_cannot_release_or_renew_the_new_holders_lease(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    stale = leases.acquire("game-1", timedelta(milliseconds=100))
    assert stale is not None
    assert poll(lambda: client.exists(leases.key("game-1")) == 0)
    current = leases.acquire("game-1", timedelta(seconds=10))
    assert current is not None

    assert leases.renew(stale, timedelta(seconds=60)) is False
    assert leases.release(stale) is False

    key = leases.key("game-1")
    assert client.get(key) == current.token.encode()
    assert 9_000 < pttl(client, key) <= 10_000  # not extended to 60 s, not cleared
    assert leases.acquire("game-1", LONG) is None
    assert leases.release(current) is True


def test_lease_of_one_game_cannot_touch_another_games_lease(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    first = leases.acquire("game-1", LONG)
    second = leases.acquire("game-2", timedelta(seconds=10))
    assert first is not None
    assert second is not None

    forged = Lease(game_id="game-2", token=first.token)
    assert leases.renew(forged, timedelta(seconds=60)) is False
    assert leases.release(forged) is False

    assert client.get(leases.key("game-2")) == second.token.encode()
    assert pttl(client, leases.key("game-2")) <= 10_000


# --- releasing ---------------------------------------------------------------


def test_release_then_acquire(leases: RedisGameLeases, client: redis.Redis) -> None:
    first = leases.acquire("game-1", LONG)
    assert first is not None

    assert leases.release(first) is True
    assert client.exists(leases.key("game-1")) == 0
    second = leases.acquire("game-1", LONG)

    assert second is not None
    assert second.token != first.token


def test_release_twice_reports_the_second_as_not_ours(leases: RedisGameLeases) -> None:
    lease = leases.acquire("game-1", LONG)
    assert lease is not None

    assert leases.release(lease) is True
    assert leases.release(lease) is False


def test_different_games_do_not_interfere(leases: RedisGameLeases, client: redis.Redis) -> None:
    first = leases.acquire("game-1", LONG)
    second = leases.acquire("game-2", LONG)
    assert first is not None
    assert second is not None

    assert leases.release(first) is True

    assert client.get(leases.key("game-2")) == second.token.encode()
    assert leases.acquire("game-2", LONG) is None
    assert leases.renew(second, LONG) is True


def test_prefixes_separate_deployments(client: redis.Redis, redis_prefix: str) -> None:
    staging = RedisGameLeases(client, prefix=f"{redis_prefix}staging:")
    production = RedisGameLeases(client, prefix=f"{redis_prefix}production:")

    assert staging.acquire("game-1", LONG) is not None
    assert production.acquire("game-1", LONG) is not None


def test_release_works_after_the_scripts_were_flushed(
    leases: RedisGameLeases, client: redis.Redis
) -> None:
    # A Redis restart forgets loaded scripts; the adapter reloads them.
    lease = leases.acquire("game-1", LONG)
    assert lease is not None
    assert leases.renew(lease, LONG) is True
    client.script_flush()

    assert leases.renew(lease, LONG) is True
    assert leases.release(lease) is True


# --- Redis unavailable -------------------------------------------------------


def _assert_unavailable(call: Callable[[], object]) -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        call()
    assert caught.value.code is ErrorCode.SERVICE_UNAVAILABLE
    assert "redis" in str(caught.value).lower()
    assert caught.value.metadata["game_id"] == "game-1"


def test_unreachable_redis_is_service_unavailable() -> None:
    client = create_redis("redis://127.0.0.1:1/0", timeout=timedelta(milliseconds=300))
    try:
        leases = RedisGameLeases(client, prefix="unreachable:")
        lease = Lease(game_id="game-1", token="token")
        started = time.monotonic()

        _assert_unavailable(lambda: leases.acquire("game-1", LONG))
        _assert_unavailable(lambda: leases.renew(lease, LONG))
        _assert_unavailable(lambda: leases.release(lease))
        _assert_unavailable(lambda: leases.holder("game-1"))

        assert time.monotonic() - started < 5
    finally:
        client.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    host, port = server.getsockname()
    try:
        yield f"redis://{host}:{port}/0"
    finally:
        server.close()


def test_redis_timing_out_is_service_unavailable(silent_server: str) -> None:
    client = create_redis(silent_server, timeout=timedelta(milliseconds=200))
    try:
        leases = RedisGameLeases(client)
        lease = Lease(game_id="game-1", token="token")
        started = time.monotonic()

        _assert_unavailable(lambda: leases.acquire("game-1", LONG))
        _assert_unavailable(lambda: leases.renew(lease, LONG))
        _assert_unavailable(lambda: leases.release(lease))
        _assert_unavailable(lambda: leases.holder("game-1"))

        # Each call is bounded by the timeout (plus one reconnect), not hung.
        assert time.monotonic() - started < 5
    finally:
        client.close()


def test_an_acquire_whose_reply_was_lost_does_not_block_the_game(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A paused Redis runs a queued SET when it resumes, after the caller
    # gave up: a lease under a token nobody holds. Here the SET lands and
    # its reply is lost, deterministically.
    client = create_redis(REDIS_URL, timeout=timedelta(seconds=5))
    leases = RedisGameLeases(client, prefix=redis_prefix)
    real_set = client.set

    def set_then_time_out(*args: object, **kwargs: object) -> object:
        real_set(*args, **kwargs)  # type: ignore[arg-type]
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    try:
        monkeypatch.setattr(client, "set", set_then_time_out)
        for game_id in ("stuck", "other"):
            with pytest.raises(ServiceUnavailable):
                leases.acquire(game_id, timedelta(seconds=60))
        monkeypatch.setattr(client, "set", real_set)
        assert client.exists(leases.key("stuck"), leases.key("other")) == 2
        assert_stuck_adopted_and_other_dropped(leases, client)
        assert RedisGameLeases(client, prefix=redis_prefix).acquire("other", timedelta(seconds=5))
    finally:
        client.close()


def assert_stuck_adopted_and_other_dropped(leases: RedisGameLeases, client: redis.Redis) -> None:
    """After lost replies for games "stuck" and "other": the next acquire of
    "stuck" adopts what its SET left, and that call drops "other"'s leftover."""
    lease = leases.acquire("stuck", timedelta(seconds=60))
    assert lease is not None
    assert pttl(client, leases.key("stuck")) > 50_000
    assert not client.exists(leases.key("other"))
    assert leases.release(lease)


def test_two_acquires_of_one_game_whose_replies_were_lost_at_once_do_not_block_it(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two operations of one game (a restart and a patch, say) time out on a
    # paused Redis at once; when it resumes, one queued SET lands and the
    # other finds the key taken. Here the winner's reply is lost first and
    # the loser's after it, the order in which a single remembered token
    # would be the loser's.
    client = create_redis(REDIS_URL, timeout=timedelta(seconds=5))
    leases = RedisGameLeases(client, prefix=redis_prefix)
    real_set = client.set
    sent = threading.Barrier(2)
    winner_failed = threading.Event()

    def set_then_time_out(*args: object, **kwargs: object) -> object:
        landed = real_set(*args, **kwargs)  # type: ignore[arg-type]
        sent.wait(timeout=10)
        if not landed:
            winner_failed.wait(timeout=10)
            time.sleep(0.2)  # the winner's failure is recorded by now
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    def attempt(game_id: str) -> None:
        with pytest.raises(ServiceUnavailable):
            leases.acquire(game_id, timedelta(seconds=60))

    def both_time_out(game_id: str) -> None:
        sent.reset()
        winner_failed.clear()

        def first() -> None:
            try:
                attempt(game_id)
            finally:
                winner_failed.set()

        racers = [threading.Thread(target=first)]
        racers[0].start()
        poll(lambda: client.exists(leases.key(game_id)) == 1)  # the winner's SET landed
        racers.append(threading.Thread(target=attempt, args=(game_id,)))
        racers[1].start()
        for racer in racers:
            racer.join(30)

    try:
        monkeypatch.setattr(client, "set", set_then_time_out)
        both_time_out("stuck")
        both_time_out("other")
        monkeypatch.setattr(client, "set", real_set)
        assert_stuck_adopted_and_other_dropped(leases, client)
    finally:
        client.close()


def test_an_acquire_on_a_paused_redis_fails_fast_and_the_game_is_free_after_it_resumes(
    tmp_path: Path,
) -> None:
    with PrivateRedis.started(tmp_path / "redis") as server:
        client = create_redis(server.url, timeout=timedelta(seconds=1))
        leases = RedisGameLeases(client, prefix="p:")
        try:
            server.pause()
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                leases.acquire("paused", timedelta(seconds=60))
            assert time.monotonic() - started < 5
            server.resume()
            # Whether or not the queued SET ran, the game is not blocked.
            assert wait_for(lambda: _acquired(leases, "paused"))
        finally:
            server.resume()
            client.close()


def test_a_release_lost_to_a_redis_restart_lands_once_redis_is_back(tmp_path: Path) -> None:
    # With the service's default TTL: a game must not stay busy for a minute
    # because Redis was down in the second its operation ended.
    with PrivateRedis.started(tmp_path / "redis") as server:
        client = create_redis(server.url, timeout=timedelta(seconds=1))
        leases = RedisGameLeases(client, prefix="p:")
        lock = GameLock(leases, timedelta(seconds=60))
        try:
            with lock.hold("restarted"):
                server.stop()  # the append-only file keeps the lease
            server.start()
            assert wait_for(lambda: _acquired(leases, "restarted"), seconds=10)
        finally:
            client.close()


def _acquired(leases: RedisGameLeases, game_id: str) -> bool:
    try:
        return leases.acquire(game_id, timedelta(seconds=60)) is not None
    except ServiceUnavailable:
        return False


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
