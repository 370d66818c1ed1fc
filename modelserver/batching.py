"""Dynamic batching: the one place where requests become forward passes.

Callers ``await batcher.submit(items)``. With batching on, requests wait in one queue (a request is one entry
with one future, however many items it has, and is answered when its last item has run); a batch closes when
``max_batch_size`` items wait or ``max_wait`` has passed since its oldest item arrived, whichever is first, and
runs on the model's single worker thread while the next batch gathers. A request with more items than
``max_batch_size`` is split across batches; each caller gets its own items' answers back, in order. With
batching off, each request runs alone (in chunks of ``max_batch_size``) on the same thread.

Invariants: one batch runs at a time; no item waits longer than ``max_wait`` for company once the worker is
free; when a batch of several requests fails, each request's items run again alone, so a failure reaches only
the requests that fail by themselves; every future is resolved, whatever ends the loop: ``stop()`` and a loop
that died fail the waiting and running ones with ``BatcherStopped``, and ``submit()`` then raises it at once
(``failure`` says why, for the service's readiness).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("modelserver")


class BatcherStopped(RuntimeError):
    """The batcher takes no more work: it was stopped, or its loop died (the message says which)."""


@dataclass
class _Waiting(Generic[T, R]):
    """One request in the queue: its items, the answers of those already run, and the one future its caller
    awaits (a request's items are tracked together, not one future each)."""

    items: list[T]
    future: asyncio.Future[list[R]]
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0
    answers: list[R] = field(default_factory=list)


# One batch: (request, start, end) of each request's items in it, in order.
_Batch = list[tuple[_Waiting[T, R], int, int]]


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
        # The batch on the worker thread now, resolved by stop() if the loop cannot.
        self._running: _Batch[T, R] = []
        # Why no more work is taken (None while it is): set by stop() or by the loop's death.
        self.failure: str | None = None
        # With batching off, requests still take turns on the one thread.
        self._turn = asyncio.Lock()

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Take no more work, and fail every request still waiting or running with ``BatcherStopped``."""
        if self.failure is None:
            self.failure = "the model service is shutting down"
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._fail_all()

    def _fail_all(self) -> None:
        error = BatcherStopped(self.failure or "the batcher stopped")
        for waiting in [*(w for w, _, _ in self._running), *self._queue]:
            if not waiting.future.done():
                waiting.future.set_exception(error)
        self._running = []
        self._queue.clear()

    async def submit(self, items: list[T]) -> list[R]:
        """The answers to ``items``, in order; ``BatcherStopped`` once the batcher takes no more work."""
        if self.failure is not None:
            raise BatcherStopped(self.failure)
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
        if len(answers) != len(items):
            raise RuntimeError(f"the model answered {len(answers)} of {len(items)} items")
        if self._observe is not None:
            try:
                self._observe(len(items), time.perf_counter() - began)
            except Exception:
                # A metrics bug must not fail answers the model gave.
                log.exception("observing a batch failed")
        return answers

    def _waiting_items(self) -> int:
        return sum(len(w.items) - w.taken for w in self._queue if not w.future.done())

    def _take(self) -> _Batch[T, R]:
        """The next batch: up to ``max_batch_size`` items from the head of the queue, as (request, start, end)."""
        batch: _Batch[T, R] = []
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
        try:
            while True:
                batch = await self._gather()
                if batch:
                    self._running = batch
                    await self._answer(batch)
                    self._running = []
        except Exception as exc:
            # A bug here must not leave callers waiting forever behind a /health that says healthy.
            log.exception("the batcher's loop died")
            self.failure = f"the batcher's loop died: {type(exc).__name__}: {exc}"
        finally:
            self._fail_all()

    async def _gather(self) -> _Batch[T, R]:
        """The next batch, once ``max_batch_size`` items wait or the oldest has waited ``max_wait``."""
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
        return self._take()

    async def _answer(self, batch: _Batch[T, R]) -> None:
        """Resolve ``batch``: each request's answers, or the error of its own items run alone."""
        try:
            answers = await self._execute([item for w, start, end in batch for item in w.items[start:end]])
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0][0], exc)
                return
            for w, start, end in batch:
                try:
                    _deliver(w, end, await self._execute(w.items[start:end]))
                except Exception as alone:
                    _fail(w, alone)
            return
        offset = 0
        for w, start, end in batch:
            _deliver(w, end, answers[offset:offset + end - start])
            offset += end - start


def _deliver(waiting: _Waiting[T, R], end: int, answers: list[R]) -> None:
    """Add ``answers`` (the request's items up to ``end``); resolve the request once all are answered."""
    if waiting.future.done():
        return
    waiting.answers.extend(answers)
    if end == len(waiting.items):
        waiting.future.set_result(waiting.answers)


def _fail(waiting: _Waiting[T, R], error: BaseException) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(error)
