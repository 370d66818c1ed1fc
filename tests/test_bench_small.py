"""The scale benchmarks' small version (issue 6): simulated controllers against a real hub.

Correctness only, no timing: twenty simulated controllers (``bench.sim``) register themselves by
heartbeating with the shared key to a hub served on a real port (in process, on real PostgreSQL);
a service is placed on one of them and runs there; that controller dies, and the service is placed
and runs on another; when the dead one comes back, its stale copy is removed. Then the
heartbeat and density benchmarks' own code, for a second or two each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import floors
from bench.density import null_hub
from bench.heartbeats import measure
from bench.sim import SimOptions, Simulator
from hub.config import HubSettings
from hub.db import Database
from hub.services.users import create_user
from tests.support.net import free_port
from tests.support.poll import eventually
from tests.support.served import served_hub

KEY = "bench-key-" + "x" * 32
COUNT = 20


@pytest.fixture
async def hub_url(db: Database) -> AsyncIterator[str]:
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=0.5, heartbeat_grace=2,
                           orphan_grace=1)
    async with served_hub(settings) as url:
        yield url


@pytest.mark.slow
async def test_simulated_controllers_register_run_and_fail_over(hub_url: str, db: Database) -> None:
    async with db.session() as session:
        _, token = await create_user(session, "root", is_admin=True)
    sim = Simulator(SimOptions(count=COUNT, key=KEY, hub_url=hub_url, ramp=0.2,
                               server_types={"cpu": 0.75, "gpu": 0.25}, usage_every=0.5))
    api = httpx.AsyncClient(base_url=hub_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with sim, api:
        async def all_healthy() -> bool:
            listed = (await api.get("/api/admin/controllers", params={"limit": 1000})).json()
            return len(listed) == COUNT and all(c["status"] == "healthy" for c in listed)

        await eventually(all_healthy, 30, what="every simulated controller registered and healthy", interval=0.1)
        listed = {c["id"]: c for c in (await api.get("/api/admin/controllers", params={"limit": 1000})).json()}
        assert listed.keys() == sim.controllers.keys()
        for cid, controller in sim.controllers.items():
            assert listed[cid]["url"] == controller.url
            assert listed[cid]["server_type"] == controller.server_type

        created = await api.post("/api/root/bench/services", json={
            "name": "svc", "image": "example:latest", "ports": {"5000": None},
            "health_check": {"path": "/health", "port": 5000, "interval": 1},
        })
        assert created.status_code == 201, created.text
        service = created.json()
        first = service["controller_id"]
        assert service["status"] == "running"
        copies = [c for c in sim.controllers[first].containers.values() if c.service_id == service["id"]]
        assert [c.id for c in copies] == [service["container_id"]]
        assert sim.controllers[first].server_type == "cpu"

        async def healthy() -> bool:
            return (await api.get(f"/api/services/{service['id']}")).json()["health"] == "healthy"

        await eventually(healthy, 30, what="the simulated health check to reach the hub", interval=0.1)

        # What the controller reported shows in one scrape of the hub: its container's stats, the service's health.
        async def scraped() -> dict[str, list[float]] | None:
            text = (await api.get("/metrics")).text
            found = {name: [s.value for f in text_string_to_metric_families(text) for s in f.samples
                            if s.name == name and s.labels.get(label) == value]
                     for name, label, value in (("mmanager_container_cpu_percent", "service", service["id"]),
                                                ("mmanager_service_health", "service", service["id"]),
                                                ("mmanager_controller_up", "controller", first))}
            return found if all(found.values()) else None

        series = await eventually(scraped, 30, what="the container's usage on the hub's /metrics", interval=0.1)
        assert 5 <= series["mmanager_container_cpu_percent"][0] < 35  # the simulator's samples
        assert series["mmanager_service_health"] == [1.0] and series["mmanager_controller_up"] == [1.0]

        sim.kill([first])

        async def moved() -> dict[str, Any] | None:
            now = (await api.get(f"/api/services/{service['id']}")).json()
            return now if now["controller_id"] != first and now["status"] == "running" else None

        after = await eventually(moved, 30, what="the service to fail over", interval=0.1)
        assert after["epoch"] > service["epoch"]
        second = sim.controllers[after["controller_id"]]
        assert [(c.id, c.epoch) for c in second.containers.values()] == [(after["container_id"], after["epoch"])]
        assert (await api.get(f"/api/admin/controllers/{first}")).json()["status"] == "unhealthy"

        async def healthy_again() -> bool:
            now = (await api.get(f"/api/services/{service['id']}")).json()
            return now["container_id"] == after["container_id"] and now["health"] == "healthy"

        await eventually(healthy_again, 30, what="the moved copy's health check to reach the hub", interval=0.1)

        # Back from the dead: its stale copy goes (a stop order in a heartbeat's answer, or the hub's own delete).
        sim.revive([first])

        async def fenced() -> bool:
            return not sim.controllers[first].containers

        await eventually(fenced, 30, what="the stale copy to be removed", interval=0.1)
        assert [c.id for c in second.containers.values()] == [after["container_id"]]


@pytest.mark.slow
async def test_a_fleet_over_the_heartbeat_rate_is_told_to_beat_slower(db: Database) -> None:
    """20 controllers at a 0.5 s interval would send 40 beats a second; MMANAGER_HEARTBEAT_MAX_RATE=20
    has the hub answer a 1 s interval and a grace stretched alike (4 s), which its failure detection
    then keeps to (hub.services.pace)."""
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=0.5, heartbeat_grace=2,
                           heartbeat_max_rate=20)
    async with db.session() as session:
        _, token = await create_user(session, "root", is_admin=True)
    async with served_hub(settings) as url:
        sim = Simulator(SimOptions(count=COUNT, key=KEY, hub_url=url, ramp=0.2))
        api = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        async with sim, api:
            async def listed() -> list[dict[str, Any]]:
                return (await api.get("/api/admin/controllers", params={"limit": 1000})).json()

            async def told_to_slow_down() -> bool:
                every = await listed()
                return (len(every) == COUNT and all(c["status"] == "healthy" for c in every)
                        and all(c.interval == 1.0 for c in sim.controllers.values()))

            await eventually(told_to_slow_down, 30, what="every controller registered and told a 1 s interval",
                             interval=0.1)
            assert "mmanager_heartbeat_interval_seconds 1.0" in (await api.get("/metrics")).text
            before = sim.stats()["beats_ok"]
            await asyncio.sleep(3)
            # About 20 a second now (40 at the configured interval).
            assert sim.stats()["beats_ok"] - before <= 3 * 20 * 1.25

            victim = sorted(sim.controllers)[0]
            sim.kill([victim])

            async def lost() -> dict[str, Any] | None:
                row = (await api.get(f"/api/admin/controllers/{victim}")).json()
                return row if row["status"] == "unhealthy" else None

            row = await eventually(lost, 30, what="the silent controller declared lost", interval=0.1)
            assert row["error"] == "no heartbeat for over 4s"
            assert [c["id"] for c in await listed() if c["status"] != "healthy"] == [victim]


@pytest.mark.slow
async def test_heartbeat_benchmark_measures(hub_url: str, db: Database) -> None:
    """``bench.heartbeats``' measurement, small: every accepted beat becomes visible in the table."""
    result = await measure(hub_url, db.url, KEY, 10, seconds=1.5, settle=10)
    assert result["controllers"] == 10
    assert result["statuses"].keys() == {"200"}
    assert result["accepted_per_s"] > 0
    assert result["never_visible"] == 0
    assert result["visible_p50_ms"] is not None


