"""A per-user token bucket, held in this hub replica's memory.

Each user's bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a
second; a request takes one token or is refused with the whole seconds until one
is back. Buckets are per replica: behind N replicas a user gets up to N times the
rate, which is the point of a cheap guard against one user flooding a hub, not a
billing-grade quota (that would need a shared store on every request).

Pure: the clock is passed in, so tests need no sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}

    def acquire(self, user_id: int) -> int:
        """Take a token for ``user_id``: 0 when the request may go ahead, else the seconds to wait (>= 1)."""
        now = self._clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
