"""Model files through the hub's API on real PostgreSQL and the real Docker engine, with two controllers that
fetch from the hub as deployed ones do (``MMANAGER_HUB_URL``, their heartbeat key): an uploaded file is
mounted read-only in a service's container, a migrated copy sees the same bytes, bad specs and deletes are
refused, and a migrate that would leave a volume behind says so."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from sqlalchemy import text

from controller.app import create_app as create_controller_app
from controller.config import ControllerSettings
from examples.images import EXAMPLE_IMAGE
from hub.app import build_hub, create_app
from hub.background.prefetch import Prefetcher
from hub.config import HubSettings
from hub.db import Database
from hub.errors import ControllerRejected, InvalidRequest
from hub.schemas import ServiceSpec
from hub.services.model_files import ModelStore, lock_files, presync
from hub.services.users import create_user
from tests.hub.conftest import KEY, Cluster, Router
from tests.support.poll import eventually

SPEC = {"name": "weights", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}
# Small for the test: the limit and the cache are the same code at any size.
MAX_FILE = 1024**2


class LateTransport(httpx.AsyncBaseTransport):
    """The controllers' way to the hub, which is built after them: to its app, in process."""

    def __init__(self) -> None:
        self.to: httpx.ASGITransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert self.to is not None
        return await self.to.handle_async_request(request)


@pytest.fixture
async def cluster(db: Database, docker_client: docker.DockerClient, example_image: str,
                  tmp_path: Path) -> AsyncIterator[Cluster]:
    """Two CPU controllers whose model caches are under ``tmp_path``, and a hub whose store is there too."""
    run = uuid.uuid4().hex[:6]
    router, to_hub = Router(), LateTransport()
    entries, ids, apps = [], [], []
    for suffix, priority in (("m1", 1), ("m2", 2)):
        cid = f"t{run}-{suffix}"
        host = f"{cid}.test"
        settings = ControllerSettings(
            MMANAGER_API_KEY=KEY, SERVER_ID=cid, SERVER_TYPE="cpu", MAX_CONTAINERS=20,
            CONTROLLER_URL=f"http://{host}:8001", PUBLISH_IP="127.0.0.1", GPU_DEVICES="",
            MMANAGER_HUB_URL="http://hub.test", MMANAGER_PRESENCE="false",
            MMANAGER_MODEL_CACHE_DIR=str(tmp_path / f"cache-{suffix}"), MMANAGER_MODEL_CACHE_BYTES=str(4 * MAX_FILE),
        )
        app = create_controller_app(settings, hub_transport=to_hub)
        apps.append(app)
        router.add(host, app)
        entries.append({"id": cid, "url": f"http://{host}:8001", "server_type": "cpu", "priority": priority})
        ids.append(cid)
    settings = HubSettings(database_url=db.url, api_key=KEY, controllers=json.dumps(entries),
                           heartbeat_interval=0.5, heartbeat_grace=3, orphan_grace=2, health_timeout=8,
                           model_store=tmp_path / "store", model_file_max_bytes=MAX_FILE)
    hub = build_hub(settings, db=Database(db.url), transport=router)
    app = create_app(settings, hub=hub)
    to_hub.to = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        contexts = [a.router.lifespan_context(a) for a in apps]
        for ctx in contexts:
            await ctx.__aenter__()
        async with db.session() as session:
            _, admin_token = await create_user(session, "admin", is_admin=True)
        await hub.refresh_controllers()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub",
                                   headers={"Authorization": f"Bearer {admin_token}"}, timeout=60)
        cluster = Cluster(client, admin_token, db, router, docker_client, ids, parts=hub,
                          hosts={cid: f"{cid}.test" for cid in ids})
        try:
            yield cluster
        finally:
            await client.aclose()
            for ctx in reversed(contexts):
                await ctx.__aexit__(None, None, None)
            for container in cluster.containers():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)


async def upload(cluster: Cluster, data: bytes, name: str | None = None, **kw: Any) -> httpx.Response:
    return await cluster.hub.post("/api/model-files", params={"name": name} if name else {}, content=data, **kw)


