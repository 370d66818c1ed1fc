"""One small base for the hub's loops: ``run_once()`` per iteration, an
interval with jitter, a stop event, and errors logged per iteration without
killing the loop. Tests call ``run_once()`` directly."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)


class LoopService(ABC):
    name = "loop"

    def __init__(self, interval: float, jitter: float = 0.1) -> None:
        self.interval = interval
        self.jitter = jitter
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    async def run_once(self) -> None: ...

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            # wait() rather than await: whatever the loop ended with, stopping it must not raise.
            await asyncio.wait({self._task})
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the loop itself is being cancelled
                # Something the iteration awaited was cancelled under it (a peer shutting down):
                # an iteration error like any other.
                log.warning("%s: iteration was cancelled from below", self.name)
            except Exception:
                log.exception("%s: iteration failed", self.name)
            took = time.monotonic() - started
            if took > self.interval:
                log.warning("%s: iteration took %.2fs, longer than its %.2fs interval", self.name, took, self.interval)
            delay = max(self.interval * (1 + random.uniform(-self.jitter, self.jitter)) - took, 0.0)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                pass
