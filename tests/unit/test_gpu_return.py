"""hub.background.fallback.GpuReturn with fakes for the database and the services: it looks only while a GPU
has room, starts at most MMANAGER_GPU_RETURN_BATCH moves back per look (one per service at a time), only
for copies a GPU would now take, and leaves a service whose move failed alone for a growing pause."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from hub.background.fallback import COOL_FIRST, QUIET_LOOKS, RETRY_FIRST, GpuReturn
from hub.config import HubSettings
from hub.errors import NoFeasibleController
from hub.scheduler.placement import CandidateIndex, ControllerView

CHECK = {"port": 5000}
SPEC = {"name": "s", "image": "gpu", "resources": {"gpu_count": 1, "gpu_required": True}, "health_check": CHECK,
        "cpu_fallback": {"image": "cpu", "resources": {}}}
A100 = {"name": "s", "image": "gpu", "resources": {"gpu_count": 1, "gpu_required": True, "gpu_model": "A100"},
        "health_check": CHECK, "cpu_fallback": {"image": "cpu", "resources": {}}}


class Fakes:
    def __init__(self, views: list[ControllerView], rows: list[dict[str, Any]], batch: int = 2,
                 interval: float = 5.0) -> None:
        self.rows = rows
        self.reads = 0
        self.moved: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.gone: set[str] = set()
        self.tasks: list[asyncio.Task[Any]] = []
        index = CandidateIndex(views)

        async def current() -> CandidateIndex:
            return index

        async def back_to_gpu(service_id: str, row_id: str) -> object:
            self.moved.append((service_id, row_id))
            if service_id in self.fail:
                raise NoFeasibleController("no GPU")
            self.gone.add(row_id)  # what a move back does: its copy leaves the fallback
            return object()

        services = SimpleNamespace(placement=SimpleNamespace(index=current), back_to_gpu=back_to_gpu, fallbacks_placed=0,
                                   spawn=lambda work: self.tasks.append(asyncio.ensure_future(work)))
        self.loop = GpuReturn(SimpleNamespace(all=self.all), services,  # type: ignore[arg-type]
                              HubSettings(api_key="k" * 32, gpu_return_batch=batch,
                                          gpu_return_interval=interval))

    async def all(self, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        self.reads += 1
        return [r for r in self.rows if r["id"] not in self.gone][:params["most"]]

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
    fakes = Fakes([gpu("g", model="L4"), gpu("h", model="L4"), gpu("i", model="L4")], rows, batch=2)
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


async def test_one_free_gpu_takes_one_move_per_look() -> None:
    """Each move started in a look counts: a second would find the GPU the first took."""
    fakes = Fakes([gpu("g")], [row(1), row(2), row(3)], batch=3)
    await fakes.look()
    assert fakes.moved == [("s1", "r1")]


async def test_a_copy_whose_spec_lost_its_health_check_stays() -> None:
    bare = {k: v for k, v in SPEC.items() if k not in ("health_check", "cpu_fallback")}
    fakes = Fakes([gpu("g")], [row(1, bare), row(2)])
    await fakes.look()
    assert fakes.moved == [("s2", "r2")]


async def test_no_copy_on_a_fallback_reads_nothing_for_a_while() -> None:
    fakes = Fakes([gpu("g")], [])
    await fakes.look()
    assert fakes.reads == 1
    index_reads = 0
    read_index = fakes.loop.services.placement.index

    async def counted() -> Any:
        nonlocal index_reads
        index_reads += 1
        return await read_index()

    fakes.loop.services.placement.index = counted  # type: ignore[attr-defined]
    for _ in range(QUIET_LOOKS - 2):
        await fakes.look()
    assert fakes.reads == 1 and index_reads == 0
    # A copy goes to a fallback on another hub: seen once the quiet looks are over.
    fakes.rows.append(row(1))
    await fakes.look()
    assert fakes.reads == 1
    await fakes.look()
    # The registry read first (it found none last time): one copy now, so the view, then the move.
    assert fakes.reads == 2 and index_reads == 1 and fakes.moved == [("s1", "r1")]


async def test_a_fallback_placed_here_ends_the_quiet_looks() -> None:
    fakes = Fakes([gpu("g")], [])
    await fakes.look()
    fakes.rows.append(row(1))
    fakes.loop.services.fallbacks_placed += 1  # type: ignore[attr-defined]
    await fakes.look()
    assert fakes.reads == 2 and fakes.moved == [("s1", "r1")]


async def test_a_service_off_its_gpu_again_soon_after_its_move_back_cools_down() -> None:
    fakes = Fakes([gpu("g")], [row(1)])
    await fakes.look()
    assert fakes.moved == [("s1", "r1")]
    # The reconciler moved its GPU copy (unhealthy) to the fallback once more: a new copy on the CPU.
    fakes.rows.append({"id": "r1b", "service_id": "s1", "spec": SPEC})
    await fakes.look()
    assert fakes.moved == [("s1", "r1")]
    until, _ = fakes.loop._retry["s1"]
    assert until > 0 and fakes.loop._cool["s1"] == 2 * COOL_FIRST


async def test_the_other_replicas_of_a_service_moved_back_are_no_bounce() -> None:
    fakes = Fakes([gpu("g"), gpu("h")], [row(1), {"id": "r2", "service_id": "s1", "spec": SPEC}], batch=1)
    await fakes.look()
    await fakes.look()
    assert fakes.moved == [("s1", "r1"), ("s1", "r2")]


def test_an_interval_of_zero_turns_the_move_back_off() -> None:
    fakes = Fakes([gpu("g")], [row(1)], interval=0)
    fakes.loop.start()
    assert fakes.loop._task is None