def in_container(cluster: Cluster, container_id: str, command: str) -> tuple[int, str]:
    code, out = cluster.docker.containers.get(container_id).exec_run(["sh", "-c", command])
    return code, out.decode()


def cache_files(tmp_path: Path, suffix: str) -> list[str]:
    files = tmp_path / f"cache-{suffix}" / "sha256"
    return sorted(os.listdir(files)) if files.exists() else []


async def test_a_model_file_follows_its_service_read_only_and_byte_for_byte(cluster: Cluster, tmp_path: Path) -> None:
    m1, m2 = cluster.controller_ids
    data = os.urandom(300 * 1024)
    hexdigest = hashlib.sha256(data).hexdigest()
    r = await upload(cluster, data, "weights.bin")
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["digest"] == f"sha256:{hexdigest}" and stored["size"] == len(data)
    assert (stored["name"], stored["uploaded_by"]) == ("weights.bin", "admin")
    # The same bytes again: the file the store has.
    again = await upload(cluster, data, "other-name")
    assert again.status_code == 200 and again.json()["name"] == "weights.bin"
    assert [f["digest"] for f in (await cluster.hub.get("/api/model-files")).json()] == [stored["digest"]]
    download = await cluster.hub.get(f"/api/model-files/{stored['digest']}")
    assert download.status_code == 200 and download.content == data

    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "models": [{"digest": stored["digest"]}]})
    assert r.status_code == 201, r.text
    service = r.json()
    # The controller fetched the file before the create (its own long call): the operation says so.
    [op] = (await cluster.hub.get("/api/admin/operations",
                                  params={"service_id": service["id"], "operation": "create"})).json()
    assert op["details"]["model_sync"]["files"] == 1 and op["details"]["model_sync"]["bytes"] == len(data), op
    # The mount left out: /app/models/ and the file's name in the store.
    assert service["spec"]["models"] == [{"digest": stored["digest"], "mount": "/app/models/weights.bin"}]
    assert service["controller_id"] == m1
    code, out = in_container(cluster, service["container_id"], "sha256sum /app/models/weights.bin")
    assert code == 0 and out.split()[0] == hexdigest, out
    # Read-only: not even root in the container can change what every service here shares.
    code, out = in_container(cluster, service["container_id"], "echo x >> /app/models/weights.bin")
    assert code != 0 and "Read-only file system" in out, out
    assert cache_files(tmp_path, "m1") == [hexdigest] and cache_files(tmp_path, "m2") == []

    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": m2})
    assert r.status_code == 200, r.text
    moved = r.json()
    assert moved["controller_id"] == m2
    code, out = in_container(cluster, moved["container_id"], "sha256sum /app/models/weights.bin")
    assert code == 0 and out.split()[0] == hexdigest, out
    code, out = in_container(cluster, moved["container_id"], "rm -f /app/models/weights.bin")
    assert code != 0, out
    assert cache_files(tmp_path, "m2") == [hexdigest]

    # A file a service names stays; once none does, an admin may delete it.
    r = await cluster.hub.delete(f"/api/model-files/{stored['digest']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "MODEL_FILE_IN_USE", r.text
    assert r.json()["error"]["details"]["services"] == [f"weights ({service['id']})"]
    assert (await cluster.hub.delete(f"/api/services/{service['id']}")).status_code == 204
    assert (await cluster.hub.delete(f"/api/model-files/{stored['digest']}")).status_code == 204
    assert (await cluster.hub.get(f"/api/model-files/{stored['digest']}")).status_code == 404
    assert list((tmp_path / "store" / "sha256").iterdir()) == []


async def test_bad_model_specs_and_uploads_are_refused_and_change_nothing(cluster: Cluster, tmp_path: Path) -> None:
    stored = (await upload(cluster, b"tiny model", "tiny.bin")).json()
    digest = stored["digest"]
    unknown = "sha256:" + "0" * 64
    for models, code in [
        ([{"digest": unknown}], "MODEL_FILE_NOT_FOUND"),
        ([{"digest": "md5:abc"}], "VALIDATION_ERROR"),
        ([{"digest": digest, "mount": "relative/path"}], "VALIDATION_ERROR"),
        ([{"digest": digest, "mount": "/app/../etc/passwd"}], "VALIDATION_ERROR"),
        ([{"digest": digest, "mount": "/a"}, {"digest": digest, "mount": "/b"}], "VALIDATION_ERROR"),
        ([{"digest": digest, "mount": "/data"}], "MODEL_MOUNT_CONFLICT"),
    ]:
        r = await cluster.hub.post("/api/admin/repo/services",
                                   json={**SPEC, "volumes": {"scratch": "/data"}, "models": models})
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), (models, r.text)
    assert (await cluster.hub.get("/api/services")).json() == []
    # A patch naming a missing file changes nothing either.
    service = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    r = await cluster.hub.patch(f"/api/services/{service['id']}", json={"models": [{"digest": unknown}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "MODEL_FILE_NOT_FOUND", r.text
    assert (await cluster.hub.get(f"/api/services/{service['id']}")).json()["version"] == 1

    # Over the limit, declared or streamed: 413, and nothing kept, not even a partial temporary file.
    too_big = b"x" * (MAX_FILE + 1)
    r = await upload(cluster, too_big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", r.text

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(too_big), 64 * 1024):
            yield too_big[start:start + 64 * 1024]

    r = await upload(cluster, chunks())  # type: ignore[arg-type]
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", r.text
    assert [f["digest"] for f in (await cluster.hub.get("/api/model-files")).json()] == [digest]
    assert sorted(os.listdir(tmp_path / "store" / "sha256")) == [digest.removeprefix("sha256:")]
    assert os.listdir(tmp_path / "store" / "tmp") == []
    r = await upload(cluster, b"x", "../escape")
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_MODEL_FILE_NAME", r.text

    # Controllers fetch with their own key, and only their own: a user token, or another id, is refused.
    m1 = cluster.controller_ids[0]
    path = f"/api/controllers/{m1}/model-files/{digest}"
    ok = await cluster.hub.get(path, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.content == b"tiny model"
    assert (await cluster.hub.get(path)).status_code == 401
    # Users may not delete another's files: to them it is not there to delete.
    alice = await cluster.user("alice")
    r = await cluster.hub.delete(f"/api/model-files/{digest}", headers=alice)
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_FILE_NOT_FOUND", r.text
    assert [f["digest"] for f in (await cluster.hub.get("/api/model-files")).json()] == [digest]
    # Mounts that normalise onto one path, or onto the kernel's trees or the root, are refused.
    for models in ([{"digest": digest, "mount": "/data//"}], [{"digest": digest, "mount": "/proc/self/x"}],
                   [{"digest": digest, "mount": "/sys/x"}], [{"digest": digest, "mount": "/dev/shm/x"}]):
        r = await cluster.hub.post("/api/admin/repo/services",
                                   json={**SPEC, "name": "bad", "volumes": {"scratch": "/data"}, "models": models})
        assert r.status_code == 422, (models, r.text)
    # A digest or name with a trailing newline is not one.
    r = await cluster.hub.get(f"/api/model-files/{digest}%0A")
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_FILE_NOT_FOUND", r.text
    r = await upload(cluster, b"x", "name\n")
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_MODEL_FILE_NAME", r.text


async def test_a_migrate_that_would_leave_a_volume_behind_is_refused_unless_accepted(cluster: Cluster) -> None:
    m1, m2 = cluster.controller_ids
    service = (await cluster.hub.post("/api/admin/repo/services",
                                      json={**SPEC, "volumes": {"scratch": "/data"}})).json()
    [mount] = cluster.docker.containers.get(service["container_id"]).attrs["Mounts"]
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": m2})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "VOLUME_STAYS_BEHIND" and "'scratch'" in error["message"]
    assert error["details"] == {"volumes": ["scratch"], "controller_id": m1}
    assert [c.labels["mmanager.controller"] for c in cluster.containers(**{"mmanager.service": service["id"]})] == [m1]

    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate",
                               json={"target_controller": m2, "leave_volumes": True})
    assert r.status_code == 200 and r.json()["controller_id"] == m2, r.text
    [op] = (await cluster.hub.get("/api/admin/operations",
                                  params={"service_id": service["id"], "operation": "migrate"})).json()
    assert op["status"] == "succeeded" and op["details"]["volumes_left_behind"] == ["scratch"]
    assert (await cluster.hub.delete(f"/api/services/{service['id']}")).status_code == 204
    # The volume this test made (on the one Docker engine both controllers share).
    with contextlib.suppress(docker.errors.NotFound):
        cluster.docker.volumes.get(mount["Name"]).remove(force=True)


async def test_a_likely_failover_target_is_synced_ahead_of_need(cluster: Cluster, tmp_path: Path) -> None:
    """The seam of ``prefetch``: the hub has a controller fetch a spec's files now; a later create there finds them."""
    m1, m2 = cluster.controller_ids
    data = os.urandom(64 * 1024)
    digest = (await upload(cluster, data, "pre.bin")).json()["digest"]
    spec = ServiceSpec.model_validate({**SPEC, "models": [{"digest": digest, "mount": "/app/models/pre.bin"}]})
    url = f"http://{cluster.hosts[m2]}:8001"
    first = await presync(cluster.parts.client, m2, url, spec)
    assert first is not None and (first.fetched, first.cached, first.bytes) == ([digest], [], len(data))
    assert cache_files(tmp_path, "m2") == [digest.removeprefix("sha256:")] and cache_files(tmp_path, "m1") == []
    again = await presync(cluster.parts.client, m2, url, spec)
    assert again is not None and (again.fetched, again.cached) == ([], [digest])
    assert await presync(cluster.parts.client, m2, url, ServiceSpec.model_validate(SPEC)) is None
    async with httpx.AsyncClient(transport=cluster.router, base_url=url,
                                 headers={"Authorization": f"Bearer {KEY}"}) as controller:
        listed = (await controller.get("/models")).json()
    assert listed == {"cache_bytes": 4 * MAX_FILE, "used_bytes": len(data),
                      "files": [{"digest": digest, "bytes": len(data), "in_use": False}]}
    # A file the store lacks: the controller's refusal, with its code.
    missing = ServiceSpec.model_validate({**SPEC, "models": [{"digest": "sha256:" + "1" * 64, "mount": "/m"}]})
    with pytest.raises(ControllerRejected) as refused:
        await presync(cluster.parts.client, m2, url, missing)
    assert refused.value.code == "MODEL_SYNC_FAILED" and refused.value.status_code == 502


async def test_a_controller_that_cannot_sync_is_passed_over_and_none_left_fails_clearly(
        cluster: Cluster, tmp_path: Path) -> None:
    m1, m2 = cluster.controller_ids
    digest = (await upload(cluster, b"needed everywhere", "needed.bin")).json()["digest"]
    # m1's cache cannot be made (a file where its directory should be): its sync fails, m2 takes the service.
    (tmp_path / "cache-m1").write_text("not a directory")
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "models": [{"digest": digest}]})
    assert r.status_code == 201, r.text
    assert r.json()["controller_id"] == m2
    assert [c.labels["mmanager.controller"] for c in cluster.containers(**{"mmanager.service": r.json()["id"]})] == [m2]
    # With m2's cache broken too, no controller is left: the last refusal, and no service.
    (tmp_path / "cache-m2" / "sha256" / digest.removeprefix("sha256:")).unlink()
    (tmp_path / "cache-m2" / "sha256").rmdir()
    (tmp_path / "cache-m2" / "sha256").write_text("not a directory")
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "other",
                                                                 "models": [{"digest": digest}]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "MODEL_SYNC_FAILED", r.text
    assert "cannot be written" in r.json()["error"]["message"]
    assert [s["name"] for s in (await cluster.hub.get("/api/services")).json()] == ["weights"]


async def test_the_store_the_users_and_the_uploads_at_once_are_bounded(cluster: Cluster, tmp_path: Path) -> None:
    """No user fills the hub's disk: a store-wide limit (507), a per-user one (409) counted from the files they
    uploaded, and a cap on uploads at once (429); each refusal keeps nothing."""
    settings, store = cluster.parts.settings, cluster.parts.services.model_store
    settings.model_store_max_bytes, settings.model_files_per_user_bytes = 3000, 2000
    alice = await cluster.user("alice")
    assert (await upload(cluster, b"a" * 1500, headers=alice)).status_code == 201
    r = await upload(cluster, b"b" * 600, headers=alice)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "MODEL_FILE_QUOTA_EXCEEDED"), r.text
    assert r.json()["error"]["details"] == {"used_bytes": 1500, "limit_bytes": 2000}

    async def streamed(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start:start + 100]

    # Without a Content-Length too: refused as the stream passes what is left.
    r = await upload(cluster, streamed(b"c" * 600), headers=alice)  # type: ignore[arg-type]
    assert (r.status_code, r.json()["error"]["code"]) == (409, "MODEL_FILE_QUOTA_EXCEEDED"), r.text
    assert (await upload(cluster, b"d" * 1000)).status_code == 201  # the admin's own 1000
    r = await upload(cluster, b"e" * 600)
    assert (r.status_code, r.json()["error"]["code"]) == (507, "MODEL_STORE_FULL"), r.text
    assert sorted(f["size"] for f in (await cluster.hub.get("/api/model-files")).json()) == [1000, 1500]
    assert len(os.listdir(tmp_path / "store" / "sha256")) == 2 and os.listdir(tmp_path / "store" / "tmp") == []

    # One upload at a time on this replica: a second one while the first streams is 429, the first completes.
    settings.model_store_max_bytes = settings.model_files_per_user_bytes = 10**9
    store.max_uploads = 1
    flowing, finish = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"slow "
        flowing.set()
        await finish.wait()
        yield b"upload"

    first = asyncio.create_task(upload(cluster, slow()))  # type: ignore[arg-type]
    await flowing.wait()
    r = await upload(cluster, b"second")
    assert (r.status_code, r.json()["error"]["code"]) == (429, "TOO_MANY_UPLOADS"), r.text
    assert r.headers["Retry-After"]
    finish.set()
    assert (await first).status_code == 201
    store.max_uploads = 4
    # The same new bytes twice at once: one row, one 201 and one 200.
    same = os.urandom(4096)
    answers = await asyncio.gather(upload(cluster, same), upload(cluster, same))
    assert sorted(r.status_code for r in answers) == [200, 201], [r.text for r in answers]
    assert answers[0].json()["digest"] == answers[1].json()["digest"]


