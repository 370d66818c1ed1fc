"""hub.background.fallback.GpuReturn with fakes for the database and the services: it looks only while a GPU
has room, starts at most MMANAGER_GPU_RETURN_BATCH moves back per look (one per service at a time), only
for copies a GPU would now take, and leaves a service whose move failed alone for a growing pause."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from hub.background.fallback import RETRY_FIRST, GpuReturn
from hub.config import HubSettings
from hub.errors import NoFeasibleController
from hub.scheduler.placement import CandidateIndex, ControllerView

SPEC = {"name": "s", "image": "gpu", "resources": {"gpu_count": 1},
        "cpu_fallback": {"image": "cpu", "resources": {}}}
A100 = {"name": "s", "image": "gpu", "resources": {"gpu_count": 1, "gpu_model": "A100"},
        "cpu_fallback": {"image": "cpu", "resources": {}}}


class Fakes:
    def __init__(self, views: list[ControllerView], rows: list[dict[str, Any]], batch: int = 2) -> None:
        self.rows = rows
        self.reads = 0
        self.moved: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.tasks: list[asyncio.Task[Any]] = []
        index = CandidateIndex(views)

        async def current() -> CandidateIndex:
            return index

        async def back_to_gpu(service_id: str, row_id: str) -> object:
            self.moved.append((service_id, row_id))
            if service_id in self.fail:
                raise NoFeasibleController("no GPU")
            return object()

        services = SimpleNamespace(placement=SimpleNamespace(index=current), back_to_gpu=back_to_gpu,
                                   spawn=lambda work: self.tasks.append(asyncio.ensure_future(work)))
        self.loop = GpuReturn(SimpleNamespace(all=self.all), services,  # type: ignore[arg-type]
                              HubSettings(api_key="k" * 32, gpu_return_batch=batch))

    async def all(self, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        self.reads += 1
        return self.rows[:params["most"]]

    async def look(self) -> None:
        await self.loop.run_once()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()


def gpu(id: str, used: tuple[str, ...] = (), model: str = "A100") -> ControllerView:
    return ControllerView(id=id, server_type="gpu", gpus=("0",), gpu_models=(model,), gpu_memory=(80 << 30,),
                          gpus_used=frozenset(used))


def row(n: int, spec: dict[str, Any] = SPEC) -> dict[str, Any]:
    return {"id": f"r{n}", "service_id": f"s{n}", "spec": spec}


async def test_no_gpu_with_room_no_read() -> None:
    fakes = Fakes([gpu("g", used=("0",)), ControllerView(id="c")], [row(1)])
    await fakes.look()
    assert fakes.reads == 0 and fakes.moved == []


async def test_at_most_a_batch_per_look_and_only_where_a_gpu_takes_it() -> None:
    rows = [row(1, A100), row(2), row(3), row(4)]
    fakes = Fakes([gpu("g", model="L4")], rows, batch=2)
    await fakes.look()
    # The A100 ask finds no A100: skipped, not counted against the batch.
    assert fakes.moved == [("s2", "r2"), ("s3", "r3")]


async def test_a_failed_move_waits_before_it_is_tried_again() -> None:
    fakes = Fakes([gpu("g")], [row(1)])
    fakes.fail.add("s1")
    await fakes.look()
    await fakes.look()
    assert fakes.moved == [("s1", "r1")]
    until, pause = fakes.loop._retry["s1"]
    assert pause == RETRY_FIRST
    fakes.loop._retry["s1"] = (0.0, pause)  # the pause is over
    await fakes.look()
    assert fakes.moved == [("s1", "r1")] * 2 and fakes.loop._retry["s1"][1] == 2 * RETRY_FIRST
    fakes.fail.clear()
    fakes.loop._retry["s1"] = (0.0, 2 * RETRY_FIRST)
    await fakes.look()
    assert "s1" not in fakes.loop._retry
