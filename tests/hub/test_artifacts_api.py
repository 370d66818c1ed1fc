"""The artifacts' routes on real PostgreSQL, through the hub's HTTP API in process: uploads streamed, hashed,
size-limited with nothing kept past a limit, deduplicated; tenancy; a delete refused while a job names the
artifact; the controllers' download by digest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.models import ArtifactModel, ControllerModel, utcnow
from hub.services.users import create_user

KEY = "test-key-" + "x" * 32


class Api:
    def __init__(self, client: httpx.AsyncClient, store: Path, db: Database) -> None:
        self.client = client
        self.store = store
        self.db = db
        self.tokens: dict[str, dict[str, str]] = {}

    async def user(self, name: str) -> dict[str, str]:
        async with self.db.session() as session:
            _, token = await create_user(session, name)
        self.tokens[name] = {"Authorization": f"Bearer {token}"}
        return self.tokens[name]

    def stored(self) -> list[str]:
        files = self.store / "sha256"
        return sorted(os.listdir(files)) if files.exists() else []

    def leftovers(self) -> list[str]:
        tmp = self.store / "tmp"
        return os.listdir(tmp) if tmp.exists() else []


@pytest.fixture
async def api(db: Database, tmp_path: Path) -> AsyncIterator[Api]:
    settings = HubSettings(database_url=db.url, api_key=KEY, artifact_store=tmp_path / "artifacts",
                           artifact_max_bytes=4096, artifacts_per_user_bytes=6000, model_store=tmp_path / "models")
    hub = build_hub(settings, db=Database(db.url))
    app = create_app(settings, hub=hub, run_loops=False)
    async with app.router.lifespan_context(app):
        async with db.session() as session:
            session.add(ControllerModel(id="c1", url="http://c1:8001", status="healthy", last_heartbeat_at=utcnow()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
            yield Api(client, tmp_path / "artifacts", db)


async def upload(api: Api, who: dict[str, str], name: str, data: bytes | Any, **headers: str) -> httpx.Response:
    return await api.client.post("/api/artifacts", params={"name": name}, content=data,
                                 headers={**who, "Content-Type": "application/octet-stream", **headers})


async def test_an_upload_is_stored_by_digest_listed_downloaded_and_deduplicated(api: Api) -> None:
    alice = await api.user("alice")
    data = os.urandom(3000)
    r = await upload(api, alice, "reads.bin", data)
    assert r.status_code == 201, r.text
    art = r.json()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert (art["sha256"], art["size"], art["path"], art["owner"]) == (digest, 3000, "reads.bin", "alice")
    assert api.stored() == [digest.removeprefix("sha256:")]
    again = await upload(api, alice, "reads.bin", data)
    assert again.status_code == 200 and again.json()["id"] == art["id"]
    content = await api.client.get(art["url"], headers=alice)
    assert content.content == data and content.headers["x-artifact-digest"] == digest
    assert [a["id"] for a in (await api.client.get("/api/artifacts", headers=alice)).json()] == [art["id"]]
    # A controller fetches a job's input by digest, with its key, from the model files' route.
    fetched = await api.client.get(f"/api/controllers/c1/model-files/{digest}",
                                   headers={"Authorization": f"Bearer {KEY}"})
    assert fetched.status_code == 200 and fetched.content == data


async def test_uploads_past_a_limit_are_refused_and_leave_nothing(api: Api, db: Database) -> None:
    alice = await api.user("alice")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 1000

    # Declared too big, or found so while it streams (no Content-Length).
    for body in (b"x" * 5000, chunks()):
        r = await upload(api, alice, "big.bin", body)
        assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", r.text
    assert api.stored() == [] and api.leftovers() == []
    # The user's quota: 507 with its code, nothing kept.
    assert (await upload(api, alice, "a.bin", b"a" * 4000)).status_code == 201
    r = await upload(api, alice, "b.bin", b"b" * 3000)
    assert r.status_code == 507 and r.json()["error"]["code"] == "ARTIFACT_QUOTA_EXCEEDED", r.text
    assert len(api.stored()) == 1 and api.leftovers() == []
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ArtifactModel)) == 1
    r = await upload(api, alice, "../etc/passwd", b"x")
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_ARTIFACT_NAME"


async def test_another_users_artifact_does_not_exist_for_them_and_one_in_use_is_kept(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    art = (await upload(api, alice, "in.txt", b"hello")).json()
    for method, path in (("GET", f"/api/artifacts/{art['id']}"), ("GET", f"/api/artifacts/{art['id']}/content"),
                         ("DELETE", f"/api/artifacts/{art['id']}")):
        r = await api.client.request(method, path, headers=bob)
        assert r.status_code == 404 and r.json()["error"]["code"] == "ARTIFACT_NOT_FOUND", r.text
    assert (await api.client.get("/api/artifacts", headers=bob)).json() == []
    # Bob cannot name it as an input either.
    r = await api.client.post("/api/jobs", headers=bob, json={"name": "j", "image": "busybox", "inputs": [art["id"]]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "ARTIFACT_NOT_FOUND", r.text
    r = await api.client.post("/api/jobs", headers=alice, json={"name": "j", "image": "busybox",
                                                                "inputs": [{"artifact": art["id"], "path": "x/in"}]})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    # The job's operations are its owner's to see, not another user's.
    mine = [(o["operation"], o["job_id"]) for o in (await api.client.get("/api/operations", headers=alice)).json()]
    assert mine == [("job_submit", job_id)]
    assert (await api.client.get("/api/operations", headers=bob)).json() == []
    r = await api.client.delete(f"/api/artifacts/{art['id']}", headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "ARTIFACT_IN_USE", r.text
    assert (await api.client.post(f"/api/jobs/{r.json()['error']['details']['jobs'][0]}/cancel",
                                  headers=alice)).json()["status"] == "cancelled"
    assert (await api.client.delete(f"/api/artifacts/{art['id']}", headers=alice)).status_code == 204
    assert api.stored() == []
