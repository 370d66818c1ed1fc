"""A spec's secrets through the hub, on real controllers and the real Docker engine: they reach every
container the service runs (a create, a scale, an update, a rollback, a migrate) as environment variables,
and a planted value shows in no API answer, no log line at DEBUG and no byte of ``pg_dump``'s dump of the
database; bad names, a clash with ``env`` and a hub without a key are refused and make nothing."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from examples.images import EXAMPLE_IMAGE
from hub.config import HubSettings
from hub.sealing import Sealer
from mmanager.cli import app as cli
from mmanager.wire import LABEL_SERVICE
from tests.hub.conftest import HUB_KEY, Cluster
from tests.support.pg import _bin

# Planted: searched for everywhere at the end.
SECRET = "planted-" + uuid.uuid4().hex
OTHER = "planted-" + uuid.uuid4().hex
SPEC = {"image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"}}


def _env(cluster: Cluster, service_id: str) -> list[dict[str, str]]:
    """The environment Docker holds for each container of the service."""
    found = []
    for container in cluster.containers(**{LABEL_SERVICE: service_id}):
        if container.status != "running":
            continue
        found.append(dict(item.partition("=")[::2] for item in container.attrs["Config"]["Env"]))
    return found


async def test_secrets_reach_the_containers_and_nothing_else(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub = cluster.hub
    alice = await cluster.user("alice")
    answers: list[Any] = []

    async def call(method: str, path: str, **kw: Any) -> Any:
        r = await hub.request(method, path, **{"headers": alice, **kw})
        answers.append(r)
        return r

    # Refused, quoting no value, and nothing made: a name that is not an environment variable's, a clash
    # with env (of the spec, or of its CPU fallback), a value no environment can hold.
    for secrets, env, kind in (({"1BAD": SECRET}, {}, "secret_name_invalid"),
                               ({SECRET: "x"}, {}, "secret_name_invalid"),
                               # A value pasted where its name goes, and no value: reported by position.
                               ({SECRET: None}, {}, "secret_name_invalid"),
                               ({"DB_PASSWORD": 5}, {}, "secret_value_invalid"),
                               ({"DB_PASSWORD": SECRET + "\x00"}, {}, "secret_value_invalid")):
        r = await call("POST", "/api/alice/r/services", json={**SPEC, "name": "bad", "env": env, "secrets": secrets})
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR", r.text
        assert r.json()["error"]["details"][0]["type"] == kind
    r = await call("POST", "/api/alice/r/services",
                   json={**SPEC, "name": "bad", "env": {"DB_PASSWORD": "x"}, "secrets": {"DB_PASSWORD": SECRET}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "SECRETS_ENV_CLASH", r.text
    assert r.json()["error"]["details"] == {"names": ["DB_PASSWORD"]}
    # A variable the spec policy keeps to the controller is refused as a secret too, before anything is made.
    r = await call("POST", "/api/alice/r/services",
                   json={**SPEC, "name": "bad", "secrets": {"NVIDIA_VISIBLE_DEVICES": SECRET}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "SPEC_FORBIDDEN", r.text
    assert r.json()["error"]["details"] == {"field": "secrets.NVIDIA_VISIBLE_DEVICES", "rule": "gpu_environment"}
    assert (await call("GET", "/api/services")).json() == []

    # Made: the container has them; the answer shows no trace of them.
    r = await call("POST", "/api/alice/r/services",
                   json={**SPEC, "name": "svc", "env": {"PLAIN": "1"}, "secrets": {"DB_PASSWORD": SECRET}})
    assert r.status_code == 201, r.text
    service = r.json()
    sid = service["id"]
    assert "secrets" not in service["spec"] and "secrets" not in r.text
    [env] = _env(cluster, sid)
    assert env["DB_PASSWORD"] == SECRET and env["PLAIN"] == "1"

    # A new env that names a secret: refused, nothing changes.
    r = await call("PATCH", f"/api/services/{sid}", json={"env": {"DB_PASSWORD": "x"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "SECRETS_ENV_CLASH", r.text

    # A scale-up: the new replica has them too.
    r = await call("PATCH", f"/api/services/{sid}", json={"replicas": 2})
    assert r.status_code == 200, r.text
    assert [e["DB_PASSWORD"] for e in _env(cluster, sid)] == [SECRET, SECRET]

    # Replaced: a new version, rolled over both replicas. Given again as they are: nothing happens.
    r = await call("PATCH", f"/api/services/{sid}", json={"secrets": {"DB_PASSWORD": OTHER, "API_KEY": SECRET}})
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    envs = _env(cluster, sid)
    assert len(envs) == 2 and all((e["DB_PASSWORD"], e["API_KEY"]) == (OTHER, SECRET) for e in envs)
    r = await call("PATCH", f"/api/services/{sid}", json={"secrets": {"DB_PASSWORD": OTHER, "API_KEY": SECRET}})
    assert r.status_code == 200 and r.json()["version"] == 2, r.text

    # A rollback runs version 1's spec with the current secrets (the history holds none).
    r = await call("POST", f"/api/services/{sid}/rollback", json={"version": 1})
    assert r.status_code == 200, r.text
    assert all((e["DB_PASSWORD"], e["API_KEY"]) == (OTHER, SECRET) for e in _env(cluster, sid))

    # A migrate (an admin's move of one replica) makes its new container with them.
    entry = next(c for c in (await hub.get("/api/admin/containers")).json() if c["service_id"] == sid)
    r = await hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    answers.append(r)
    assert r.status_code == 200, r.text
    assert all((e["DB_PASSWORD"], e["API_KEY"]) == (OTHER, SECRET) for e in _env(cluster, sid))

    # Cleared: a new version without them.
    r = await call("PATCH", f"/api/services/{sid}", json={"secrets": None})
    assert r.status_code == 200, r.text
    envs = _env(cluster, sid)
    assert len(envs) == 2 and not any("DB_PASSWORD" in e or "API_KEY" in e for e in envs)
    # Set again, for the dump below, one of them named as version 1's env had a variable.
    r = await call("PATCH", f"/api/services/{sid}", json={"env": {}, "secrets": {"DB_PASSWORD": SECRET, "PLAIN": OTHER}})
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    # So a rollback to version 1 would give PLAIN twice: refused, nothing changes.
    r = await call("POST", f"/api/services/{sid}/rollback", json={"version": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "SECRETS_ENV_CLASH", r.text
    assert (await call("GET", f"/api/services/{sid}")).json()["version"] == version

    # Nowhere in clear: every answer about the service, as its owner and as an admin, and the audit log.
    for path in (f"/api/services/{sid}", "/api/services", f"/api/services/{sid}/status",
                 f"/api/services/{sid}/history", "/api/operations", "/api/audit"):
        assert (await call("GET", path)).status_code == 200
    for path in (f"/api/admin/operations?service_id={sid}", "/api/admin/audit?limit=1000",
                 "/api/admin/containers", "/api/gateway/routes"):
        r = await hub.get(path)
        assert r.status_code == 200, (path, r.text)
        answers.append(r)
    for answer in answers:
        assert SECRET not in answer.text and OTHER not in answer.text, (answer.request.url, answer.text)
    # The operations that changed them say so, with the names only.
    said = [op["details"].get("secrets") for op in (await hub.get(f"/api/admin/operations?service_id={sid}")).json()
            if op["operation"] == "update" and op["status"] == "succeeded"]
    assert said[:2] == [{"set": ["DB_PASSWORD", "PLAIN"]}, "cleared"] and {"set": ["DB_PASSWORD", "API_KEY"]} in said
    assert SECRET not in caplog.text and OTHER not in caplog.text
    dump = subprocess.run([_bin("pg_dump"), "-d", cluster.db.url.replace("postgresql+asyncpg://", "postgresql://")],
                          check=True, capture_output=True).stdout
    assert b"model_services" in dump and b"secrets_sealed" in dump
    assert SECRET.encode() not in dump and OTHER.encode() not in dump


async def test_secrets_need_a_hub_key(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hub key a spec with secrets is refused (409 HUB_KEY_MISSING) and nothing is made; a
    service whose secrets this hub cannot open gets no container without them (409 SECRETS_UNAVAILABLE)."""
    hub = cluster.hub
    r = await hub.post("/api/admin/r/services", json={**SPEC, "name": "svc", "secrets": {"TOKEN": SECRET}})
    assert r.status_code == 201, r.text
    monkeypatch.setitem(vars(cluster.parts.settings), "sealer", None)
    r = await hub.post("/api/admin/r/services", json={**SPEC, "name": "nokey", "secrets": {"TOKEN": SECRET}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "HUB_KEY_MISSING", r.text
    assert SECRET not in r.text
    [made] = (await hub.get("/api/services")).json()
    r = await hub.post(f"/api/services/{made['id']}/migrate", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "SECRETS_UNAVAILABLE", r.text
    [env] = _env(cluster, made["id"])
    assert env["TOKEN"] == SECRET  # the copy it had keeps running


async def test_the_hub_key_rotates_while_the_hub_serves(cluster: Cluster) -> None:
    """docs/OPERATIONS.md, Rotating the hub key: the hub runs with the new key and the old one as previous,
    ``mmanager hub-key rotate`` seals every stored value again under the new key, and the old key can then
    go: the services' containers are still made with their secrets and credentials."""
    hub = cluster.hub
    old = cluster.parts.settings.sealer
    auth = {"username": "lab", "password": OTHER}
    made = []
    for name in ("one", "two"):
        r = await hub.post("/api/admin/r/services",
                           json={**SPEC, "name": name, "secrets": {"TOKEN": SECRET}, "registry_auth": auth})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    r = await hub.post("/api/admin/r/services", json={**SPEC, "name": "plain"})
    assert r.status_code == 201, r.text
    stranger = Sealer(os.urandom(32)).seal("x")  # a value no key of this hub opens
    async with cluster.db.session() as session:
        await session.execute(text("UPDATE model_services SET registry_auth_sealed = :v WHERE name = 'plain'"),
                              {"v": f"docker.io {stranger}"})

    new_key = base64.b64encode(os.urandom(32)).decode()
    env = {"MMANAGER_DATABASE_URL": cluster.db.url, "MMANAGER_HUB_KEY": new_key,
           "MMANAGER_HUB_KEY_PREVIOUS": HUB_KEY}
    # The hub restarted with the new key and the old one as previous (its settings' sealer, as it builds it).
    during = HubSettings(dev_mode=True, hub_key=new_key, hub_key_previous=HUB_KEY).sealer
    assert during is not None and old is not None
    cluster.parts.settings.sealer = during
    done = await asyncio.to_thread(CliRunner().invoke, cli, ["hub-key", "rotate"], env=env)
    # The value no key opens is named and left as it is; the rest sealed again.
    assert done.exit_code == 1, done.output
    assert f"hub key {during.key_id}: 4 sealed value(s) sealed again, 0 already under it" in done.output
    assert "registry_auth_sealed" in done.output and "1 value(s) did not open" in done.output
    assert SECRET not in done.output and OTHER not in done.output
    async with cluster.db.session() as session:
        rows = (await session.execute(text(
            "SELECT id, registry_auth_sealed, secrets_sealed FROM model_services WHERE name <> 'plain'"))).all()
        await session.execute(text("UPDATE model_services SET registry_auth_sealed = NULL WHERE name = 'plain'"))
    for _, auth_sealed, secrets_sealed in rows:
        assert Sealer.sealed_key_id(auth_sealed.partition(" ")[2]) == during.key_id
        assert Sealer.sealed_key_id(secrets_sealed.partition(" ")[2]) == during.key_id
    again = await asyncio.to_thread(CliRunner().invoke, cli, ["hub-key", "rotate"], env=env)
    assert again.exit_code == 0 and "0 sealed value(s) sealed again, 4 already under it" in again.output, again.output

    # The previous key dropped: the new key alone opens everything, and a move makes the container with them.
    cluster.parts.settings.sealer = HubSettings(dev_mode=True, hub_key=new_key).sealer
    r = await hub.post(f"/api/services/{made[0]}/migrate", json={})
    assert r.status_code == 200, r.text
    [moved] = _env(cluster, made[0])
    assert moved["TOKEN"] == SECRET
    # Without the new key (the old one only), the rotated values no longer open.
    cluster.parts.settings.sealer = old
    r = await hub.post(f"/api/services/{made[1]}/migrate", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "SECRETS_UNAVAILABLE", r.text
