"""A service's registry credentials, against a real registry on 127.0.0.1 that needs a login (Debian's
``docker-registry`` with htpasswd), through the hub, on the real Docker engine: a create, an update and a
move pull with them; without them or with wrong ones the pull fails naming the image and the registry's
answer; and the password shows in no API answer, no log line and no database row."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from examples.images import EXAMPLE_IMAGE
from hub.schemas import RegistryAuthIn
from hub.services import registry_auth
from tests.hub.conftest import Cluster
from tests.support.registry import push, serve_registry

USER = "lab"
PASSWORD = "pw-" + uuid.uuid4().hex  # planted: searched for everywhere at the end
SPEC = {"ports": {"5000": None}, "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"}}


@pytest.fixture
def private(tmp_path: Path, docker_client: docker.DockerClient, example_image: str) -> Iterator[list[str]]:
    """Two tags of the example image in a registry that needs ``USER``'s login; the local tags removed."""
    with serve_registry(tmp_path, {USER: PASSWORD}) as registry:
        auth = {"username": USER, "password": PASSWORD}
        run = uuid.uuid4().hex[:8]
        pushed = [push(docker_client, example_image, f"{registry}/lab/private", f"{run}-{n}", auth) for n in (1, 2)]
        try:
            yield pushed
        finally:
            for reference in pushed:
                with contextlib.suppress(docker.errors.ImageNotFound):
                    docker_client.images.remove(reference, force=True)


def _refused(r: Any, image: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "IMAGE_PULL_FAILED", error
    assert image in error["message"] and error["details"]["image"] == image
    said = error["details"]["registry"]
    assert "no basic auth credentials" in said or "authentication required" in said, said


async def test_a_login_registry_pulls_with_the_services_credentials(
    cluster: Cluster, private: list[str], docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first, second = private
    hub = cluster.hub
    # No credentials, then wrong ones: refused, naming the image and what the registry said; nothing made.
    _refused(await hub.post("/api/admin/repo/services", json={**SPEC, "name": "anon", "image": first}), first)
    wrong = {"username": USER, "password": "not-" + PASSWORD}
    _refused(await hub.post("/api/admin/repo/services",
                            json={**SPEC, "name": "wrong", "image": first, "registry_auth": wrong}), first)
    assert cluster.containers() == []
    assert (await hub.get("/api/services")).json() == []

    # The right ones: pulled and running. The answer has no trace of them.
    right = {"username": USER, "password": PASSWORD}
    r = await hub.post("/api/admin/repo/services", json={**SPEC, "name": "private", "image": first,
                                                        "registry_auth": right})
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["status"] == "running" and "registry_auth" not in service["spec"]
    assert first in docker_client.images.get(first).tags
    [op] = (await hub.get("/api/admin/operations", params={"service_id": service["id"]})).json()
    assert op["details"]["image_pull"]["image"] == first

    # An update to a second tag with wrong credentials fails its pull and changes nothing: the stored
    # credentials stay, and so does the running copy.
    r = await hub.patch(f"/api/services/{service['id']}", json={"image": second, "registry_auth": wrong})
    _refused(r, second)
    after = (await hub.get(f"/api/services/{service['id']}")).json()
    assert (after["spec"]["image"], after["container_id"]) == (first, service["container_id"])
    # An image on another registry (the same one by another name is another host to Docker) without new
    # credentials: refused, nothing changes; the stored ones are never sent there.
    elsewhere = second.replace("127.0.0.1:", "localhost:", 1)
    r = await hub.patch(f"/api/services/{service['id']}", json={"image": elsewhere})
    assert r.status_code == 422 and r.json()["error"]["code"] == "REGISTRY_AUTH_HOST_MISMATCH", r.text
    assert (await hub.get(f"/api/services/{service['id']}")).json()["spec"]["image"] == first
    # With no new credentials the stored (right) ones pull it.
    r = await hub.patch(f"/api/services/{service['id']}", json={"image": second})
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["image"] == second and r.json()["status"] == "running"

    # A move recreates the container elsewhere: with the image's tag gone from the engine, it pulls again,
    # with the stored credentials.
    docker_client.images.remove(second, force=True)
    [entry] = (await hub.get("/api/admin/containers")).json()
    r = await hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    assert r.status_code == 200, r.text
    assert r.json()["controller_id"] != entry["controller_id"]
    assert second in docker_client.images.get(second).tags

    # Cleared: the next pull has no login, and the registry refuses it (a move that needs a pull fails).
    r = await hub.patch(f"/api/services/{service['id']}", json={"registry_auth": None})
    assert r.status_code == 200, r.text
    docker_client.images.remove(second, force=True)
    [entry] = (await hub.get("/api/admin/containers")).json()
    _refused(await hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={}), second)
    # Set again alone (no new container): the move pulls once more.
    r = await hub.patch(f"/api/services/{service['id']}", json={"registry_auth": right})
    assert r.status_code == 200, r.text
    r = await hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    assert r.status_code == 200, r.text

    # Nowhere in clear: every answer about the service, the hub's logs and every row of the database.
    sid = service["id"]
    answers = [await hub.get(path) for path in (
        f"/api/services/{sid}", "/api/services", f"/api/services/{sid}/status", f"/api/services/{sid}/history",
        f"/api/admin/operations?service_id={sid}", "/api/admin/audit?limit=1000", "/api/admin/containers")]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert PASSWORD not in answer.text
    # The service, its status and its history show no credentials at all (operations say set or cleared).
    assert not any("registry_auth" in answer.text for answer in answers[:4])
    changes = [(op["status"], op["details"].get("registry_auth")) for op in answers[4].json()
               if op["operation"] == "update"]
    # Newest first: set alone, cleared alone, the image's update with none, the refused one with wrong ones.
    assert changes == [("succeeded", "set"), ("succeeded", "cleared"), ("succeeded", None), ("failed", "set")]
    assert PASSWORD not in caplog.text
    async with cluster.db.session() as session:
        tables = (await session.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))).scalars().all()
        rows: list[str] = []
        for table in tables:
            rows += (await session.execute(text(f'SELECT t::text FROM "{table}" t'))).scalars()
        dump = "\n".join(rows)
        sealed = (await session.execute(text("SELECT registry_auth_sealed FROM model_services WHERE id = :id"),
                                        {"id": sid})).scalar_one()
    assert "model_services" in tables and "audit_log" in tables
    assert PASSWORD not in dump
    assert sealed and PASSWORD not in sealed


