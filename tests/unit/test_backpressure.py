"""Moves yield to heartbeats: the move limit halves while the event loop runs late, grows back while it
keeps up, and never lets more moves run than it allows."""

from __future__ import annotations

import asyncio
import time

from hub.background.backpressure import BUSY, LATE, NOT_BUSY, ON_TIME, AdaptiveLimit, LoopLag


async def test_the_limit_halves_when_late_and_grows_back_when_on_time() -> None:
    limit = AdaptiveLimit(32)
    limit.adjust(LATE * 2)
    assert limit.limit == 16
    for _ in range(10):
        limit.adjust(LATE * 2)
    assert limit.limit == 1  # never below one: moves slow down, they do not stop
    limit.adjust((LATE + ON_TIME) / 2)
    assert limit.limit == 1  # in between: kept
    for _ in range(100):
        limit.adjust(0.0)
    assert limit.limit == 32  # never above the configured concurrency


async def test_a_saturated_process_halves_the_limit_even_with_an_event_loop_on_time() -> None:
    limit = AdaptiveLimit(32)
    limit.adjust(0.0, busy=BUSY + 0.05)
    assert limit.limit == 16
    limit.adjust(0.0, busy=(BUSY + NOT_BUSY) / 2)
    assert limit.limit == 16  # busy, not saturated: kept
    limit.adjust(0.0, busy=NOT_BUSY - 0.1)
    assert limit.limit == 18


async def test_no_more_run_at_once_than_the_limit_and_waiters_go_in_as_it_grows() -> None:
    limit = AdaptiveLimit(8)
    for _ in range(2):
        limit.adjust(1.0)
    assert limit.limit == 2
    running, most, started = 0, 0, []
    release = asyncio.Event()

    async def move(n: int) -> None:
        nonlocal running, most
        async with limit.slot():
            started.append(n)
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1

    tasks = [asyncio.create_task(move(n)) for n in range(6)]
    await asyncio.sleep(0.01)
    assert started == [0, 1]  # first come, first served
    limit.adjust(0.0)  # on time: the limit grows (by one at this size) and a waiter goes in
    await asyncio.sleep(0.01)
    assert started == [0, 1, 2] and limit.limit == 3
    release.set()
    await asyncio.gather(*tasks)
    assert most == 3 and limit.active == 0


async def test_a_blocked_event_loop_lowers_the_limit() -> None:
    limit = AdaptiveLimit(32)
    lag = LoopLag(limit)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        # Something keeps the loop busy (as thousands of ready tasks do): the sampler wakes up late, again
        # and again.
        for _ in range(40):
            time.sleep(LATE * 1.5)
            await asyncio.sleep(0)
            if limit.limit < 32:
                break
        assert limit.limit == 16 and (lag.lag > LATE or lag.busy > BUSY)
    finally:
        await lag.stop()
