"""The Redis client every Redis adapter of the service shares."""

from __future__ import annotations

from datetime import timedelta

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# What "Redis is unreachable or timing out" looks like to redis-py:
# ConnectionError covers refused/reset connections, BusyLoadingError (a
# restarting server loading its dataset) and authentication failures;
# ReadOnlyError is a replica answering during a failover.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    TimeoutError,
)

# Token-guarded scripts shared by every key that one holder owns (a game's
# lease, a stream consumer's presence): KEYS[1] the key, ARGV[1] the token.
# Compare-and-expire (ARGV[2] the new TTL in ms): extend only while ours.
RENEW_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Compare-and-delete: drop only while ours.
DELETE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Idle pooled connections are pinged before reuse after this many seconds, so
# a Redis restart costs one quick reconnect rather than a failed command.
HEALTH_CHECK_INTERVAL_SECONDS = 30


def create_redis(url: str, *, timeout: timedelta) -> redis.Redis:
    """Return a pooled client for `url` whose every call is bounded by `timeout`.

    `timeout` bounds connecting and each command's reply (blocking commands
    must therefore block for less). Responses are bytes
    (`decode_responses=False`). A command that fails because the connection
    broke is retried once after a short pause; a timed-out command is not,
    so a call never waits much longer than `timeout`.
    """
    seconds = timeout.total_seconds()
    if seconds <= 0:
        raise ValueError(f"redis timeout must be positive, got {timeout}")
    return redis.Redis.from_url(
        url,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        decode_responses=False,
        retry=Retry(
            ExponentialBackoff(cap=0.2, base=0.05),
            retries=1,
            supported_errors=(redis.exceptions.ConnectionError,),
        ),
    )
