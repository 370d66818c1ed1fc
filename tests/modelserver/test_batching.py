"""Dynamic batching: the Batcher alone (sizes, the wait bound, splitting, failures), and the real service
under 32 concurrent clients, whose answers must be those of the requests run one by one."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from modelserver.batching import Batcher, BatcherStopped
from tests.modelserver.conftest import serve


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


def recording(sizes: list[int], delay: float = 0.0, threads: set[str] | None = None) -> Callable[[list[int]], list[int]]:
    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if threads is not None:
            threads.add(threading.current_thread().name)
        time.sleep(delay)
        return [i * 10 for i in items]
    return run


async def test_concurrent_requests_share_a_batch_and_get_their_own_answers(executor: ThreadPoolExecutor) -> None:
    sizes: list[int] = []
    threads: set[str] = set()
    batcher = Batcher(recording(sizes, threads=threads), executor, enabled=True, max_batch_size=8, max_wait_s=0.2)
    batcher.start()
    try:
        answers = await asyncio.gather(*(batcher.submit([i]) for i in range(20)))
    finally:
        await batcher.stop()
    assert answers == [[i * 10] for i in range(20)]
    assert sizes == [8, 8, 4] and len(threads) == 1


async def test_a_lone_request_waits_at_most_max_wait(executor: ThreadPoolExecutor) -> None:
    sizes: list[int] = []
    batcher = Batcher(recording(sizes), executor, enabled=True, max_batch_size=32, max_wait_s=0.05)
    batcher.start()
    try:
        began = time.monotonic()
        assert await batcher.submit([3]) == [30]
        waited = time.monotonic() - began
    finally:
        await batcher.stop()
    assert sizes == [1] and 0.04 <= waited < 1.0


async def test_a_big_request_is_split_into_batches(executor: ThreadPoolExecutor) -> None:
    for enabled in (True, False):
        sizes: list[int] = []
        batcher = Batcher(recording(sizes), executor, enabled=enabled, max_batch_size=32, max_wait_s=0.001)
        batcher.start()
        try:
            assert await batcher.submit(list(range(100))) == [i * 10 for i in range(100)]
        finally:
            await batcher.stop()
        assert sizes == [32, 32, 32, 4]


async def test_without_batching_each_request_runs_alone_one_at_a_time(executor: ThreadPoolExecutor) -> None:
    sizes: list[int] = []
    batcher = Batcher(recording(sizes, delay=0.01), executor, enabled=False, max_batch_size=32, max_wait_s=0.005)
    answers = await asyncio.gather(*(batcher.submit([i, i]) for i in range(5)))
    assert answers == [[i * 10, i * 10] for i in range(5)] and sizes == [2] * 5


async def test_a_failed_batch_fails_only_the_request_that_fails_alone(executor: ThreadPoolExecutor) -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise RuntimeError("poisoned")
        return [i * 10 for i in items]

    batcher = Batcher(run, executor, enabled=True, max_batch_size=8, max_wait_s=0.05)
    batcher.start()
    try:
        results = await asyncio.gather(batcher.submit([1, 2]), batcher.submit([-1, 3]), batcher.submit([4]),
                                       return_exceptions=True)
        assert results[0] == [10, 20] and results[2] == [40]
        assert isinstance(results[1], RuntimeError) and "poisoned" in str(results[1])
        # One merged batch, then each request alone.
        assert calls == [[1, 2, -1, 3, 4], [1, 2], [-1, 3], [4]]
        assert await batcher.submit([5]) == [50]
    finally:
        await batcher.stop()


async def test_a_short_answer_fails_the_batch_not_the_loop(executor: ThreadPoolExecutor) -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: items[:-1], executor, enabled=True, max_batch_size=4, max_wait_s=0.01)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="answered 1 of 2 items"):
            await asyncio.wait_for(batcher.submit([1, 2]), 5)
        assert batcher.failure is None
    finally:
        await batcher.stop()


async def test_a_failing_observer_does_not_fail_answers(executor: ThreadPoolExecutor) -> None:
    def observe(size: int, seconds: float) -> None:
        raise ValueError("a metrics bug")

    batcher = Batcher(recording([]), executor, enabled=True, max_batch_size=4, max_wait_s=0.01, observe=observe)
    batcher.start()
    try:
        assert await asyncio.wait_for(batcher.submit([1, 2]), 5) == [10, 20]
    finally:
        await batcher.stop()


async def test_stop_resolves_the_running_and_waiting_requests(executor: ThreadPoolExecutor) -> None:
    started = threading.Event()

    def slow(items: list[int]) -> list[int]:
        started.set()
        time.sleep(0.3)
        return items

    batcher = Batcher(slow, executor, enabled=True, max_batch_size=1, max_wait_s=0.0)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit([1]))
    waiting = asyncio.ensure_future(batcher.submit([2]))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    await batcher.stop()
    for request in (running, waiting):
        with pytest.raises(BatcherStopped, match="shutting down"):
            await asyncio.wait_for(request, 5)
    with pytest.raises(BatcherStopped):
        await asyncio.wait_for(batcher.submit([3]), 5)
    unbatched = Batcher(slow, executor, enabled=False, max_batch_size=1, max_wait_s=0.0)
    await unbatched.stop()
    with pytest.raises(BatcherStopped):
        await unbatched.submit([3])


async def test_a_dead_loop_fails_its_requests_and_refuses_new_ones(executor: ThreadPoolExecutor,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    batcher: Batcher[int, int] = Batcher(recording([]), executor, enabled=True, max_batch_size=4, max_wait_s=0.01)

    async def broken() -> list[object]:
        await asyncio.sleep(0.05)
        raise ValueError("a bug in the loop")

    monkeypatch.setattr(batcher, "_gather", broken)
    batcher.start()
    try:
        with pytest.raises(BatcherStopped, match="a bug in the loop"):
            await asyncio.wait_for(batcher.submit([1]), 5)
        assert batcher.failure is not None and "loop died" in batcher.failure
        with pytest.raises(BatcherStopped, match="a bug in the loop"):
            await asyncio.wait_for(batcher.submit([2]), 5)
    finally:
        await batcher.stop()


def batch_histogram(text: str) -> tuple[float, float]:
    """(batches of one sequence, all batches) from the Prometheus text."""
    ones = float(re.search(r'^modelserver_batch_size_bucket\{le="1\.0"\} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(r"^modelserver_batch_size_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return ones, count


async def test_32_concurrent_clients_get_the_answers_of_unbatched_requests(model_dir: Path) -> None:
    sequences = [("ACGTTGCAAGGCTTA" * 40)[i: i + 50 + 7 * i] for i in range(32)]
    # A wait long enough that the batches form on a busy two-core machine too.
    with serve(model_dir, "dnabert2", model_max_wait_ms=50) as url, \
            serve(model_dir, "dnabert2", model_batching=False) as alone_url:
        with httpx.Client(base_url=alone_url) as client:
            expected = [client.post("/predict", json={"sequence": s}).json()["data"] for s in sequences]
            ones, count = batch_histogram(client.get("/metrics").text)
            assert ones == count >= 32
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=32), timeout=30) as client:
            responses = await asyncio.gather(*(client.post("/predict", json={"sequence": s}) for s in sequences))
            text = (await client.get("/metrics")).text
    got = [r.json()["data"] for r in responses]
    for g, e in zip(got, expected, strict=True):
        assert (g["prediction"], g["confidence"], g["details"]) == (e["prediction"], e["confidence"], e["details"])
    ones, count = batch_histogram(text)
    assert count < 32 and ones < count, "no batch held more than one request"


async def test_concurrent_requests_of_different_tasks_share_batches(model_dir: Path) -> None:
    bodies = [{"sequence": seq, "task_type": task, "options": options}
              for seq in ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "ACGTACGGTTAGC", "MSTNPKPQRKTKRNTNRRPQDVKFPGG")
              for task, options in (("embedding", {"embedding_dimension": 4}), ("classification", {}),
                                    ("property_prediction", {"return_confidence": False}))]
    # A wait long enough that the batches form on a busy two-core machine too.
    with serve(model_dir, "lucaone", model_max_wait_ms=200) as url:
        with httpx.Client(base_url=url) as client:
            expected = [client.post("/predict", json=body).json()["data"] for body in bodies]
            before = batch_histogram(client.get("/metrics").text)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            got = [r.json()["data"] for r in await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))]
            after = batch_histogram((await client.get("/metrics")).text)
    strip = [{k: v for k, v in d.items() if k != "processing_time"} for d in expected]
    assert [{k: v for k, v in d.items() if k != "processing_time"} for d in got] == strip
    ones, count = after[0] - before[0], after[1] - before[1]
    assert count < len(bodies) and ones < count, "no batch held more than one request"
