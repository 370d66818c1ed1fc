"""The lifecycle on SQLite, the database of ``mmanager dev``, with controllers on the real Docker engine.

On PostgreSQL the create's writes go straight through asyncpg (``Database.transaction``); on SQLite
they go through a SQLAlchemy Core connection: the same statements, another path, checked here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.db import Database
from hub.migrate import upgrade
from tests.hub.conftest import Cluster
from tests.hub.test_services_api import SPEC, counts, fill_the_quota


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}"
    await asyncio.to_thread(upgrade, url)
    database = Database(url)
    yield database
    await database.dispose()


async def test_create_refusals_move_and_delete_on_sqlite(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    r = await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)
    assert r.status_code == 201, r.text
    service = r.json()
    sid = service["id"]
    assert service["status"] == "running" and service["epoch"] == 1 and service["endpoint"]["ports"]["5000"]
    [container] = cluster.containers(**{"mmanager.service": sid})
    assert container.id == service["container_id"] and container.status == "running"
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    assert (entry["container_id"], entry["controller_id"], entry["status"]) == \
        (service["container_id"], service["controller_id"], "running")
    history = (await cluster.hub.get(f"/api/services/{sid}/history", headers=alice)).json()
    assert [(h["version"], h["reason"]) for h in history] == [(1, "create")]
    [op] = (await cluster.hub.get("/api/admin/operations", params={"service_id": sid})).json()
    assert (op["operation"], op["status"], op["controller_id"], op["container_id"]) == \
        ("create", "succeeded", service["controller_id"], service["container_id"])
    assert op["finished_at"] is not None

    # The same name again, then past the quota (5): refused, nothing written.
    r = await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "SERVICE_EXISTS"
    assert await counts(cluster) == (1, 1)
    await fill_the_quota(cluster, "/api/alice/genomics/services", alice)

    # A move claims the next epoch and records the new copy where it was sent.
    target = next(c for c in cluster.controller_ids[1:] if c != service["controller_id"])
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate",
                               json={"target_controller": target, "leave_volumes": True})
    assert r.status_code == 200, r.text
    moved = r.json()
    assert (moved["controller_id"], moved["epoch"], moved["status"]) == (target, 2, "running")
    [container] = cluster.containers(**{"mmanager.service": sid})
    assert container.labels["mmanager.controller"] == target and container.id == moved["container_id"]

    r = await cluster.hub.delete(f"/api/services/{sid}", headers=alice)
    assert r.status_code == 204
    assert cluster.containers(**{"mmanager.service": sid}) == []
    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": sid})).json()
    assert {o["operation"]: o["status"] for o in ops} == {"create": "succeeded", "migrate": "succeeded",
                                                          "delete": "succeeded"}
    assert await counts(cluster) == (4, 4)
