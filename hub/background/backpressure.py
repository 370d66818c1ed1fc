"""Moves yield to heartbeats.

The leader's moves (failover, drain, recovery) run in the same event loop that answers heartbeats.
A mass failover of thousands could take all of it, make heartbeats late, and so get live controllers
declared lost, which means more moves: a collapse. So moves run at most ``limit`` at once, a limit
that halves while the hub is saturated and grows back while it keeps up (additive increase,
multiplicative decrease, as TCP's congestion window does). Saturated: the process used more than
``BUSY`` of a core over the last half second (work then queues: every request waits longer), or the
event loop ran late, a short sleep waking up much later than asked (``LoopLag``), or a heartbeat
waited for its answer longer than ``BEAT_LATE`` of the time its controller waits for one, whatever held
it up (a database slowed by the moves' writes, a machine whose cores the hub shares): the heartbeats
themselves say they are late.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable

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
# The longest wait of a heartbeat for its answer in a window, as a share of how long its controller waits
# for one (half the grace, 1 to 5 s: mmanager.wire.answer_wait), above which the limit halves, and under
# which (with the rest on time) it grows again.
BEAT_LATE = 1.0 / 3
BEAT_ON_TIME = 0.15
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

    def adjust(self, lag: float, busy: float = 0.0, beat_late: float = 0.0) -> None:
        """One window's lag, CPU use and heartbeats' lateness: halve the limit when saturated, grow it
        when keeping up."""
        if lag > LATE or busy > BUSY or beat_late > BEAT_LATE:
            self.limit = max(self.minimum, self.limit // 2)
        elif lag < ON_TIME and busy < NOT_BUSY and beat_late < BEAT_ON_TIME and self.limit < self.maximum:
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
    """Samples how late the event loop wakes a sleeper and how much CPU the process uses, and hands
    each window's median lag and CPU share to ``limit``, with the heartbeats' lateness meanwhile
    (``beat_late``: called once a window, it returns that and starts over)."""

    def __init__(self, limit: AdaptiveLimit, beat_late: Callable[[], float] | None = None) -> None:
        self.limit = limit
        self.beat_late = beat_late or (lambda: 0.0)
        self.lag = 0.0
        self.busy = 0.0
        self.late = 0.0
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
            began, cpu = loop.time(), time.process_time()
            for _ in range(WINDOW):
                due = loop.time() + SAMPLE_EVERY
                await asyncio.sleep(SAMPLE_EVERY)
                samples.append(loop.time() - due)
            self.lag = statistics.median(samples)
            self.busy = (time.process_time() - cpu) / max(loop.time() - began, 1e-6)
            self.late = self.beat_late()
            before = self.limit.limit
            self.limit.adjust(self.lag, self.busy, self.late)
            if self.limit.limit != before:
                log.info("moves at once: %d (event loop %.0f ms late, %.0f %% of a core, a heartbeat waited %.0f %% "
                         "of its controller's patience)", self.limit.limit, 1000 * self.lag, 100 * self.busy,
                         100 * self.late)
