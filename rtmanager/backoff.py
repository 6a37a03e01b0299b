"""The one backoff policy of the service: capped exponential delays with equal jitter.

Every retry loop (reconnecting to Docker's event stream or PostgreSQL's
LISTEN feed, re-reading Redis streams, retrying a Lobby job whose game is
busy) waits `Backoff.delay(failures)` between attempts. The arithmetic is
redis-py's `EqualJitterBackoff` (the client library already ships and
tests it): half of each delay is fixed and half random, so replicas
retrying the same outage do not hit the recovering system in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from redis.backoff import EqualJitterBackoff

# 2**32 times any base is far past every cap; larger exponents would
# overflow a float.
_MAX_EXPONENT = 32


@dataclass(frozen=True)
class Backoff:
    """Delays of `base`, twice, four times `base`... capped at `cap`; each jittered to 50-100%."""

    base: timedelta
    cap: timedelta
    _policy: EqualJitterBackoff = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base <= timedelta(0):
            raise ValueError(f"backoff base must be positive, got {self.base}")
        if self.cap < self.base:
            raise ValueError(f"backoff cap {self.cap} must not be below its base {self.base}")
        policy = EqualJitterBackoff(cap=self.cap.total_seconds(), base=self.base.total_seconds())
        object.__setattr__(self, "_policy", policy)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, …)."""
        return self._policy.compute(min(max(failures - 1, 0), _MAX_EXPONENT))
