"""The loop base every background loop uses (mmanager.loops)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

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


def refused_is_expected(told: list[tuple[str, BaseException]]) -> Callable[[str, BaseException], bool]:
    """A ``quiet`` that expects refused connections (and notes everything it is told)."""

    def quiet(name: str, exc: BaseException) -> bool:
        told.append((name, exc))
        return isinstance(exc, ConnectionRefusedError)

    return quiet


class Raising(LoopService):
    name = "raising"

    def __init__(self, exc: Exception, took: float = 0.0) -> None:
        super().__init__(interval=0.001, jitter=0.0)
        self.exc = exc
        self.took = took

    async def run_once(self) -> None:
        await asyncio.sleep(self.took)
        raise self.exc


async def test_a_failure_quiet_does_not_account_for_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    told: list[tuple[str, BaseException]] = []
    loop = Raising(ValueError("a bug"))
    loop.quiet = refused_is_expected(told)
    with caplog.at_level(logging.DEBUG, logger="mmanager.loops"):
        try:
            await loop.run_once()
        except ValueError as exc:
            loop.failed(exc)
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.getMessage() == "raising: iteration failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert [(name, str(e)) for name, e in told] == [("raising", "a bug")]


async def test_a_failure_quiet_accounts_for_logs_nothing_here_not_even_its_overrun(
        caplog: pytest.LogCaptureFixture) -> None:
    told: list[tuple[str, BaseException]] = []
    # Each iteration takes longer than the interval: without the outage, an overrun to warn of.
    loop = Raising(ConnectionRefusedError("refused"), took=0.01)
    loop.quiet = refused_is_expected(told)
    with caplog.at_level(logging.DEBUG, logger="mmanager.loops"):
        loop.start()
        try:
            await eventually(lambda: len(told) >= 3, 5, "three failed iterations")
        finally:
            await loop.stop()
    assert caplog.records == [] and {name for name, _ in told} == {"raising"}
