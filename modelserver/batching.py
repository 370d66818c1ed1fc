"""Dynamic batching: the one place where requests become forward passes.

Callers ``await batcher.submit(items)``. With batching on, items wait in one queue; a batch closes when
``max_batch_size`` items wait or ``max_wait`` has passed since its oldest item arrived, whichever is first, and
runs on the model's single worker thread while the next batch gathers. A request with more items than
``max_batch_size`` is split across batches; each caller gets its own items' answers back, in order. With
batching off, each request runs alone (in chunks of ``max_batch_size``) on the same thread.

Invariants: one batch runs at a time; no item waits longer than ``max_wait`` for company once the worker is
free; a failed batch fails exactly the requests that had items in it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T]):
    item: T
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], list[R]], executor: ThreadPoolExecutor, *, enabled: bool,
                 max_batch_size: int, max_wait_s: float,
                 observe: Callable[[int, float], None] | None = None) -> None:
        """``run`` answers a list of items in order (on ``executor``'s thread); ``observe(size, seconds)`` is
        told of every batch run."""
        self._run = run
        self._executor = executor
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._observe = observe
        self._queue: deque[_Waiting[T]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # With batching off, requests still take turns on the one thread.
        self._turn = asyncio.Lock()

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            waiting = self._queue.popleft()
            if not waiting.future.done():
                waiting.future.cancel()

    async def submit(self, items: list[T]) -> list[R]:
        """The answers to ``items``, in order."""
        if not self.enabled:
            return await self._alone(items)
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(item, loop.create_future()) for item in items]
        self._queue.extend(waiting)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(w.future for w in waiting)))
        except BaseException:
            # The first failure is raised; the request's other items need no answer, and their errors are
            # marked as seen.
            for w in waiting:
                if not w.future.done():
                    w.future.cancel()
                elif not w.future.cancelled():
                    w.future.exception()
            raise

    async def _alone(self, items: list[T]) -> list[R]:
        answers: list[R] = []
        async with self._turn:
            for start in range(0, len(items), self.max_batch_size):
                answers.extend(await self._execute(items[start:start + self.max_batch_size]))
        return answers

    async def _execute(self, items: list[T]) -> list[R]:
        began = time.perf_counter()
        answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, items)
        if self._observe is not None:
            self._observe(len(items), time.perf_counter() - began)
        return answers

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while len(self._queue) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            # A caller that went away (cancelled) needs no answer.
            batch = [w for w in batch if not w.future.done()]
            if not batch:
                continue
            try:
                answers = await self._execute([w.item for w in batch])
            except Exception as exc:
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            for w, answer in zip(batch, answers, strict=True):
                if not w.future.done():
                    w.future.set_result(answer)
