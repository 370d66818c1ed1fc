"""The user-scoped routes the clients read (docs/API.md, Your account and history), on real PostgreSQL and
the real Docker engine: each user sees their own operations, audit entries and alerts and none of another's;
an admin sees all; migrating through the service's route moves the replica it names; long operations show
their progress."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from typer.testing import CliRunner

from examples.images import EXAMPLE_IMAGE
from hub.db import Database
from hub.migrate import upgrade
from hub.models import AlertModel, AuditModel, UserModel
from hub.schemas import OperationOut
from hub.services.users import ensure_user, issue_token
from mmanager.cli import app as cli
from mmanager.client import AsyncClient
from tests.hub.conftest import Cluster

SPEC = {"name": "m", "image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"memory_limit": "32MB"}}


async def _create(cluster: Cluster, user: str, headers: dict[str, str], **spec: Any) -> dict[str, Any]:
    r = await cluster.hub.post(f"/api/{user}/r/services", json={**SPEC, **spec}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def test_each_user_sees_only_their_own(cluster: Cluster) -> None:
    alice, bob = await cluster.user("alice"), await cluster.user("bob")
    mine = await _create(cluster, "alice", alice)
    theirs = await _create(cluster, "bob", bob)
    gone = await _create(cluster, "alice", alice, name="gone")
    assert (await cluster.hub.delete(f"/api/services/{gone['id']}", headers=alice)).status_code == 204

    assert (await cluster.hub.get("/api/me", headers=alice)).json() == {"username": "alice", "admin": False}
    assert (await cluster.hub.get("/api/me")).json() == {"username": "admin", "admin": True}

    # The list's filters: a user's name filter never reaches another user's service of that name.
    names = [(s["owner"], s["name"]) for s in (await cluster.hub.get("/api/services", params={"name": "m"},
                                                                    headers=alice)).json()]
    assert names == [("alice", "m")]
    assert (await cluster.hub.get("/api/services", params={"owner": "bob"}, headers=alice)).json() == []
    by_admin = (await cluster.hub.get("/api/services", params={"name": "m", "owner": "bob"})).json()
    assert [s["id"] for s in by_admin] == [theirs["id"]]
    assert (await cluster.hub.get("/api/services", params={"owner": "nobody"})).json() == []

    # Operations: alice's service's and her delete of the service that is gone; never bob's.
    ops = (await cluster.hub.get("/api/operations", headers=alice)).json()
    assert sorted((o["operation"], o["service_id"]) for o in ops) == sorted(
        [("create", mine["id"]), ("create", gone["id"]), ("delete", gone["id"])])
    bobs = (await cluster.hub.get("/api/operations", headers=bob)).json()
    assert [(o["operation"], o["service_id"]) for o in bobs] == [("create", theirs["id"])]
    r = await cluster.hub.get(f"/api/operations/{bobs[0]['id']}", headers=alice)
    assert r.status_code == 404 and r.json()["error"]["code"] == "OPERATION_NOT_FOUND", r.text
    assert (await cluster.hub.get(f"/api/operations/{bobs[0]['id']}", headers=bob)).json() == bobs[0]
    assert (await cluster.hub.get(f"/api/operations/{bobs[0]['id']}")).json() == bobs[0]
    assert len((await cluster.hub.get("/api/operations", params={"operation": "create"})).json()) == 3
    filtered = (await cluster.hub.get("/api/operations", params={"service_id": theirs["id"]}, headers=alice)).json()
    assert filtered == []

    # Audit: a user's own calls only, whatever the filter asks for.
    audit = (await cluster.hub.get("/api/audit", headers=alice)).json()
    assert audit and {e["actor"] for e in audit} == {"alice"}
    assert any(e["method"] == "POST" and e["path"] == "/api/alice/r/services" for e in audit)
    assert (await cluster.hub.get("/api/audit", params={"actor": "bob"}, headers=alice)).json() == []
    assert {e["actor"] for e in (await cluster.hub.get("/api/audit", params={"limit": 1000})).json()} >= {
        "alice", "bob"}

    # The names of the callers that are no user are refused, and nothing is created.
    async def users() -> int:
        async with cluster.db.session() as session:
            return await session.scalar(select(func.count()).select_from(UserModel)) or 0

    before = await users()
    for name in ("anonymous", "system", "hub", "Anonymous"):
        r = await cluster.hub.post("/api/admin/users", json={"username": name})
        assert r.status_code == 422 and r.json()["error"]["code"] == "RESERVED_NAME", r.text
    assert await users() == before
    # A user of such a name from before they were refused sees none of those callers' entries.
    assert (await cluster.hub.get("/api/services", headers={"Authorization": "Bearer nope"})).status_code == 401
    async with cluster.db.session() as session:
        session.add_all([AuditModel(actor=actor, method="POST", path="/containers", status_code=200, result="ok")
                         for actor in ("hub", "system", "controller:x")])
        named = {name: await issue_token(session, await ensure_user(session, name, False))
                 for name in ("anonymous", "hub", "system")}
    assert len((await cluster.hub.get("/api/audit", params={"actor": "anonymous"})).json()) >= 1
    for name, token in named.items():
        r = await cluster.hub.get("/api/audit", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == [], (name, r.text)

    # Alerts: those of a user's own services.
    async with cluster.db.session() as session:
        for service in (mine, theirs):
            session.add(AlertModel(kind="memory", controller_id=service["controller_id"], service_id=service["id"],
                                   container_id=service["container_id"], value=95.0, threshold=90.0))
    seen = {u: [a["service_id"] for a in (await cluster.hub.get("/api/alerts", headers=h)).json()]
            for u, h in (("alice", alice), ("bob", bob))}
    assert seen == {"alice": [mine["id"]], "bob": [theirs["id"]]}
    assert len((await cluster.hub.get("/api/alerts", params={"active": "true"})).json()) == 2


async def test_migrate_moves_the_named_replica(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    service = await _create(cluster, "alice", alice, replicas=2)
    url = f"/api/services/{service['id']}/migrate"
    before = {r["id"]: r["controller_id"] for r in service["replicas"]}
    moved, kept = list(before)

    r = await cluster.hub.post(url, json={"replica": moved}, headers=alice)
    assert r.status_code == 403 and r.json()["error"]["code"] == "ADMIN_REQUIRED", r.text
    r = await cluster.hub.post(url, json={"replica": "no-such-replica"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "REPLICA_NOT_FOUND", r.text
    r = await cluster.hub.post(url, json={"replica": moved, "target_controller": 7})
    assert r.status_code == 422, r.text
    assert {x["id"]: x["controller_id"] for x in
            (await cluster.hub.get(f"/api/services/{service['id']}")).json()["replicas"]} == before

    r = await cluster.hub.post(url, json={"replica": moved})
    assert r.status_code == 200, r.text
    after = {x["id"]: x["controller_id"] for x in r.json()["replicas"]}
    assert moved not in after and after[kept] == before[kept]
    [new] = set(after) - {kept}
    assert after[new] != before[moved]
    [op] = (await cluster.hub.get("/api/operations", params={"operation": "migrate"}, headers=alice)).json()
    assert op["status"] == "succeeded" and op["actor"] == "admin" and op["service_id"] == service["id"]


async def test_scale_and_drain_show_their_progress_reaching_the_total(cluster: Cluster) -> None:
    """Through the async SDK on the hub in process (its ASGI transport, as the console calls its own hub): each
    poll's ``details.progress`` only grows, and the operation ends with it at its total."""
    gpu, cpu1, cpu2 = cluster.controller_ids
    transport = cluster.hub._transport
    assert isinstance(transport, httpx.ASGITransport)
    async with AsyncClient(url="http://hub", token=cluster.admin_token, transport=transport) as hub:
        service = await hub.services.create({**SPEC, "name": "p"})
        polls: list[OperationOut] = []
        scaled = await hub.services.scale(service.id, 3, progress=polls.append)
        assert len(scaled.replicas) == 3
        seen = [p.details["progress"]["done"] for p in polls if "progress" in p.details]
        assert seen == sorted(seen) and seen[-1] == 2
        assert polls[-1].status == "succeeded"
        assert polls[-1].details["progress"] == {"done": 2, "total": 2, "unit": "replicas",
                                                 "step": "3 replicas running"}

        await hub.services.create({**SPEC, "name": "q"}, progress=polls.append)
        # A drain counts the services whose primary copy it hosts.
        moving = sum(s.controller_id == cpu1 for s in await hub.services.list())
        assert moving >= 1
        drains: list[OperationOut] = []
        drained = await hub.controllers.drain(cpu1, progress=drains.append)
        assert drained.enabled is False and drained.status != "draining"
        assert drains[-1].status == "succeeded"
        assert drains[-1].details["progress"] == {"done": moving, "total": moving, "unit": "services",
                                                  "step": f"{cpu1} drained"}
        assert not cluster.containers(**{"mmanager.controller": cpu1})


def test_the_cli_refuses_reserved_user_names(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    runner = CliRunner()
    for name in ("anonymous", "system", "hub", "controller:a", "SYSTEM"):
        done = runner.invoke(cli, ["users", "create", name], env={"MMANAGER_DATABASE_URL": url})
        assert done.exit_code != 0 and "reserved" in done.output, (name, done.output)
    assert runner.invoke(cli, ["users", "create", "carol"], env={"MMANAGER_DATABASE_URL": url}).exit_code == 0

    async def names() -> list[str]:
        db = Database(url)
        try:
            async with db.session() as session:
                return list(await session.scalars(select(UserModel.username)))
        finally:
            await db.dispose()

    assert asyncio.run(names()) == ["carol"]
