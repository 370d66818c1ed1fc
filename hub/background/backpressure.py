"""Moves yield to heartbeats.

The leader's moves (failover, drain, recovery) run in the same event loop that answers heartbeats.
A mass failover of thousands could take all of it, make heartbeats late, and so get live controllers
declared lost, which means more moves: a collapse. So moves run at most ``limit`` at once, a limit
that halves while the hub is saturated and grows back while it keeps up (additive increase,
multiplicative decrease, as TCP's congestion window does). Saturated: the process used more than
``BUSY`` of a core over the last half second (work then queues: every request waits longer), or the
event loop ran late, a short sleep waking up much later than asked (``LoopLag``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator

from mmanager.loops import LoopService

log = logging.getLogger(__name__)

# A window's median lag (seconds) above which the limit halves, and under which it grows again. The
# median, not the worst: one long step (a flush of thousands of heartbeats) makes one late sample and
# is no sign of too many moves; thousands of ready tasks make every sample late.
LATE = 0.1
ON_TIME = 0.03
# The share of one core (the process's CPU time over the window's) above which the limit halves, and
# under which (and the lag under ON_TIME) it grows again.
BUSY = 0.9
NOT_BUSY = 0.75
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

    def adjust(self, lag: float, busy: float = 0.0) -> None:
        """One window's lag and CPU use: halve the limit when saturated, grow it when keeping up."""
        if lag > LATE or busy > BUSY:
            self.limit = max(self.minimum, self.limit // 2)
        elif lag < ON_TIME and busy < NOT_BUSY and self.limit < self.maximum:
            self.limit = min(self.maximum, self.limit + max(1, self.maximum // 16))
            self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class LoopLag(LoopService):
    """Samples how late the event loop wakes a sleeper and how much CPU the process uses, and hands
    each window's median lag and CPU share to ``limit``."""

    name = "loop-lag"
    cancel_on_stop = True

    def __init__(self, limit: AdaptiveLimit) -> None:
        super().__init__(SAMPLE_EVERY * WINDOW, jitter=0.0)
        self.limit = limit
        self.lag = 0.0
        self.busy = 0.0

    def next_delay(self, took: float) -> float:
        # Windows follow one another: the samples are the loop's pace.
        return 0.0

    async def run_once(self) -> None:
        loop = asyncio.get_running_loop()
        samples = []
        began, cpu = loop.time(), time.process_time()
        for _ in range(WINDOW):
            due = loop.time() + SAMPLE_EVERY
            await asyncio.sleep(SAMPLE_EVERY)
            samples.append(loop.time() - due)
        self.lag = statistics.median(samples)
        self.busy = (time.process_time() - cpu) / max(loop.time() - began, 1e-6)
        before = self.limit.limit
        self.limit.adjust(self.lag, self.busy)
        if self.limit.limit != before:
            log.info("moves at once: %d (event loop %.0f ms late, %.0f %% of a core)", self.limit.limit,
                     1000 * self.lag, 100 * self.busy)