async def test_registry_auth_needs_a_hub_key(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hub key a spec with credentials is refused (409 HUB_KEY_MISSING) and nothing is made."""
    monkeypatch.setitem(vars(cluster.parts.settings), "sealer", None)
    auth = {"username": USER, "password": PASSWORD}
    r = await cluster.hub.post("/api/admin/repo/services",
                               json={**SPEC, "name": "nokey", "image": "example", "registry_auth": auth})
    assert r.status_code == 409 and r.json()["error"]["code"] == "HUB_KEY_MISSING", r.text
    assert PASSWORD not in r.text
    assert (await cluster.hub.get("/api/services")).json() == []
    # A credentials field that is not {username, password}: 422, without echoing the password.
    r = await cluster.hub.post("/api/admin/repo/services", json={
        **SPEC, "name": "bad", "image": "example", "registry_auth": {"user": USER, "password": PASSWORD}})
    assert r.status_code == 422 and PASSWORD not in r.text, r.text


async def _sealed(cluster: Cluster, service_id: str) -> str | None:
    async with cluster.db.session() as session:
        return (await session.execute(text("SELECT registry_auth_sealed FROM model_services WHERE id = :id"),
                                      {"id": service_id})).scalar_one()


def _unsettled(cluster: Cluster) -> set[Any]:
    """The placement's reservations not yet made good by a create (what a failed create must give back)."""
    return {held for held in cluster.parts.services.placement._held if held.committed_at is None}


async def test_credentials_that_are_not_text_leak_nowhere_and_hold_nothing(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password with a lone surrogate is refused (422, not echoed); one stored so before that check
    existed is logged as unusable, never quoted, and the move goes on without it. A create that fails
    on anything, not only a refusal, gives its placement back and leaves no row."""
    caplog.set_level(logging.DEBUG)
    hub = cluster.hub
    odd = "\ud800" + PASSWORD
    for field in ("password", "username"):
        auth = {"username": USER, "password": PASSWORD, field: odd}
        # As JSON escapes it (ASCII): the text a client sends.
        body = json.dumps({**SPEC, "name": "odd", "image": EXAMPLE_IMAGE, "registry_auth": auth})
        r = await hub.post("/api/admin/repo/services", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and PASSWORD not in r.text, r.text
        [problem] = r.json()["error"]["details"]
        assert problem["loc"][-2:] == ["registry_auth", field], problem
    assert (await hub.get("/api/services")).json() == []

    r = await hub.post("/api/admin/repo/services", json={**SPEC, "name": "plain", "image": EXAMPLE_IMAGE})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    stored = registry_auth.seal(cluster.parts.settings.sealer, RegistryAuthIn.model_construct(
        username=USER, password=SecretStr(odd)), sid, EXAMPLE_IMAGE)
    async with cluster.db.session() as session:
        await session.execute(text("UPDATE model_services SET registry_auth_sealed = :s WHERE id = :id"),
                              {"s": stored, "id": sid})
        await session.commit()
    [entry] = (await hub.get("/api/admin/containers")).json()
    r = await hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    assert r.status_code == 200, r.text
    assert "not valid credentials" in caplog.text
    operations = (await hub.get("/api/admin/operations", params={"service_id": sid})).json()
    assert PASSWORD not in str(operations) and PASSWORD not in caplog.text
    assert not _unsettled(cluster)

    # Whatever fails a create (here a bug), its reservation and its registry row go.
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cluster.parts.services._mover.deployer, "container_config", broken)
    [entry] = (await hub.get("/api/admin/containers")).json()
    with pytest.raises(RuntimeError, match="a bug"):  # the in-process client passes the hub's 500 on so
        await hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    assert not _unsettled(cluster)
    assert [row["id"] for row in (await hub.get("/api/admin/containers")).json()] == [entry["id"]]


async def test_a_refused_change_keeps_the_credentials_and_they_stay_with_their_registry(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH refused (here by the quota) changes nothing, its credentials neither; an image on another
    registry than the stored credentials' is refused without new ones (they are never sent there)."""
    bob = await cluster.user("bob")
    hub = cluster.hub
    right = {"username": USER, "password": PASSWORD}
    r = await hub.post("/api/bob/repo/services", headers=bob,
                       json={**SPEC, "name": "quota", "image": EXAMPLE_IMAGE, "registry_auth": right})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    before = await _sealed(cluster, sid)
    assert before is not None

    monkeypatch.setitem(vars(cluster.parts.settings), "max_services_per_user", 1)
    r = await hub.patch(f"/api/services/{sid}", headers=bob,
                        json={"replicas": 2, "registry_auth": {"username": USER, "password": "new-" + PASSWORD}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "QUOTA_EXCEEDED", r.text
    assert await _sealed(cluster, sid) == before
    [scale] = [op for op in (await hub.get("/api/admin/operations", params={"service_id": sid})).json()
               if op["operation"] == "scale"]
    assert scale["status"] == "failed" and scale["details"]["registry_auth"] == "set"

    elsewhere = "registry.example:5000/lab/private:1"
    r = await hub.patch(f"/api/services/{sid}", headers=bob, json={"image": elsewhere})
    assert r.status_code == 422 and r.json()["error"]["code"] == "REGISTRY_AUTH_HOST_MISMATCH", r.text
    assert r.json()["error"]["details"]["registry"] == "registry.example:5000" and PASSWORD not in r.text
    after = (await hub.get(f"/api/services/{sid}", headers=bob)).json()
    assert after["spec"]["image"] == EXAMPLE_IMAGE and await _sealed(cluster, sid) == before
    # Alone, the credentials make an update of their own that says so.
    r = await hub.patch(f"/api/services/{sid}", headers=bob, json={"registry_auth": None})
    assert r.status_code == 200, r.text
    assert await _sealed(cluster, sid) is None
    updates = [op["details"] for op in (await hub.get("/api/admin/operations", params={"service_id": sid})).json()
               if op["operation"] == "update"]
    assert updates == [{"registry_auth": "cleared"}]
