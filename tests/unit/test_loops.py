"""The loop base every background loop uses (mmanager.loops)."""

from __future__ import annotations

import asyncio

from mmanager.loops import LoopService
from tests.support.poll import eventually


class Counting(LoopService):
    name = "counting"

    def __init__(self, interval: float = 0.01, fail_first: bool = False) -> None:
        super().__init__(interval, jitter=0.0)
        self.runs = 0
        self.fail_first = fail_first
        self.failures: list[Exception] = []
        self.delays: list[float] = []
        self.ran = asyncio.Event()

    async def run_once(self) -> None:
        self.runs += 1
        self.ran.set()
        if self.fail_first and self.runs == 1:
            raise RuntimeError("boom")

    def failed(self, exc: Exception) -> None:
        self.failures.append(exc)


async def test_the_first_iteration_runs_at_start_and_a_failure_does_not_end_the_loop() -> None:
    loop = Counting(interval=3600, fail_first=True)
    loop.start()
    try:
        await asyncio.wait_for(loop.ran.wait(), 5)
        assert loop.runs == 1 and [str(e) for e in loop.failures] == ["boom"]
    finally:
        await loop.stop()
    assert loop._task is None


async def test_next_delay_decides_when_the_next_iteration_runs() -> None:
    class Scripted(Counting):
        def next_delay(self, took: float) -> float:
            self.delays.append(took)
            return 0.0 if self.runs < 3 else 3600.0

    loop = Scripted(interval=3600)
    loop.start()
    try:
        await eventually(lambda: loop.runs == 3, 5, "three runs", interval=0.005)
        await asyncio.sleep(0.05)
        assert loop.runs == 3 and len(loop.delays) == 3
    finally:
        await loop.stop()


async def test_stop_waits_for_the_iteration_or_cancels_it() -> None:
    release = asyncio.Event()

    class Slow(Counting):
        finished = False

        async def run_once(self) -> None:
            self.ran.set()
            await release.wait()
            self.finished = True

    graceful = Slow()
    graceful.start()
    await asyncio.wait_for(graceful.ran.wait(), 5)
    stopping = asyncio.create_task(graceful.stop())
    await asyncio.sleep(0.02)
    assert not stopping.done()  # the iteration under way is let finish
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert graceful.finished

    release.clear()
    cancelled = Slow()
    cancelled.cancel_on_stop = True
    cancelled.start()
    await asyncio.wait_for(cancelled.ran.wait(), 5)
    await asyncio.wait_for(cancelled.stop(), 5)
    assert not cancelled.finished and cancelled._task is None


async def test_a_second_start_is_a_no_op_and_a_stopped_loop_starts_again() -> None:
    loop = Counting(interval=3600)
    loop.start()
    first = loop._task
    loop.start()
    assert loop._task is first
    await asyncio.wait_for(loop.ran.wait(), 5)
    await loop.stop()
    loop.ran.clear()
    loop.start()
    try:
        await asyncio.wait_for(loop.ran.wait(), 5)
        assert loop.runs == 2
    finally:
        await loop.stop()


async def test_wake_runs_the_next_iteration_now() -> None:
    loop = Counting(interval=3600)
    loop.start()
    try:
        await eventually(lambda: loop.runs == 1, 5, "the first run", interval=0.005)
        loop.wake()
        await eventually(lambda: loop.runs == 2, 5, "a run at once, not after the hour", interval=0.005)
        # Woken once, it runs once: then the interval again.
        await asyncio.sleep(0.05)
        assert loop.runs == 2
    finally:
        await loop.stop()
