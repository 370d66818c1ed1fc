"""One small base for every background loop, the hub's and the controller's.

``run_once()`` per iteration, the first right at ``start()``; ``next_delay()``
says how long until the next (by default the interval, jittered, less what
the iteration took), and ``wake()`` cuts that wait short; an iteration that
raises is handed to ``failed()`` and never ends the loop: a traceback, unless
``quiet`` (set by the application) accounts for it as an expected failure
that it logs its own way (the hub's database away: ``hub.outage``). ``stop()`` lets the iteration in progress finish, or,
with ``cancel_on_stop``, cancels it. Tests call ``run_once()`` directly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class LoopService(ABC):
    name = "loop"
    # Whether stop() cancels the iteration in progress (and whatever else running() names) instead of
    # waiting for it to finish, and how long it then waits for them (None: until they are gone).
    cancel_on_stop = False
    stop_wait: float | None = None
    # Given the loop's name and what an iteration raised: True when it is an expected failure that it has
    # logged (once per outage, say), so that the loop logs no traceback for it.
    quiet: Callable[[str, BaseException], bool] | None = None

    def __init__(self, interval: float, jitter: float = 0.1) -> None:
        self.interval = interval
        self.jitter = jitter
        self._stopped = asyncio.Event()
        # Set by wake() and stop(): the wait between iterations ends early.
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Whether the last iteration failed as ``quiet`` expected: its overrun is no news either.
        self._excused = False

    @abstractmethod
    async def run_once(self) -> None: ...

    def next_delay(self, took: float) -> float:
        """Seconds from the end of an iteration that took ``took`` seconds to the start of the next."""
        if took > self.interval:
            self.overran(took)
        return max(self.interval * (1 + random.uniform(-self.jitter, self.jitter)) - took, 0.0)

    def overran(self, took: float) -> None:
        if self._excused:
            return  # it failed as expected (the database away, say): that is told once, elsewhere
        log.warning("%s: iteration took %.2fs, longer than its %.2fs interval", self.name, took, self.interval)

    def expected(self, exc: BaseException) -> bool:
        """Whether ``quiet`` accounts for ``exc`` (and has logged it); anything else deserves a traceback."""
        return self.quiet is not None and self.quiet(self.name, exc)

    def failed(self, exc: Exception) -> None:
        """An iteration raised ``exc``; called inside its ``except``."""
        self._excused = self.expected(exc)
        if not self._excused:
            log.exception("%s: iteration failed", self.name)

    def running(self) -> set[asyncio.Task[Any]]:
        """What ``stop()`` waits for: the loop, and what a subclass runs beside it."""
        return {self._task} if self._task is not None else set()

    def wake(self) -> None:
        """Run the next iteration now, or right after the one in progress."""
        self._woken.set()

    def start(self) -> None:
        if self._task is not None:
            return
        self._stopped.clear()
        self._woken.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopped.set()
        self._woken.set()
        tasks = self.running()
        if tasks:
            if self.cancel_on_stop:
                for task in tasks:
                    task.cancel()
            # wait() rather than await: whatever the loop ended with, stopping it must not raise.
            _, pending = await asyncio.wait(tasks, timeout=self.stop_wait if self.cancel_on_stop else None)
            if pending:
                # Bounded: a task stuck somewhere uncancellable must not hold up the shutdown.
                log.warning("%s: %d task(s) did not stop within %gs; leaving them", self.name, len(pending),
                            self.stop_wait)
        self._task = None

    async def _run(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            self._excused = False
            try:
                await self.run_once()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the loop itself is being cancelled
                # Something the iteration awaited was cancelled under it (a peer shutting down):
                # an iteration error like any other.
                log.warning("%s: iteration was cancelled from below", self.name)
            except Exception as exc:
                self.failed(exc)
            delay = self.next_delay(time.monotonic() - started)
            try:
                await asyncio.wait_for(self._woken.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._woken.clear()
