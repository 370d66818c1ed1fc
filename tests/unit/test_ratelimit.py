"""The per-user token bucket, with the clock in the test's hands."""

from __future__ import annotations

import pytest

from hub.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_request_per_token_refilled() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire(1) for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire(1) == 1  # half a second to the next token, said in whole seconds
    clock.now += 0.5
    assert limiter.acquire(1) == 0
    assert limiter.acquire(1) == 1


def test_retry_after_is_whole_seconds_until_a_token_is_back() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.25, burst=1, clock=clock)
    assert limiter.acquire(7) == 0
    assert limiter.acquire(7) == 4
    clock.now += 3.0
    assert limiter.acquire(7) == 1
    clock.now += 1.0
    assert limiter.acquire(7) == 0


def test_users_have_their_own_buckets_and_idle_time_refills_only_up_to_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert [limiter.acquire(1) for _ in range(3)] == [0, 0, 1]
    assert [limiter.acquire(2) for _ in range(2)] == [0, 0]
    clock.now += 3600
    assert [limiter.acquire(1) for _ in range(3)] == [0, 0, 1]


def test_refused_requests_take_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.acquire(1) == 0
    for _ in range(10):
        assert limiter.acquire(1) == 1
    clock.now += 1.0
    assert limiter.acquire(1) == 0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_a_limit_that_lets_nothing_through_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)