async def test_a_user_deletes_their_own_file_unless_a_spec_names_it(cluster: Cluster) -> None:
    alice, bob = await cluster.user("alice"), await cluster.user("bob")
    own = (await upload(cluster, b"alice's", "a.bin", headers=alice)).json()["digest"]
    kept = (await upload(cluster, b"alice's kept", "k.bin", headers=alice)).json()["digest"]
    assert (await cluster.hub.delete(f"/api/model-files/{own}", headers=bob)).status_code == 404
    assert (await cluster.hub.delete(f"/api/model-files/{own}", headers=alice)).status_code == 204
    assert (await cluster.hub.get(f"/api/model-files/{own}")).status_code == 404
    # Named only by a model type: kept, for the admin too.
    r = await cluster.hub.post("/api/admin/models", json={
        "name": "kept", "task": "embedding", "image": EXAMPLE_IMAGE,
        "spec": {"models": [{"digest": kept, "mount": "/app/models/k.bin"}]}})
    assert r.status_code == 201, r.text
    for who in (alice, {}):
        r = await cluster.hub.delete(f"/api/model-files/{kept}", headers=who)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "MODEL_FILE_IN_USE"), r.text
        assert r.json()["error"]["details"]["services"] == ["model type kept"]
    assert (await cluster.hub.delete("/api/admin/models/kept")).status_code == 204
    assert (await cluster.hub.delete(f"/api/model-files/{kept}")).status_code == 204


