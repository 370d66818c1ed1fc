"""The audit log and the request body limits, through the hub's API on real
PostgreSQL, with controllers on the real Docker engine: every mutating call
and every refusal is in ``GET /api/admin/audit`` with who, what and how it
ended, and nothing secret; a controller's own refusals arrive with its
heartbeats; oversized bodies answer 413 and change nothing; a change made in the web console is one row,
the API call's, under the browser's request id, and only the console's own refusals are rows of its own."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from controller.app import create_app as create_controller_app
from controller.config import ControllerSettings
from examples.images import EXAMPLE_IMAGE
from hub.db import Database
from hub.models import AuditModel, ServiceModel
from hub.services.audit import AuditLog
from mmanager.audit import COALESCE_PER_KEY, COALESCE_WINDOW
from mmanager.wire import AuditEvent
from tests.hub.conftest import KEY, Cluster
from tests.support.console import ConsoleSession
from tests.support.net import free_port
from tests.support.poll import eventually

SECRET_ENV = "hunter2-" + uuid.uuid4().hex
SPEC = {"name": "audited", "image": EXAMPLE_IMAGE, "env": {"DB_PASSWORD": SECRET_ENV},
        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


async def audit(cluster: Cluster, **params: Any) -> list[dict[str, Any]]:
    r = await cluster.hub.get("/api/admin/audit", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def one(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [row for row in rows if all(row[k] == v for k, v in match.items())]
    assert len(found) == 1, f"{match} in {json.dumps(rows, indent=1)}"
    return found[0]


async def services(cluster: Cluster) -> int:
    async with cluster.db.session() as session:
        return await session.scalar(select(func.count()).select_from(ServiceModel)) or 0


async def test_every_change_and_every_refusal_is_audited_without_secrets(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    created = await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert (await cluster.hub.post(f"/api/services/{sid}/stop", headers=alice)).status_code == 200
    assert (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).status_code == 200
    assert (await cluster.hub.delete(f"/api/services/{sid}", headers=alice)).status_code == 204
    refused = await cluster.hub.post("/api/alice/lab/services", json={**SPEC, "privileged": True}, headers=alice)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "VALIDATION_ERROR"
    forbidden = await cluster.hub.get("/api/admin/controllers", headers=alice)
    assert forbidden.status_code == 403
    assert (await cluster.hub.get("/api/admin/audit", headers=alice)).status_code == 403
    stranger = {"Authorization": "Bearer mmh_not-a-token"}
    assert (await cluster.hub.delete(f"/api/services/{sid}", headers=stranger)).status_code == 401
    assert (await cluster.hub.get("/api/services", headers={"Authorization": ""})).status_code == 401

    rows = await audit(cluster, actor="alice")
    create = one(rows, method="POST", path="/api/alice/lab/services", status_code=201)
    assert (create["target"], create["result"], create["source"], create["error_code"]) == (sid, "ok", "hub", None)
    assert one(rows, path=f"/api/services/{sid}/stop")["result"] == "ok"
    delete = one(rows, method="DELETE")
    assert (delete["target"], delete["status_code"], delete["result"]) == (sid, 204, "ok")
    bad = one(rows, method="POST", status_code=422)
    assert (bad["result"], bad["error_code"], bad["target"]) == ("refused", "VALIDATION_ERROR", None)
    assert one(rows, path="/api/admin/controllers")["error_code"] == "ADMIN_REQUIRED"
    assert one(rows, path="/api/admin/audit")["status_code"] == 403
    # Reads that succeed are not audited.
    assert not [r for r in rows if r["method"] == "GET" and r["result"] == "ok"]
    # Newest first.
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert rows[-1]["id"] == create["id"]

    anonymous = await audit(cluster, actor="anonymous")
    assert {(r["method"], r["status_code"], r["error_code"]) for r in anonymous} == {
        ("DELETE", 401, "UNAUTHORIZED"), ("GET", 401, "UNAUTHORIZED")}
    assert one(anonymous, method="DELETE")["target"] == sid
    assert all(r["remote"] for r in anonymous)

    # The filters.
    assert {r["method"] for r in await audit(cluster, target=sid)} == {"POST", "DELETE"}
    assert {r["status_code"] for r in await audit(cluster, target=sid, result="ok")} == {201, 200, 204}
    assert len(await audit(cluster, method="delete")) == 2
    assert len(await audit(cluster, actor="alice", result="refused")) == 3
    assert await audit(cluster, source="controller:none") == []
    assert await audit(cluster, since=(datetime.now(UTC) + timedelta(minutes=1)).isoformat()) == []
    page = await audit(cluster, actor="alice", limit=2, offset=1)
    assert [r["id"] for r in page] == [r["id"] for r in rows[1:3]]
    assert (await cluster.hub.get("/api/admin/audit", params={"result": "maybe"})).status_code == 422
    assert (await cluster.hub.get("/api/admin/audit", params={"limit": 1001})).status_code == 422

    async with cluster.db.session() as session:
        stored = json.dumps([
            {c.name: getattr(row, c.name) for c in AuditModel.__table__.columns}
            for row in await session.scalars(select(AuditModel))
        ], default=str)
    for secret in (SECRET_ENV, cluster.tokens["alice"], cluster.admin_token, "mmh_not-a-token", KEY):
        assert secret not in stored


async def test_oversized_bodies_answer_413_and_change_nothing(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    big = {**SPEC, "env": {"BLOB": "x" * (2 * 1024**2)}}
    r = await cluster.hub.post("/api/alice/lab/services", json=big, headers=alice)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "chunked", "image": "' + EXAMPLE_IMAGE.encode() + b'", "env": {"BLOB": "'
        for _ in range(24):
            yield b"y" * 65536
        yield b'"}}'

    r = await cluster.hub.post("/api/alice/lab/services", content=chunks(),
                               headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    # A handler that never reads its body does not run either.
    r = await cluster.hub.post(f"/api/admin/controllers/{cluster.controller_ids[1]}/disable", content=b"z" * 2**21)
    assert r.status_code == 413
    assert await services(cluster) == 0
    assert not cluster.containers()
    assert all(c["enabled"] for c in (await cluster.hub.get("/api/admin/controllers")).json())
    # Refused before any authentication ran: the body comes first.
    refused = [r for r in await audit(cluster, result="refused") if r["status_code"] == 413]
    assert [(r["actor"], r["error_code"]) for r in refused] == [("anonymous", "PAYLOAD_TOO_LARGE")] * 3

    # Heartbeats have their own limit (MMANAGER_MAX_HEARTBEAT_BYTES, 8 MiB): a 2 MiB one goes through.
    cid = f"big-{uuid.uuid4().hex[:6]}"
    beat = heartbeat(cid, padding="p" * 2**21)
    key = {"Authorization": f"Bearer {KEY}"}
    r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", json=beat, headers=key)
    assert r.status_code == 200, r.text
    r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", json={**beat, "padding": "p" * 9 * 2**20},
                               headers=key)
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


def heartbeat(controller_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "server_id": controller_id, "url": f"http://{controller_id}.test:8001", "server_type": "cpu",
        "health": {
            "status": "healthy", "server_id": controller_id, "server_type": "cpu", "version": "t", "docker": True,
            "containers": {"running": 0, "max_allowed": 20},
            "resources": {"cpu_cores": 2, "memory_total_gb": 8, "memory_available_gb": 4},
            "load_percentage": 5.0, "memory_usage_percent": 50.0,
            "capabilities": {"gpu_support": False, "max_memory_gb": 8},
        },
        **extra,
    }


@asynccontextmanager
async def pushing_controller(cluster: Cluster, suffix: str) -> AsyncIterator[tuple[FastAPI, str]]:
    """A real controller app (on the real Docker) that heartbeats to the cluster's in-process hub."""
    async def to_hub(request: httpx.Request) -> httpx.Response:
        answer = await cluster.hub.request(request.method, request.url.path, content=request.content, headers={
            "Authorization": request.headers["authorization"], "Content-Type": "application/json"})
        return httpx.Response(answer.status_code, content=answer.content, headers={"Content-Type": "application/json"})

    cid = f"t{uuid.uuid4().hex[:6]}-{suffix}"
    settings = ControllerSettings(
        _env_file=None, MMANAGER_API_KEY=KEY, SERVER_ID=cid, CONTROLLER_URL=f"http://{cid}.test:8001",
        PUBLISH_IP="127.0.0.1", MMANAGER_HUB_URL="http://hub.test",
    )
    app = create_controller_app(settings, hub_transport=httpx.MockTransport(to_hub))
    async with app.router.lifespan_context(app):
        yield app, cid


