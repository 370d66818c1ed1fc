"""Controllers' own keys through the hub's API, on real PostgreSQL: minted once
and stored hashed, each speaking only for its controller, at most two active,
refused at once when revoked; the shared key only for controllers without keys
of their own. The controllers here are registered but never reached (no loops
run): only what they push matters."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.deps import Hub
from hub.models import ControllerKeyModel, ControllerModel
from hub.services.users import create_user
from mmanager.cli import app as cli
from tests.hub.conftest import KEY
from tests.hub.test_failure_handling import heartbeat
from tests.support.poll import eventually

CONTROLLERS = ("ctl-x", "ctl-y", "ctl-z")


class Unreachable(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("not reachable in these tests", request=request)


@dataclass
class KeyHub:
    client: httpx.AsyncClient
    parts: Hub
    db: Database

    async def mint(self, controller_id: str) -> dict[str, Any]:
        r = await self.client.post(f"/api/admin/controllers/{controller_id}/keys")
        assert r.status_code == 201, r.text
        return r.json()

    async def beat(self, controller_id: str, key: str, body: Any = None) -> httpx.Response:
        return await self.client.post(f"/api/controllers/{controller_id}/heartbeat",
                                      json=heartbeat(controller_id, []) if body is None else body,
                                      headers={"Authorization": f"Bearer {key}"})

    async def last_heartbeat(self, controller_id: str) -> Any:
        await self.parts.ingest.flush()
        async with self.db.session() as session:
            return (await session.get(ControllerModel, controller_id)).last_heartbeat_at


@contextlib.asynccontextmanager
async def key_hub(db: Database, **settings: Any) -> AsyncIterator[KeyHub]:
    """A hub without its loops (``settings``: more of HubSettings), its controllers registered, never reached."""
    entries = [{"id": cid, "url": f"http://{cid}.test:8001"} for cid in CONTROLLERS]
    hub_settings = HubSettings(database_url=db.url, api_key=KEY, controllers=json.dumps(entries), _env_file=None,
                               **settings)
    parts = build_hub(hub_settings, db=Database(db.url), transport=Unreachable())
    app = create_app(hub_settings, hub=parts, run_loops=False)
    async with app.router.lifespan_context(app):
        async with db.session() as session:
            _, token = await create_user(session, "root", is_admin=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub",
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            yield KeyHub(client, parts, db)


@pytest.fixture
async def hub(db: Database) -> AsyncIterator[KeyHub]:
    async with key_hub(db) as found:
        yield found


async def test_a_key_is_shown_once_and_stored_as_its_hash_only(hub: KeyHub) -> None:
    created = await hub.mint("ctl-x")
    key = created["key"]
    assert set(created) >= {"id", "prefix", "key", "created_at"}
    assert key.startswith("mmc_") and len(key) >= 40 and key.startswith(created["prefix"])
    listed = await hub.client.get("/api/admin/controllers/ctl-x/keys")
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()] == [created["id"]]
    assert "key" not in listed.json()[0] and key not in listed.text
    async with hub.db.session() as session:
        rows = list(await session.scalars(select(ControllerKeyModel)))
    assert [r.key_hash for r in rows] == [hashlib.sha256(key.encode()).hexdigest()]
    stored = " ".join(str(getattr(r, c.key)) for r in rows for c in ControllerKeyModel.__table__.columns)
    assert key not in stored and key[len(created["prefix"]):] not in stored

    for method, path in (("POST", "/api/admin/controllers/nope/keys"), ("GET", "/api/admin/controllers/nope/keys")):
        r = await hub.client.request(method, path)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "CONTROLLER_NOT_FOUND")
    async with hub.db.session() as session:
        _, user_token = await create_user(session, "alice")
    r = await hub.client.post("/api/admin/controllers/ctl-x/keys", headers={"Authorization": f"Bearer {user_token}"})
    assert r.status_code == 403
    # A controller's key reaches neither the admin API nor the user API.
    for path in ("/api/admin/controllers/ctl-x/keys", "/api/services"):
        assert (await hub.client.get(path, headers={"Authorization": f"Bearer {key}"})).status_code == 401


async def test_a_key_speaks_only_for_its_own_controller(hub: KeyHub) -> None:
    key_x = (await hub.mint("ctl-x"))["key"]
    r = await hub.beat("ctl-y", key_x, heartbeat("ctl-y", []))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "CONTROLLER_KEY_INVALID")
    # Checked before the body is read: a malformed body with a wrong key is a 401, not a 400.
    r = await hub.client.post("/api/controllers/ctl-y/heartbeat", content=b"{not json",
                              headers={"Authorization": f"Bearer {key_x}", "Content-Type": "application/json"})
    assert r.status_code == 401
    assert (await hub.beat("ctl-x", key_x)).status_code == 200
    assert await hub.last_heartbeat("ctl-x") is not None
    assert await hub.last_heartbeat("ctl-y") is None


async def test_two_active_keys_at_most_and_a_revoked_key_is_refused_at_once(hub: KeyHub) -> None:
    a, b = await hub.mint("ctl-x"), await hub.mint("ctl-x")
    third = await hub.client.post("/api/admin/controllers/ctl-x/keys")
    assert (third.status_code, third.json()["error"]["code"]) == (409, "CONTROLLER_KEY_LIMIT")
    assert len((await hub.client.get("/api/admin/controllers/ctl-x/keys")).json()) == 2
    for key in (a["key"], b["key"]):
        assert (await hub.beat("ctl-x", key)).status_code == 200

    # Another controller's path does not reach the key.
    r = await hub.client.delete(f"/api/admin/controllers/ctl-y/keys/{a['id']}")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "CONTROLLER_KEY_NOT_FOUND")
    assert (await hub.client.delete(f"/api/admin/controllers/ctl-x/keys/{a['id']}")).status_code == 204
    r = await hub.beat("ctl-x", a["key"])
    assert (r.status_code, r.json()["error"]["code"]) == (401, "CONTROLLER_KEY_INVALID")
    assert (await hub.beat("ctl-x", b["key"])).status_code == 200
    # Revoking again changes nothing.
    assert (await hub.client.delete(f"/api/admin/controllers/ctl-x/keys/{a['id']}")).status_code == 204

    # last_used_at is written with the heartbeats' flush (every 0.5 s while the hub runs).
    await hub.parts.ingest.flush()
    listed = {k["id"]: k for k in (await hub.client.get("/api/admin/controllers/ctl-x/keys")).json()}
    assert listed[a["id"]]["revoked_at"] is not None and listed[b["id"]]["revoked_at"] is None
    assert listed[b["id"]]["last_used_at"] is not None
    # The revoked key freed its slot.
    await hub.mint("ctl-x")


async def test_the_shared_key_speaks_only_for_controllers_without_keys(
        hub: KeyHub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await hub.mint("ctl-x")
    r = await hub.beat("ctl-x", KEY)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "CONTROLLER_KEY_INVALID")
    assert "keys of its own" in r.json()["error"]["message"]

    for _ in range(3):
        assert (await hub.beat("ctl-z", KEY)).status_code == 200
    warnings = [rec.getMessage() for rec in caplog.records
                if rec.levelno == logging.WARNING and "shared MMANAGER_API_KEY" in rec.getMessage()]
    assert len(warnings) == 1 and "ctl-z" in warnings[0]
    assert KEY not in caplog.text
    assert await hub.last_heartbeat("ctl-z") is not None

    # An unknown controller that knows the shared key still joins by beating.
    body = heartbeat("edge-new", [], url="http://edge-new.test:8001")
    assert (await hub.beat("edge-new", KEY, body)).status_code == 200
    # Once a controller has had a key, revoking it does not let the shared key back in.
    y = await hub.mint("ctl-y")
    assert (await hub.client.delete(f"/api/admin/controllers/ctl-y/keys/{y['id']}")).status_code == 204
    assert (await hub.beat("ctl-y", KEY)).status_code == 401


def test_the_cli_mints_lists_and_revokes_keys_on_the_hub_host(pg_url: str) -> None:
    """``mmanager controllers key-*``: bootstrapping without an admin token, straight on the database."""
    cid = f"ctl-cli-{uuid.uuid4().hex[:6]}"

    async def register() -> None:
        db = Database(pg_url)
        async with db.session() as session:
            session.add(ControllerModel(id=cid, url=f"http://{cid}.test:8001"))
        await db.dispose()

    asyncio.run(register())
    runner = CliRunner()
    env = {"MMANAGER_DATABASE_URL": pg_url}
    created = runner.invoke(cli, ["controllers", "key-create", cid], env=env)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("mmc_") and created.stdout.strip() == key
    listed = runner.invoke(cli, ["controllers", "key-list", cid], env=env)
    assert listed.exit_code == 0 and key not in listed.output
    [row] = listed.stdout.strip().splitlines()[1:]
    key_id = row.split("\t")[0]
    assert row.split("\t")[4] == "-"
    revoked = runner.invoke(cli, ["controllers", "key-revoke", cid, key_id], env=env)
    assert revoked.exit_code == 0, revoked.output
    [row] = runner.invoke(cli, ["controllers", "key-list", cid], env=env).stdout.strip().splitlines()[1:]
    assert row.split("\t")[4] != "-"
    unknown = runner.invoke(cli, ["controllers", "key-create", "nope"], env=env)
    assert unknown.exit_code == 2 and "not found" in unknown.output


async def test_a_fleet_on_the_shared_key_is_warned_about_one_by_one_then_counted(
        hub: KeyHub, caplog: pytest.LogCaptureFixture) -> None:
    """Ten thousand controllers on the shared key must not write ten thousand warnings at each start: the first
    ten are named, the others counted in one line, then at most one line each ``warn_every`` seconds."""
    caplog.set_level(logging.WARNING, logger="hub.services.controller_keys")
    hub.parts.ingest.keys.warn_every = 0.5
    fleet = [f"edge-{i:02d}" for i in range(25)]
    for _ in range(2):
        for cid in fleet:
            r = await hub.beat(cid, KEY, heartbeat(cid, [], url=f"http://{cid}.test:8001"))
            assert r.status_code == 200, r.text

    def lines() -> tuple[list[str], list[str]]:
        warned = [r.getMessage() for r in caplog.records if "shared MMANAGER_API_KEY" in r.getMessage()]
        return [w for w in warned if w.startswith("controller ")], [w for w in warned if "more controllers" in w]

    async def counted_lines(count: int) -> list[str]:
        # The counting line comes a second after the first controller it counts, then at most each warn_every.
        await eventually(lambda: len(lines()[1]) >= count, 5, f"{count} counting lines", interval=0.1)
        return lines()[1]

    counted = await counted_lines(1)
    await asyncio.sleep(0.6)  # past warn_every: nothing more to count, no second line
    named, counted = lines()
    assert [n.split()[1] for n in named] == fleet[:10]
    assert len(counted) == 1 and counted[0].startswith("15 more controllers") and "(25 in all" in counted[0]
    r = await hub.beat("edge-late", KEY, heartbeat("edge-late", [], url="http://edge-late.test:8001"))
    assert r.status_code == 200
    counted = await counted_lines(2)
    assert len(lines()[0]) == 10 and len(counted) == 2 and counted[1].startswith("1 more controllers")
    assert KEY not in caplog.text


async def test_controllers_sharing_the_hub_key_are_warned_about(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """One shared MMANAGER_API_KEY drives every controller: the operator hears about it at start-up."""
    entries = [{"id": cid, "url": f"http://{cid}.test:8001"} for cid in CONTROLLERS]
    entries[0]["api_key"] = "own-key-of-ctl-x-" + "k" * 24
    settings = HubSettings(database_url=db.url, api_key=KEY, controllers=json.dumps(entries))
    hub = build_hub(settings, db=Database(db.url), transport=Unreachable())
    caplog.set_level(logging.WARNING, logger="hub.services.controllers")
    try:
        await hub.controllers.sync_from_config()
    finally:
        await hub.client.aclose()
        await hub.db.dispose()
    [warning] = [r.getMessage() for r in caplog.records if "share MMANAGER_API_KEY" in r.getMessage()]
    assert "2 controllers" in warning and "ctl-y, ctl-z" in warning and KEY not in warning
