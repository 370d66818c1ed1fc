"""Dynamic batching: the one place where requests become forward passes.

Callers ``await batcher.submit(items)``. With batching on, requests wait in one queue (a request is one entry
with one future, however many items it has, and is answered when its last item has run); a batch closes when
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
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    """One request in the queue: its items, the answers of those already run, and the one future its caller
    awaits (a request's items are tracked together, not one future each)."""

    items: list[T]
    future: asyncio.Future[list[R]]
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0
    answers: list[R] = field(default_factory=list)


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
        self._queue: deque[_Waiting[T, R]] = deque()
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
        if not items:
            return []
        waiting: _Waiting[T, R] = _Waiting(items, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._arrived.set()
        # A caller that goes away cancels the future; its items still waiting are then skipped.
        return await waiting.future

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

    def _waiting_items(self) -> int:
        return sum(len(w.items) - w.taken for w in self._queue if not w.future.done())

    def _take(self) -> list[tuple[_Waiting[T, R], int, int]]:
        """The next batch: up to ``max_batch_size`` items from the head of the queue, as (request, start, end)."""
        batch: list[tuple[_Waiting[T, R], int, int]] = []
        room = self.max_batch_size
        while self._queue and room:
            waiting = self._queue[0]
            if waiting.future.done():
                self._queue.popleft()
                continue
            start = waiting.taken
            end = min(len(waiting.items), start + room)
            batch.append((waiting, start, end))
            waiting.taken, room = end, room - (end - start)
            if end == len(waiting.items):
                self._queue.popleft()
        return batch

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while self._waiting_items() < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            try:
                answers = await self._execute([item for w, start, end in batch for item in w.items[start:end]])
            except Exception as exc:
                for w, _, _ in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            offset = 0
            for w, start, end in batch:
                w.answers.extend(answers[offset:offset + end - start])
                offset += end - start
                if end == len(w.items) and not w.future.done():
                    w.future.set_result(w.answers)