async def test_a_controllers_refusals_reach_the_hub_with_its_heartbeats(cluster: Cluster) -> None:
    async with pushing_controller(cluster, "push") as (app, cid), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://ctl", headers={"Authorization": f"Bearer {KEY}"}
    ) as ctl:
        await eventually(lambda: app.state.containers.sync.in_sync, 5, "the controller in sync", interval=0.05)
        hostile = await ctl.post("/containers/", json={
            "image": EXAMPLE_IMAGE, "environment": {"TOKEN": SECRET_ENV}, "labels": {"mmanager.service": "mine"}})
        assert 400 <= hostile.status_code < 500, hostile.text
        code = hostile.json()["error"]["code"]
        assert (await ctl.get("/containers/", headers={"Authorization": "Bearer wrong"})).status_code == 401

        source = f"controller:{cid}"
        async def both_shipped() -> list[dict[str, Any]] | None:
            rows = await audit(cluster, source=source)
            return rows if len(rows) >= 2 else None

        rows = await eventually(both_shipped, 10, "both refusals in the hub's log", interval=0.05)
        create = one(rows, method="POST", path="/containers")
        assert (create["actor"], create["status_code"], create["error_code"], create["result"]) == (
            "hub", hostile.status_code, code, "refused")
        assert one(rows, method="GET", path="/containers")["actor"] == "anonymous"
        assert SECRET_ENV not in json.dumps(rows)
        # Shipped once acknowledged, and gone from the controller's queue.
        await eventually(lambda: len(app.state.audit) == 0, 5, "the controller's queue emptied", interval=0.05)
        # Its successful heartbeats are not in the log; a refused one is.
        assert app.state.heartbeat.sequence > 1
        assert not [r for r in await audit(cluster, actor=source) if "heartbeat" in r["path"]]
        r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", json=heartbeat(cid),
                                   headers={"Authorization": "Bearer not-the-key-at-all"})
        assert r.status_code == 401
        refused = one(await audit(cluster, target=cid), path=f"/api/controllers/{cid}/heartbeat")
        assert (refused["actor"], refused["result"]) == ("anonymous", "refused")


