"""The artifacts' routes on real PostgreSQL, through the hub's HTTP API in process: uploads streamed, hashed,
size-limited with nothing kept past a limit, deduplicated, the quota held by uploads side by side; tenancy; a
delete refused while a job names the artifact, its bytes left to the sweep; a download of any name; the
controllers' download by digest, only of their live attempts' inputs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.deps import Hub
from hub.models import ArtifactModel, ControllerModel, JobAttemptModel, JobModel, utcnow
from hub.services.users import create_user

KEY = "test-key-" + "x" * 32


class Api:
    def __init__(self, client: httpx.AsyncClient, store: Path, db: Database, hub: Hub) -> None:
        self.client = client
        self.hub = hub
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
            for cid in ("c1", "c2"):
                session.add(ControllerModel(id=cid, url=f"http://{cid}:8001", status="healthy",
                                            last_heartbeat_at=utcnow()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
            yield Api(client, tmp_path / "artifacts", db, hub)


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
    # A controller fetches a job's input by digest, with its key, from the model files' route: only one a live
    # attempt on it takes.
    def fetch(cid: str) -> Any:
        return api.client.get(f"/api/controllers/{cid}/model-files/{digest}", headers={"Authorization": f"Bearer {KEY}"})

    assert (await fetch("c1")).status_code == 404
    r = await api.client.post("/api/jobs", headers=alice, json={"name": "j", "image": "busybox", "inputs": [art["id"]]})
    assert r.status_code == 201, r.text
    async with api.db.session() as session:
        session.add(JobAttemptModel(job_id=r.json()["id"], number=1, controller_id="c1", status="starting",
                                    created_at=utcnow(), log_size=0))
    fetched = await fetch("c1")
    assert fetched.status_code == 200 and fetched.content == data
    assert (await fetch("c2")).status_code == 404
    async with api.db.session() as session:
        await session.execute(update(JobAttemptModel).values(status="failed"))
    assert (await fetch("c1")).status_code == 404


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
    # The bytes are the sweep's, once older than its grace.
    assert len(api.stored()) == 1
    watcher = api.hub.watcher
    assert watcher is not None
    assert await watcher.sweep_store() == 0
    watcher.sweep_grace = -1.0
    assert await watcher.sweep_store() == 1
    assert api.stored() == []


async def test_the_sweep_keeps_named_bytes_and_a_put_makes_old_bytes_new(api: Api) -> None:
    alice = await api.user("alice")
    kept = (await upload(api, alice, "kept.txt", b"kept")).json()
    gone = (await upload(api, alice, "gone.txt", b"gone")).json()
    assert (await api.client.delete(f"/api/artifacts/{gone['id']}", headers=alice)).status_code == 204
    for name in api.stored():
        os.utime(api.store / "sha256" / name, (1, 1))
    # Uploaded again (and recorded) after the sweep listed it old: the put made it new, so it stays.
    again = (await upload(api, alice, "gone.txt", b"gone")).json()
    watcher = api.hub.watcher
    assert watcher is not None
    watcher.sweep_grace = 60.0
    assert await watcher.sweep_store() == 0
    assert sorted(api.stored()) == sorted(a["sha256"].removeprefix("sha256:") for a in (kept, again))
    assert (await api.client.get(again["url"], headers=alice)).content == b"gone"


async def test_a_download_of_any_name_has_a_safe_header(api: Api) -> None:
    alice = await api.user("alice")
    art = (await upload(api, alice, "x.txt", b"data")).json()
    # An output's name is whatever its job wrote.
    async with api.db.session() as session:
        await session.execute(update(ArtifactModel).values(name='out/résumé "x"\r\nX-Evil: 1.txt'))
    r = await api.client.get(art["url"], headers=alice)
    assert r.status_code == 200 and r.content == b"data"
    assert "x-evil" not in r.headers
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_ xX-Evil: 1.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20xX-Evil%3A%201.txt")


async def test_uploads_side_by_side_cannot_both_spend_what_the_quota_has_left(api: Api, db: Database) -> None:
    alice = await api.user("alice")
    started, go = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 2000
        started.set()
        await go.wait()
        yield b"a" * 2000

    # The first passed its check (nothing used) and streams; the second passes the same check and is recorded.
    first = asyncio.create_task(upload(api, alice, "first.bin", slow()))
    await started.wait()
    assert (await upload(api, alice, "second.bin", b"b" * 4000)).status_code == 201
    go.set()
    r = await first
    assert r.status_code == 507 and r.json()["error"]["code"] == "ARTIFACT_QUOTA_EXCEEDED", r.text
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(ArtifactModel)) == 1


async def test_a_kept_job_log_is_read_whole_or_by_its_last_lines_and_tail_0_reads_none(api: Api) -> None:
    alice = await api.user("alice")
    r = await api.client.post("/api/jobs", headers=alice, json={"name": "j", "image": "busybox"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert api.hub.jobs is not None

    async def chunks() -> AsyncIterator[bytes]:
        yield b"one\ntwo\nthree\n"

    digest, size = await api.hub.jobs.store.put(chunks())
    # The attempt as the watcher leaves it once it collected the log.
    async with api.db.session() as session:
        session.add(JobAttemptModel(job_id=job_id, number=1, controller_id="c1", status="failed", exit_code=1,
                                    created_at=utcnow(), finished_at=utcnow(), log_digest=digest, log_size=size))
        await session.execute(update(JobModel).where(JobModel.id == job_id).values(
            status="failed", epoch=1, attempts=1, finished_at=utcnow()))

    async def logs(**params: Any) -> httpx.Response:
        return await api.client.get(f"/api/jobs/{job_id}/logs", params=params, headers=alice)

    assert (await logs()).text == "one\ntwo\nthree\n"
    assert (await logs(tail=2)).text == "two\nthree\n"
    # None of what is there: a follow from here sends only the lines still to come.
    zero = await logs(tail=0)
    assert zero.status_code == 200 and zero.text == ""
    assert (await logs(tail=-1)).status_code == 422
