"""The heartbeat (a ``HotRoute``, hub.routers.hot) and its writes straight through the driver, on real
PostgreSQL and on SQLite (``mmanager dev``): a beat whose key the snapshot holds gets the same answer as the
first, which reloaded it, and is recorded as that one was; everything else (a key it does not know, a body it
cannot take, a beat its batch refuses) is answered and audited once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.migrate import upgrade
from hub.models import AuditModel, ControllerModel
from hub.services.users import create_user
from tests.hub.conftest import KEY
from tests.hub.test_controller_keys import CONTROLLERS, KeyHub, Unreachable
from tests.hub.test_failure_handling import heartbeat
from tests.support.poll import eventually


@pytest.fixture(params=["postgresql", "sqlite"])
async def database(request: pytest.FixtureRequest, db: Database, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgresql":
        yield db
        return
    url = f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}"
    await asyncio.to_thread(upgrade, url)
    sqlite = Database(url)
    yield sqlite
    await sqlite.dispose()


@pytest.fixture
async def keyed_hub(database: Database) -> AsyncIterator[KeyHub]:
    """A hub (its controllers registered, never reached) with a client of its application."""
    entries = [{"id": cid, "url": f"http://{cid}.test:8001"} for cid in CONTROLLERS]
    settings = HubSettings(database_url=database.url, api_key=KEY, controllers=json.dumps(entries),
                           max_heartbeat_bytes=64 * 1024, _env_file=None)
    parts = build_hub(settings, db=Database(database.url), transport=Unreachable())
    app = create_app(settings, hub=parts, run_loops=False)
    async with app.router.lifespan_context(app):
        async with database.session() as session:
            _, token = await create_user(session, "root", is_admin=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://hub", headers={"Authorization": f"Bearer {token}"}) as client:
            yield KeyHub(client, parts, database)


async def test_a_beat_on_a_remembered_key_is_answered_as_the_first_and_recorded(
        keyed_hub: KeyHub) -> None:
    hub = keyed_hub
    key = (await hub.mint("ctl-x"))["key"]
    path = "/api/controllers/ctl-x/heartbeat"
    # The first beat after a key was minted: the snapshot is reloaded by the key's check.
    direct = await hub.beat("ctl-x", key)
    assert path == "/api/controllers/ctl-x/heartbeat"
    first_seen = await hub.last_heartbeat("ctl-x")
    assert first_seen is not None

    fast = await hub.beat("ctl-x", key, heartbeat("ctl-x", [], url=None))
    assert fast.status_code == direct.status_code == 200
    assert fast.content == direct.content
    assert fast.headers["content-type"] == direct.headers["content-type"] == "application/json"
    assert fast.json() == {"interval": 2.0, "grace": 6.0, "stop": []}
    # Recorded: the controller's row says when it was heard, and what it reported.
    seen = await hub.last_heartbeat("ctl-x")
    assert seen > first_seen
    async with hub.db.session() as session:
        row = await session.get(ControllerModel, "ctl-x")
    assert (row.status, row.max_containers, row.memory_usage_percent, row.cpu_cores) == ("healthy", 20, 50.0, 2)
    assert row.health_data["version"] == "t" and row.last_push_at == seen
    # The key's use is noted as the application notes it.
    await hub.parts.ingest.flush()
    [listed] = (await hub.client.get("/api/admin/controllers/ctl-x/keys")).json()
    assert listed["last_used_at"] is not None


async def test_everything_else_is_answered_and_audited_once(keyed_hub: KeyHub) -> None:
    hub = keyed_hub
    key = (await hub.mint("ctl-x"))["key"]
    assert (await hub.beat("ctl-x", key)).status_code == 200  # the key is remembered from now on
    auth = {"Authorization": f"Bearer {key}"}
    shared = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({**heartbeat("ctl-x", []), "pad": "x" * (70 * 1024)}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        yield json.dumps(heartbeat("ctl-x", [])).encode()

    cases: list[tuple[str, str, dict[str, str], Any, int, str | None]] = [
        ("no key", "ctl-x", {"Authorization": ""}, heartbeat("ctl-x", []), 401, "UNAUTHORIZED"),
        ("a wrong key", "ctl-x", {"Authorization": "Bearer mmc_wrong"}, heartbeat("ctl-x", []), 401,
         "CONTROLLER_KEY_INVALID"),
        ("another controller's key", "ctl-y", auth, heartbeat("ctl-y", []), 401, "CONTROLLER_KEY_INVALID"),
        ("a body that is not JSON", "ctl-x", auth, b"{not json", 400, "MALFORMED_JSON"),
        ("a body the wire refuses", "ctl-x", auth, {"server_id": "ctl-x"}, 422, "VALIDATION_ERROR"),
        ("another controller's beat", "ctl-x", auth, heartbeat("ctl-y", []), 422, "SERVER_ID_MISMATCH"),
        ("over MMANAGER_MAX_HEARTBEAT_BYTES", "ctl-x", auth, big, 413, "PAYLOAD_TOO_LARGE"),
        # The shared key's first use for a controller is warned about; its batch refuses it, both times.
        ("unknown, without a url", "edge-1", shared, heartbeat("edge-1", []), 404, "CONTROLLER_NOT_FOUND"),
        ("unknown, without a url, again", "edge-1", shared, heartbeat("edge-1", []), 404, "CONTROLLER_NOT_FOUND"),
        ("a chunked body", "ctl-x", auth, chunked, 200, None),
    ]
    for what, cid, headers, body, status, code in cases:
        if callable(body):
            content = body()
        elif isinstance(body, bytes):
            content = body
        else:
            content = json.dumps(body).encode()
        r = await hub.client.post(f"/api/controllers/{cid}/heartbeat", content=content,
                                  headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == status, (what, r.text)
        if code is not None:
            assert r.json()["error"]["code"] == code, what

    async with hub.db.session() as session:
        assert await session.get(ControllerModel, "edge-1") is None
        # Each refusal audited once.
        audited = await session.scalar(select(func.count()).select_from(AuditModel).where(
            AuditModel.path.like("/api/controllers/%/heartbeat")))
    assert audited == sum(1 for case in cases if case[4] >= 400)
    # A remembered key's beat is still taken afterwards.
    assert (await hub.beat("ctl-x", key)).status_code == 200


async def test_a_controller_joins_by_beating_with_what_it_audited(
        keyed_hub: KeyHub) -> None:
    hub = keyed_hub
    # Without a url it is refused (and the shared key warned about, once)...
    r = await hub.beat("edge-3", KEY, heartbeat("edge-3", []))
    assert (r.status_code, r.json()["error"]["code"]) == (404, "CONTROLLER_NOT_FOUND")
    # ...with one, its batch registers the controller and stores what it audited.
    event = {"at": "2026-12-04T10:00:00Z", "actor": "root", "method": "POST", "path": "/containers/",
             "status_code": 403, "error_code": "POLICY_DENIED"}
    body = {**heartbeat("edge-3", [], url="http://edge-3.test:8001/"), "audit": [event]}
    r = await hub.beat("edge-3", KEY, body)
    assert r.status_code == 200, r.text
    async with hub.db.session() as session:
        row = await session.get(ControllerModel, "edge-3")
        shipped = list(await session.scalars(select(AuditModel).where(AuditModel.source == "controller:edge-3")))
    assert row is not None and (row.url, row.server_type) == ("http://edge-3.test:8001", "cpu")
    assert row.last_push_at is not None
    assert [(a.method, a.path, a.status_code, a.error_code) for a in shipped] == \
        [("POST", "/containers/", 403, "POLICY_DENIED")]


async def test_a_caller_gone_before_its_body_was_read_costs_no_traceback(
        keyed_hub: KeyHub, caplog: pytest.LogCaptureFixture) -> None:
    """An overloaded hub's callers give up and hang up; the application then finds no body to read. That is
    no error of the hub's: nothing is done, nothing is logged above DEBUG (each traceback, written twice,
    cost more than a beat, and made an overloaded hub fall further behind)."""
    keyhub = keyed_hub
    sent: list[dict[str, Any]] = []

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    body = json.dumps(heartbeat("ctl-gone", [], url="http://ctl-gone.test:8001")).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/controllers/ctl-gone/heartbeat", "raw_path": b"/api/controllers/ctl-gone/heartbeat",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("hub", 80),
             "headers": [(b"host", b"hub"), (b"authorization", f"Bearer {KEY}".encode()),
                         (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    with caplog.at_level("INFO"):
        await create_app(keyhub.parts.settings, hub=keyhub.parts, run_loops=False)(scope, gone, send)
    # (The shared key's warning, once for the controller, is the only line above INFO.)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= 40 or r.exc_info]
    assert sent and sent[0]["status"] == 499
    await asyncio.sleep(0.5)  # the audit's writes are batched: none comes
    async with keyhub.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ControllerModel).where(
            ControllerModel.id == "ctl-gone")) == 0
        # (The start's registration of MMANAGER_CONTROLLERS is audited, method RELOAD: not this call's.)
        assert await session.scalar(select(func.count()).select_from(AuditModel)
                                    .where(AuditModel.method != "RELOAD")) == 0


def shed_count(metrics: str) -> float:
    return next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("mmanager_heartbeats_shed_total "))


async def test_a_beat_shed_is_refused_at_once_with_retry_after_and_no_audit_row(
        keyed_hub: KeyHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MMANAGER_HEARTBEAT_BACKLOG beats waiting, a beat is refused at once: 503 HUB_BUSY with the interval
    as Retry-After, without an audit row each, since the
    refusal must be the cheapest thing an overloaded hub does; the metric counts it."""
    hub = keyed_hub
    key = (await hub.mint("ctl-x"))["key"]
    assert (await hub.beat("ctl-x", key)).status_code == 200  # the key is remembered from now on
    ingest = hub.parts.ingest
    monkeypatch.setattr(ingest.settings, "heartbeat_backlog", 1)
    held, record = asyncio.Event(), ingest._record

    async def slow(batch: Any) -> None:
        await held.wait()
        await record(batch)

    monkeypatch.setattr(ingest, "_record", slow)
    shed_before = shed_count((await hub.client.get("/metrics")).text)

    async def one_waiting() -> asyncio.Task[httpx.Response]:
        task = asyncio.create_task(hub.beat("ctl-x", key))
        await eventually(lambda: ingest._waiting, 5, "the beat to reach its batch")
        return task

    waiting = await one_waiting()
    shed = await hub.beat("ctl-x", key)
    assert shed.status_code == 503, shed.text
    assert shed.json()["error"]["code"] == "HUB_BUSY" and shed.headers["retry-after"] == "2"
    assert shed_count((await hub.client.get("/metrics")).text) == shed_before + 1
    held.set()
    assert (await waiting).status_code == 200
    # With a chunked body too, a shed beat leaves no audit row.
    held.clear()
    waiting = await one_waiting()

    async def chunked() -> AsyncIterator[bytes]:
        yield json.dumps(heartbeat("ctl-x", [])).encode()

    r = await hub.client.post("/api/controllers/ctl-x/heartbeat", content=chunked(),
                              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "HUB_BUSY")
    held.set()
    assert (await waiting).status_code == 200
    await asyncio.sleep(0.5)  # the audit's writes are batched: none comes
    async with hub.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(AuditModel).where(
            AuditModel.path.like("/api/controllers/%/heartbeat"))) == 0