async def test_with_the_database_down_the_event_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mmanager.audit")
    down = Database(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none")
    event = AuditEvent(at=datetime.now(UTC), actor="alice", method="DELETE", path="/api/services/s1", target="s1",
                       status_code=204)
    try:
        await AuditLog(down).record(event)
    finally:
        await down.dispose()
    [line] = [r.getMessage() for r in caplog.records if r.name == "mmanager.audit"]
    logged = json.loads(line[line.index("{"):])
    assert (logged["actor"], logged["target"], logged["result"], logged["source"]) == ("alice", "s1", "ok", "hub")


async def test_a_nul_in_a_path_is_audited_and_never_cuts_a_controller_off(cluster: Cluster) -> None:
    """``/containers/%00`` on a controller once made every later heartbeat fail (PostgreSQL refuses NUL)."""
    async with pushing_controller(cluster, "nul") as (app, cid), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ctl") as ctl:
        agent = app.state.heartbeat
        await eventually(lambda: agent.last_answer is not None, 5, "a first answer", interval=0.05)
        assert (await ctl.get("/containers/%00")).status_code == 401
        rows = await eventually(lambda: audit(cluster, source=f"controller:{cid}"), 10,
                                "the refusal in the hub's log", interval=0.05)
        event = one(rows, method="GET")
        assert (event["path"], event["target"], event["actor"]) == ("/containers/\ufffd", "\ufffd", "anonymous")
        # Heartbeats go on succeeding, and the hub keeps the controller healthy.
        beats = agent.sequence
        await eventually(lambda: agent.sequence >= beats + 3, 5, "three more heartbeats", interval=0.05)
        assert agent.failures == 0 and len(app.state.audit) == 0
        await cluster.parts.ingest.flush()
        [controller] = [c for c in (await cluster.hub.get("/api/admin/controllers")).json() if c["id"] == cid]
        assert controller["status"] == "healthy"

    # The hub's own refusal of such a path is in the database too (it used to go to the log only).
    assert (await cluster.hub.get("/api/services/%00", headers={"Authorization": ""})).status_code == 401
    assert one(await audit(cluster, actor="anonymous"), path="/api/services/\ufffd")["status_code"] == 401


async def test_shipped_events_the_database_refuses_never_fail_a_heartbeat(cluster: Cluster) -> None:
    cid = f"forged-{uuid.uuid4().hex[:6]}"
    key = {"Authorization": f"Bearer {KEY}"}
    now = datetime.now(UTC).isoformat()
    nul = {"at": now, "actor": "evil\x00actor", "method": "DELETE", "path": "/containers/\x00\x1b[31m",
           "target": "\x00" * 500, "status_code": 404, "error_code": "NOT\x00FOUND",
           "details": {"message": "a\x00b", "k\x00": [1.5, "\ud800"], "n": float("nan")}}
    r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat",
                               headers={**key, "Content-Type": "application/json"}, content=json.dumps(heartbeat(cid, audit=[nul])))
    assert r.status_code == 200, r.text
    row = one(await audit(cluster, source=f"controller:{cid}"), method="DELETE")
    assert (row["actor"], row["path"], row["error_code"]) == ("evil\ufffdactor", "/containers/\ufffd\ufffd[31m",
                                                              "NOT\ufffdFOUND")
    assert row["target"] == "\ufffd" * 160
    assert row["details"] == {"message": "a\ufffdb", "k\ufffd": [1.5, "\ufffd"], "n": "nan"}

    # One the cleaning cannot fix (a status code out of the column's range): the beat still succeeds, and one
    # event says how many were rejected.
    huge = {**nul, "details": {}, "status_code": 2**40}
    r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", headers=key,
                               json=heartbeat(cid, audit=[huge, {**huge, "method": "POST"}]))
    assert r.status_code == 200, r.text
    placeholder = one(await audit(cluster, source=f"controller:{cid}"), error_code="AUDIT_REJECTED")
    assert placeholder["details"]["rejected"] == 2 and placeholder["status_code"] == 500
    assert placeholder["actor"] == f"controller:{cid}"