async def test_a_delete_waits_for_a_spec_being_written_and_then_sees_it(cluster: Cluster) -> None:
    """The race of a delete with a create or update naming the file: the spec's transaction holds the file's
    row (FOR SHARE) until it commits; the delete, which removes the row first, waits for it and then finds
    the spec (409), instead of removing a file a service is about to mount."""
    digest = (await upload(cluster, b"raced", "raced.bin")).json()["digest"]
    service = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    spec = ServiceSpec.model_validate({**SPEC, "models": [{"digest": digest, "mount": "/app/models/raced.bin"}]})
    db = cluster.db
    async with db.transaction() as tx:
        await lock_files(tx, spec, sqlite=False)
        await tx.execute(text("UPDATE model_services SET spec = CAST(:spec AS json) WHERE id = :id"),
                         {"spec": json.dumps(spec.model_dump(mode="json")), "id": service["id"]})
        deleting = asyncio.create_task(cluster.hub.delete(f"/api/model-files/{digest}"))

        async def waiting() -> bool:
            async with db.session() as session:
                return bool(await session.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'DELETE FROM model_files%'")))

        await eventually(waiting, 10, "the delete to wait on the spec's lock")
    r = await deleting
    assert (r.status_code, r.json()["error"]["code"]) == (409, "MODEL_FILE_IN_USE"), r.text
    assert (await cluster.hub.get(f"/api/model-files/{digest}")).status_code == 200
    # And the other way round: a spec written after the delete committed is refused, its file gone.
    async with db.session() as session:
        await session.execute(text("UPDATE model_services SET spec = CAST(:spec AS json) WHERE id = :id"),
                              {"spec": json.dumps(SPEC | {"name": service["name"]}), "id": service["id"]})
    assert (await cluster.hub.delete(f"/api/model-files/{digest}")).status_code == 204
    with pytest.raises(InvalidRequest) as refused:
        async with db.transaction() as tx:
            await lock_files(tx, spec, sqlite=False)
    assert refused.value.code == "MODEL_FILE_NOT_FOUND"


def test_a_hub_start_removes_only_temporary_files_older_than_the_grace(tmp_path: Path) -> None:
    """Replicas share tmp/: an old file is a dead replica's upload, a young one may be another's under way."""
    store = ModelStore(tmp_path / "store")
    store.tmp.mkdir(parents=True)
    old, young = store.tmp / "upload-old", store.tmp / "upload-young"
    old.write_bytes(b"cut short")
    young.write_bytes(b"streaming")
    os.utime(old, (1_000_000, 1_000_000))
    assert store.sweep(grace=3600) == 1
    assert sorted(os.listdir(store.tmp)) == ["upload-young"]
    assert ModelStore(tmp_path / "absent").sweep(grace=3600) == 0


async def test_a_prefetch_services_model_file_reaches_its_next_failover_target(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    """The pre-pull loop's pass prepares a ``prefetch`` service's next failover target: its model file is in
    that controller's cache before any failover, and the service stays where it runs."""
    m1, m2 = cluster.controller_ids
    data = os.urandom(48 * 1024)
    hexdigest = hashlib.sha256(data).hexdigest()
    digest = (await upload(cluster, data, "follow.bin")).json()["digest"]
    r = await cluster.hub.post("/api/admin/repo/services",
                               json={**SPEC, "prefetch": True, "models": [{"digest": digest}]})
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["controller_id"] == m1 and cache_files(tmp_path, "m2") == []
    hub = cluster.parts
    prefetcher = Prefetcher(hub.db, hub.settings, hub.client, hub.services.placement, hub.ingest.images, hub.metrics)
    await prefetcher.run_once()
    assert [(t.service_id, t.controller_id) for t in prefetcher.targets] == [(service["id"], m2)]
    await asyncio.gather(*prefetcher._running.values())
    assert cache_files(tmp_path, "m2") == [hexdigest]
    on = [c.labels["mmanager.controller"] for c in cluster.containers(**{"mmanager.service": service["id"]})]
    assert on == [m1]
    # A service without prefetch has nothing synced for it.
    other = (await upload(cluster, b"not followed", "other.bin")).json()["digest"]
    r = await cluster.hub.post("/api/admin/repo/services",
                               json={**SPEC, "name": "stays", "models": [{"digest": other}]})
    assert r.status_code == 201, r.text
    await prefetcher.run_once()
    await asyncio.gather(*prefetcher._running.values())
    assert other.removeprefix("sha256:") not in cache_files(tmp_path, "m2")