async def test_a_beat_lists_its_images_once_and_the_hub_echoes_their_version(keyed_hub: KeyHub) -> None:
    hub = keyed_hub
    key = (await hub.mint("ctl-x"))["key"]
    images = [{"id": "sha256:" + "a" * 64, "tags": ["127.0.0.1:5000/lab/m:1"],
               "digests": ["127.0.0.1:5000/lab/m@sha256:" + "b" * 64], "size": 123}]
    listed = await hub.beat("ctl-x", key, {**heartbeat("ctl-x", []), "images_version": "v1", "images": images})
    assert listed.status_code == 200 and listed.json()["images_version"] == "v1"
    sets = hub.parts.ingest.images
    assert set(sets.holders("127.0.0.1:5000/lab/m:1")) == {"ctl-x"} and sets.size("127.0.0.1:5000/lab/m:1") == 123
    # The same set again: the version alone, answered the same.
    again = await hub.beat("ctl-x", key, {**heartbeat("ctl-x", []), "images_version": "v1"})
    assert again.json()["images_version"] == "v1" and sets.has("ctl-x", "127.0.0.1:5000/lab/m:1")
    # A version the hub does not hold, without its list (the set changed while its beats went to another
    # replica): the set held is stale and dropped, and the answer names none (the list, please).
    changed = await hub.beat("ctl-x", key, {**heartbeat("ctl-x", []), "images_version": "v2"})
    assert "images_version" not in changed.json() and sets.keys("ctl-x") is None
    emptied = await hub.beat("ctl-x", key, {**heartbeat("ctl-x", []), "images_version": "v2", "images": []})
    assert emptied.json()["images_version"] == "v2" and list(sets.holders("127.0.0.1:5000/lab/m:1")) == []
    metrics = (await hub.client.get("/metrics")).text
    assert 'mmanager_controller_images{controller="ctl-x"} 0' in metrics