async def test_anonymous_refusals_are_bounded_per_caller(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    # The bound is per fixed window of the hub's monotonic clock (this process's): start with at least 10 s
    # of one ahead, so every call below falls in the same window (one that closed half-way admitted more).
    while COALESCE_WINDOW - time.monotonic() % COALESCE_WINDOW < 10:
        await asyncio.sleep(0.5)
    for _ in range(COALESCE_PER_KEY + 5):
        assert (await cluster.hub.get("/api/services", headers={"Authorization": ""})).status_code == 401
    for _ in range(COALESCE_PER_KEY + 5):
        assert (await cluster.hub.get("/api/services/nope", headers=alice)).status_code == 404
    # The rest of the minute's anonymous refusals are counted (one event for them when the minute is over);
    # a caller who authenticated is recorded in full.
    assert len(await audit(cluster, actor="anonymous")) == COALESCE_PER_KEY
    assert len(await audit(cluster, actor="alice")) == COALESCE_PER_KEY + 5


async def test_a_console_action_is_one_row_and_only_its_own_refusals_are_its_rows(cluster: Cluster) -> None:
    cid = cluster.controller_ids[2]
    request_id = "console-" + uuid.uuid4().hex
    # A browser: the hub's own transport, no Authorization header, cookies kept.
    async with httpx.AsyncClient(transport=cluster.hub._transport, base_url="http://hub", timeout=60) as browser:
        console = ConsoleSession(browser)
        assert (await console.log_in(cluster.admin_token)).status_code == 303
        disabled = await console.post(f"/ui/controllers/{cid}/disable", "/ui/controllers", {"confirmed": "yes"},
                                      headers={"X-Request-ID": request_id})
        assert disabled.status_code == 303, disabled.text
        forged = await browser.post(f"/ui/controllers/{cid}/enable", data={"csrf": "0" * 64},
                                    headers={"Origin": "http://hub"})
        assert forged.status_code == 403
        assert (await console.log_in("mmh_not-a-token")).status_code == 401
        assert (await console.log_in("mmh_tökén")).status_code == 422

    rows = await audit(cluster, actor="admin")
    # The change: one row, the API call's, with the browser's address and the browser's request's id.
    change = one(rows, method="POST", status_code=200)
    assert change["path"] == f"/api/admin/controllers/{cid}/disable" and change["remote"] == "127.0.0.1"
    assert change["details"]["request_id"] == request_id
    # The console's own refusal, with its code; its pages and its login are no rows.
    assert [(r["path"], r["error_code"]) for r in rows if r["path"].startswith("/ui")] == [
        (f"/ui/controllers/{cid}/enable", "CSRF_REFUSED")]
    # A token the API refused is its row (GET /api/me); one that cannot be a token is the console's.
    anonymous = await audit(cluster, actor="anonymous")
    assert sorted((r["path"], r["status_code"], r["error_code"]) for r in anonymous) == [
        ("/api/me", 401, "UNAUTHORIZED"), ("/ui/login", 422, "TOKEN_MALFORMED")]
