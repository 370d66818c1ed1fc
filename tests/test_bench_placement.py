"""The placement benchmark's small version (issue 6): ``bench.placement``'s own measurement, tiny.

Correctness only, no timing: twenty simulated controllers (a quarter of them gpu servers, one killed
just before the creates, so the hub still takes it for healthy) register by heartbeating to a hub
served on a real port (in process, on real PostgreSQL); four users create fifty services at once
through the public API, some asking for a GPU. Every create must answer 201 with the service running,
and the benchmark's own check must find each one running on a live controller of the right type, its
container there at its epoch, no GPU held twice, no controller over its cap, one registry row each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.placement import measure
from hub.config import HubSettings
from hub.db import Database
from hub.services.users import create_user
from tests.support.served import served_hub

KEY = "bench-key-" + "p" * 32
CONTROLLERS = 20
SERVICES = 50


@pytest.fixture
async def hub_url(db: Database) -> AsyncIterator[str]:
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=1, heartbeat_grace=5,
                           rate_limit=0, max_services_per_user=SERVICES)
    async with served_hub(settings) as url:
        yield url


@pytest.mark.slow
async def test_placement_benchmark_places_every_service_where_it_may_run(hub_url: str, db: Database) -> None:
    async with db.session() as session:
        _, token = await create_user(session, "root", is_admin=True)
    result = await measure(hub_url, db.url, token, KEY, CONTROLLERS, SERVICES, clients=4, gpu_share=0.2,
                           gpu_servers=0.25, kill=1, max_seconds=120, register_timeout=30, ramp=0.2)
    assert result["failed"] == {}
    assert result["created"] == SERVICES
    check = result["check"]
    assert check["problems"] == []
    assert check["services_in_table"] == check["running"] == SERVICES
    assert check["create_operations"] == {"succeeded": SERVICES}
    assert check["controllers_alive"] == CONTROLLERS - 1
    # Spread by load: fifty services over nineteen live controllers, none takes a pile.
    assert check["controllers_used"] >= 10
    assert check["per_controller_max"] <= 6
    assert sum(result["per_s_by_second"]) == SERVICES


def test_candidate_index_chooses_as_place_does() -> None:
    """The hub's in-memory index (``CandidateIndex``) against the reference ``place()``: same controller and
    GPUs, request after request, as reservations fill a mixed cluster (priorities, weights, caps, GPUs,
    memory, disabled, draining and unhealthy ones) up to the point where nothing fits any more."""
    import random
    from dataclasses import replace

    from hub.scheduler import CandidateIndex, ControllerView, PlacementRequest, place
    from hub.scheduler.placement import GIB

    rng = random.Random(3)
    views = {}
    for i in range(60):
        kind = rng.choice(["cpu", "cpu", "gpu", "edge"])
        views[f"c{i:02d}"] = ControllerView(
            id=f"c{i:02d}", server_type=kind, enabled=rng.random() > 0.05, draining=rng.random() < 0.05,
            healthy=rng.random() > 0.05, priority=rng.choice([1, 1, 2]), weight=rng.choice([50, 100, 150]),
            max_containers=rng.randint(1, 6), cpu_cores=8.0, memory_total=16 * GIB,
            gpus=tuple(str(g) for g in range(4)) if kind == "gpu" else ())
    index = CandidateIndex(views.values())
    requests = [PlacementRequest(memory=GIB), PlacementRequest(cpu=2.0, memory=4 * GIB),
                PlacementRequest(gpu_count=1), PlacementRequest(gpu_count=2), PlacementRequest(server_type="edge"),
                PlacementRequest(exclude=frozenset({"c00", "c01", "c02"}))]
    placed = 0
    for _ in range(400):
        request = rng.choice(requests)
        expected, got = place(views.values(), request), index.place(request)
        assert (got.controller_id, got.gpu_devices) == (expected.controller_id, expected.gpu_devices)
        if expected.controller_id is None:
            assert got.rejections == expected.rejections
            continue
        placed += 1
        c = views[expected.controller_id]
        views[c.id] = replace(c, containers=c.containers + 1, memory_reserved=c.memory_reserved + request.memory,
                              cpu_reserved=c.cpu_reserved + request.cpu, gpus_used=c.gpus_used | set(got.gpu_devices))
        index.reserve(c.id, request.memory, request.cpu, got.gpu_devices)
    assert placed > 50
    assert index.views() == list(views.values())
