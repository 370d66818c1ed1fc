"""The replica placement benchmark's small version (issue 23), and the batch's refused rows.

Correctness only, no timing: simulated controllers (``bench.sim``) beat to a hub served on a real port (in
process, on real PostgreSQL). ``bench.replica_placement``'s own measurement, tiny: creates of one replica,
then creates of several with ``?wait=false``; every one answers 202, every service ends running with its
replicas each on a controller of its own at epochs 1..N, and the benchmark's check finds nothing wrong.
Then the database's last word on a batch: controllers disabled behind the in-memory view's back are
chosen by it, refused by the insert, and their replicas placed again elsewhere in the same create.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from bench.common import asyncpg_dsn
from bench.placement import make_users, registered
from bench.replica_placement import measure
from bench.sim import SimOptions, Simulator
from bench.sim.http import Client
from hub.app import build_hub
from hub.config import HubSettings
from hub.db import Database
from hub.deps import Hub
from hub.migrate import upgrade
from hub.services.users import create_user
from tests.support.poll import eventually
from tests.support.served import served_hub

KEY = "bench-key-" + "r" * 32


def _settings(db: Database) -> HubSettings:
    return HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=1, heartbeat_grace=5, rate_limit=0,
                       max_services_per_user=100)


@pytest.fixture
async def hub(db: Database) -> AsyncIterator[tuple[str, Hub]]:
    parts = build_hub(_settings(db))
    async with served_hub(parts.settings, hub=parts) as url:
        yield url, parts


async def _create(url: str, owner: str, token: str, name: str) -> dict[str, Any]:
    """A service of three replicas created through the API (waiting for it): what the 201 says."""
    client = Client(url, 1)
    try:
        status, answer, _ = await client.request(
            "POST", f"/api/{owner}/bench/services",
            json.dumps({"name": name, "image": "sim/model:latest", "replicas": 3}).encode(),
            {"authorization": f"Bearer {token}"}, timeout=30)
    finally:
        await client.aclose()
    assert status == 201, answer
    return json.loads(answer)  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_replica_placement_benchmark_places_every_replica_on_a_controller_of_its_own(
        hub: tuple[str, Hub], db: Database) -> None:
    url, _ = hub
    async with db.session() as session:
        _, token = await create_user(session, "root", is_admin=True)
    result = await measure(url, db.url, token, KEY, 24, [("one", 12, 1), ("many", 9, 6)], clients=3,
                           gpu_share=0.2, gpu_servers=0.25, max_seconds=60, start_bound=60, register_timeout=30,
                           ramp=0.2)
    one, many = result["phases"]
    for run, services, replicas in ((one, 12, 1), (many, 9, 6)):
        assert run["failed"] == {} and run["accepted"] == services
        assert run["replicas_placed"] == services * replicas == run["started"]
        assert run["services_running"] == services and run["all_running_after_s"] is not None
        check = run["check"]
        assert check["problems"] == {}, check
        assert check["running"] == services and check["replica_rows"] == services * replicas
        assert check["api_sampled"] == services


@pytest.mark.slow
async def test_rows_a_batch_finds_refused_are_placed_again_elsewhere(hub: tuple[str, Hub], db: Database) -> None:
    url, parts = hub
    async with db.session() as session:
        _, admin = await create_user(session, "root", is_admin=True)
    conn = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        async with Simulator(SimOptions(count=5, key=KEY, hub_url=url, id_prefix="rf", ramp=0.1)) as sim:
            await registered(conn, sim, "rf", 30)
            [(user, token)] = await make_users(url, admin, ["alice"])
            ids = sorted(sim.controllers)
            # The view as it is now, kept (no snapshot taken until told): all five placeable, none loaded, so
            # a batch of three takes the first three by id. Two of them disabled behind its back.
            placement = parts.services.placement
            await placement.index(fresh=True)
            placement.max_age = placement.refresh_after = 3600.0
            await conn.execute("UPDATE mmanager_controllers SET enabled = false WHERE id = ANY($1)", ids[:2])
            created = await _create(url, user, token, "spread")
            assert sorted(r["controller_id"] for r in created["replicas"]) == ids[2:]
            rows = await conn.fetch("SELECT controller_id, epoch FROM container_registry WHERE service_id = $1",
                                    created["id"])
            assert sorted(r["controller_id"] for r in rows) == ids[2:]
            assert sorted(r["epoch"] for r in rows) == [1, 2, 3]
            assert {c.service_id for cid in ids[:2] for c in sim.controllers[cid].containers.values()} == set()
    finally:
        await conn.close()


@pytest.mark.slow
async def test_a_batch_is_placed_and_settled_on_sqlite_too(tmp_path: Path) -> None:
    """On SQLite (``mmanager dev``) the batch's statements go through SQLAlchemy Core: the same create."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    try:
        async with db.session() as session:
            _, admin = await create_user(session, "root", is_admin=True)
        async with served_hub(_settings(db)) as hub_url, \
                Simulator(SimOptions(count=4, key=KEY, hub_url=hub_url, id_prefix="sq", ramp=0.1)) as sim:
            async def healthy() -> bool:
                async with db.session() as session:
                    return await session.scalar(
                        text("SELECT count(*) FROM mmanager_controllers WHERE status = 'healthy'")) == 4

            await eventually(healthy, 30, "the fleet healthy")
            created = await _create(hub_url, "root", admin, "lite")
            made = {c.id: cid for cid, controller in sim.controllers.items() for c in controller.containers.values()
                    if c.service_id == created["id"]}
        assert created["status"] == "running"
        assert {r["id"]: r["controller_id"] for r in created["replicas"]} == made
        assert len({r["controller_id"] for r in created["replicas"]}) == 3
        assert all(r["state"] == "running" for r in created["replicas"])
    finally:
        await db.dispose()
