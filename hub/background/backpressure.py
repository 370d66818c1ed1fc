"""Moves yield to heartbeats.

The leader's moves (failover, drain, recovery) run in the same event loop that answers heartbeats.
A mass failover of thousands could take all of it, make heartbeats late, and so get live controllers
declared lost, which means more moves: a collapse. So moves run at most ``limit`` at once, a limit
that halves while the event loop runs late and grows back while it keeps up (additive increase,
multiplicative decrease, as TCP's congestion window does). How late the loop runs is how much later
than asked a short sleep wakes up (``LoopLag``), which grows with everything that is ready to run
ahead of it, the heartbeats included.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

# A window's median lag (seconds) above which the limit halves, and under which it grows again. The
# median, not the worst: one long step (a flush of thousands of heartbeats) makes one late sample and
# is no sign of too many moves; thousands of ready tasks make every sample late.
LATE = 0.1
ON_TIME = 0.03
# The sampling period, and how many samples make a window.
SAMPLE_EVERY = 0.05
WINDOW = 10


class AdaptiveLimit:
    """At most ``limit`` holders at once, ``limit`` between ``minimum`` and ``maximum``; waiters are
    let in first come, first served."""

    def __init__(self, maximum: int, minimum: int = 1) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.limit = maximum
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        while self.active >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.done():
                    waiter.cancel()
                else:
                    self._wake()  # woken and cancelled at once: the turn passes on
                raise
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def adjust(self, lag: float) -> None:
        """One window's lag: halve the limit when late, grow it when on time."""
        if lag > LATE:
            self.limit = max(self.minimum, self.limit // 2)
        elif lag < ON_TIME and self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit + max(1, self.maximum // 16))
            self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class LoopLag:
    """Samples how late the event loop wakes a sleeper, and hands each window's median to ``limit``."""

    def __init__(self, limit: AdaptiveLimit) -> None:
        self.limit = limit
        self.lag = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            samples = []
            for _ in range(WINDOW):
                due = loop.time() + SAMPLE_EVERY
                await asyncio.sleep(SAMPLE_EVERY)
                samples.append(loop.time() - due)
            self.lag = statistics.median(samples)
            before = self.limit.limit
            self.limit.adjust(self.lag)
            if self.limit.limit != before:
                log.info("moves at once: %d (event loop %.0f ms late)", self.limit.limit, 1000 * self.lag)
