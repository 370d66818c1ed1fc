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

from modelserver.batching import Batcher
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


async def test_a_failed_batch_fails_its_requests_and_the_next_one_runs(executor: ThreadPoolExecutor) -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise RuntimeError("broken")
        return items

    batcher = Batcher(run, executor, enabled=True, max_batch_size=4, max_wait_s=0.05)
    batcher.start()
    try:
        results = await asyncio.gather(batcher.submit([1]), batcher.submit([-1]), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await batcher.submit([5]) == [5]
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


async def test_concurrent_requests_of_different_tasks_share_batches(lucaone: str) -> None:
    bodies = [{"sequence": seq, "task_type": task, "options": options}
              for seq in ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "ACGTACGGTTAGC", "MSTNPKPQRKTKRNTNRRPQDVKFPGG")
              for task, options in (("embedding", {"embedding_dimension": 4}), ("classification", {}),
                                    ("property_prediction", {"return_confidence": False}))]
    with httpx.Client(base_url=lucaone) as client:
        expected = [client.post("/predict", json=body).json()["data"] for body in bodies]
    async with httpx.AsyncClient(base_url=lucaone) as client:
        got = [r.json()["data"] for r in await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))]
    strip = [{k: v for k, v in d.items() if k != "processing_time"} for d in expected]
    assert [{k: v for k, v in d.items() if k != "processing_time"} for d in got] == strip