async def test_density_null_hub_round_trip() -> None:
    """``bench.density``'s set-up, small: simulated controllers beat to the null hub and obey its interval."""
    port = free_port()
    hub = asyncio.create_task(null_hub(port, 0.1))
    try:
        async with Simulator(SimOptions(count=5, key=KEY, hub_url=f"http://127.0.0.1:{port}", preload=2,
                                        ramp=0.05)) as sim:
            await eventually(lambda: sim.stats()["beats_ok"] >= 20, 10, "beats to the null hub", interval=0.1)
            assert all(c.interval == 0.1 for c in sim.controllers.values())
            assert sim.stats()["containers"] == 10
    finally:
        hub.cancel()


@pytest.mark.slow
def test_floors_measure_each_kind_of_request() -> None:
    """The floors benchmark (``bench.floors``): a beat parsed, a create's call with httpx and with the
    simulator's client, a create relayed from the load generator through uvicorn to the simulator's
    server; each one answered as it should be (the load generator counts 200s only, the relay answers
    200 only for the server's 201), and the cores the targets would need follow from the rates."""
    results = floors.measure(seconds=0.5, connections=4, warmup=0.2, origins=4)
    for name in ("beat", "call_httpx", "call_httpx_one_pool", "call_bare", "create"):
        assert results[name]["requests"] > 0, name
        assert results[name]["p50_ms"] <= results[name]["p99_ms"], name
    assert results["call_httpx"]["origins"] == 4 and results["call_httpx_one_pool"]["origins"] == 1
    assert results["beat"]["body_bytes"] > 500  # a heartbeat with its containers, not an empty body
    targets = results["against_targets"]
    assert targets["hub_cores_for_the_beats_http_alone"] == round(
        floors.BEATS_TARGET / results["beat"]["per_server_core"], 2)
    assert targets["hub_cores_for_the_creates_http_alone"] == round(
        floors.CREATES_TARGET / results["create"]["per_server_core"], 2)
    assert targets["creates_per_s_all_cores_http_alone"] >= results["create"]["per_s"] * 0.5
