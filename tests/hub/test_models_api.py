"""The model catalog on real PostgreSQL: admins write model types, any user reads them, and a create that
names one gets every spec field it leaves out, with real controllers on the real Docker engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from typer.testing import CliRunner

from examples.images import EXAMPLE_IMAGE
from hub.db import Database
from hub.models import ModelTypeModel, ServiceModel
from hub.schemas import ServiceCreate
from hub.services.catalog import model_spec
from mmanager.cli import app as cli
from tests.conftest import emptied
from tests.hub.conftest import Cluster

REFERENCE_CATALOG = Path(__file__).parents[2] / "modelserver" / "catalog.json"

TYPE: dict[str, Any] = {
    "name": "dnabert2",
    "task": "classification",
    "description": "promoter or not, DNABERT2-style",
    "image": EXAMPLE_IMAGE,
    "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"},
    "replicas": 1,
    "ports": {"5000": None},
    "health_check": {"path": "/health", "port": 5000, "interval": 5},
    "environment": {"MODEL_TYPE": "dnabert2", "LOG_LEVEL": "info"},
    "probe": {"path": "/predict", "body": {"sequence": "ACGT"}, "expect": {"success": True}, "tolerance": 0.001},
}


async def stored(cluster: Cluster) -> list[tuple[str, str]]:
    """Each stored type's name and image."""
    async with cluster.db.session() as session:
        return [(r.name, r.image) for r in await session.scalars(select(ModelTypeModel).order_by(ModelTypeModel.name))]


async def services(cluster: Cluster) -> int:
    async with cluster.db.session() as session:
        return await session.scalar(select(func.count()).select_from(ServiceModel)) or 0


async def test_admins_write_types_and_every_user_reads_them(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    assert (await cluster.hub.get("/api/models", headers=alice)).json() == []

    created = await cluster.hub.post("/api/admin/models", json=TYPE)
    assert created.status_code == 201, created.text
    body = created.json()
    assert {k: body[k] for k in TYPE} == {**TYPE, "resources": {**TYPE["resources"], "gpu_required": False,
                                                                "gpu_count": 0},
                                          "health_check": {**TYPE["health_check"], "timeout": 3.0,
                                                           "failure_threshold": 3, "start_period": 30.0}}
    assert body["spec"] == {}
    other = {**TYPE, "name": "lucaone", "task": "embedding", "spec": {"labels": {"team": "genomics"}}}
    assert (await cluster.hub.post("/api/admin/models", json=other)).status_code == 201

    listed = (await cluster.hub.get("/api/models", headers=alice)).json()
    assert [t["name"] for t in listed] == ["dnabert2", "lucaone"]
    assert listed[1]["spec"] == {"labels": {"team": "genomics"}}
    assert [t["name"] for t in (await cluster.hub.get("/api/models?limit=1&offset=1", headers=alice)).json()] \
        == ["lucaone"]
    one = await cluster.hub.get("/api/models/dnabert2", headers=alice)
    assert one.status_code == 200 and one.json() == body

    # A user who is not an admin writes nothing; nobody reads without a token.
    for method, path, payload in [("POST", "/api/admin/models", {**TYPE, "name": "evo2"}),
                                  ("PUT", "/api/admin/models/dnabert2", {**TYPE, "image": "evil:latest"}),
                                  ("DELETE", "/api/admin/models/dnabert2", None)]:
        refused = await cluster.hub.request(method, path, json=payload, headers=alice)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "ADMIN_REQUIRED", refused.text
    assert (await cluster.hub.get("/api/models", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert await stored(cluster) == [("dnabert2", EXAMPLE_IMAGE), ("lucaone", EXAMPLE_IMAGE)]

    # Replaced whole: what the new body leaves out is the default again.
    replaced = await cluster.hub.put("/api/admin/models/dnabert2", json={**TYPE, "image": "other:1", "replicas": 2,
                                                                         "environment": {}, "probe": None})
    assert replaced.status_code == 200, replaced.text
    after = replaced.json()
    assert (after["image"], after["replicas"], after["environment"], after["probe"]) == ("other:1", 2, {}, None)
    assert after["created_at"] == body["created_at"] and after["updated_at"] > body["updated_at"]

    assert (await cluster.hub.delete("/api/admin/models/lucaone")).status_code == 204
    assert await stored(cluster) == [("dnabert2", "other:1")]
    gone = await cluster.hub.get("/api/models/lucaone", headers=alice)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "MODEL_NOT_FOUND"

    # Each admin write is in the audit log, with the type's name as its target.
    audit = (await cluster.hub.get("/api/admin/audit", params={"actor": "admin", "limit": 1000})).json()
    writes = sorted((e["method"], e["status_code"], e["target"]) for e in audit if "/models" in e["path"])
    assert writes == [("DELETE", 204, "lucaone"), ("POST", 201, "dnabert2"), ("POST", 201, "lucaone"),
                      ("PUT", 200, "dnabert2")]


async def test_bad_types_are_refused_with_a_code_and_change_nothing(cluster: Cluster) -> None:
    assert (await cluster.hub.post("/api/admin/models", json=TYPE)).status_code == 201
    before = await stored(cluster)
    cases = [
        ({**TYPE}, 409, "MODEL_EXISTS"),
        ({**TYPE, "name": "bad name"}, 422, "VALIDATION_ERROR"),
        ({**TYPE, "name": "x", "image": ""}, 422, "VALIDATION_ERROR"),
        ({**TYPE, "name": "x", "replicas": 0}, 422, "VALIDATION_ERROR"),
        ({**TYPE, "name": "x", "ports": {"http": None}}, 422, "VALIDATION_ERROR"),
        ({**TYPE, "name": "x", "probe": [1, 2]}, 422, "VALIDATION_ERROR"),
        ({**TYPE, "name": "x", "probe": {**TYPE["probe"], "path": "predict"}}, 422, "VALIDATION_ERROR"),
        ({**TYPE, "name": "x", "health_check": None}, 422, "PROBE_NEEDS_HEALTH_CHECK"),
        ({**TYPE, "name": "x", "gpu": True}, 422, "VALIDATION_ERROR"),
        ({k: v for k, v in TYPE.items() if k != "task"} | {"name": "x"}, 422, "VALIDATION_ERROR"),
        # What only the service spec knows: the type could not make a valid service.
        ({**TYPE, "name": "x", "spec": {"restart_policy": "sometimes"}}, 422, "INVALID_MODEL_TYPE"),
        ({**TYPE, "name": "x", "spec": {"no_such_field": 1}}, 422, "INVALID_MODEL_TYPE"),
        ({**TYPE, "name": "x", "spec": {"image": "elsewhere:1"}}, 422, "INVALID_MODEL_TYPE"),
        # Credentials are each service's, given with its create: a type is stored and shown in clear.
        ({**TYPE, "name": "x", "spec": {"registry_auth": {"username": "u", "password": "p"}}}, 422,
         "INVALID_MODEL_TYPE"),
        # And what the spec policy refuses for any service.
        ({**TYPE, "name": "x", "spec": {"volumes": {"/etc": "/host-etc"}}}, 403, "SPEC_FORBIDDEN"),
    ]
    for body, status, code in cases:
        r = await cluster.hub.post("/api/admin/models", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    for path, body, status, code in [
        ("/api/admin/models/dnabert2", {**TYPE, "name": "renamed"}, 422, "NAME_MISMATCH"),
        ("/api/admin/models/dnabert2", {**TYPE, "spec": {"restart_policy": "sometimes"}}, 422, "INVALID_MODEL_TYPE"),
        ("/api/admin/models/nope", {**TYPE, "name": "nope"}, 404, "MODEL_NOT_FOUND"),
    ]:
        r = await cluster.hub.put(path, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    r = await cluster.hub.delete("/api/admin/models/nope")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "MODEL_NOT_FOUND")
    assert await stored(cluster) == before


async def test_a_create_from_a_type_gets_what_it_leaves_out(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    # No probe: the example image has no model to ask (a create waits for the probe's verdict).
    assert (await cluster.hub.post("/api/admin/models", json={**TYPE, "probe": None})).status_code == 201

    created = await cluster.hub.post("/api/alice/genomics/services", headers=alice, json={
        "name": "promoters", "model": "dnabert2", "env": {"LOG_LEVEL": "debug", "EXTRA": "1"},
        "resources": {"cpu_limit": 0.25, "memory_limit": "32MB"}})
    assert created.status_code == 201, created.text
    service = created.json()
    spec = service["spec"]
    assert spec["model"] == "dnabert2" and spec["name"] == "promoters"
    assert (spec["image"], spec["ports"], spec["replicas"]) == (EXAMPLE_IMAGE, {"5000": None}, 1)
    assert spec["health_check"]["port"] == 5000
    # The request's fields win: resources whole, environment variable by variable.
    assert spec["resources"]["memory_limit"] == "32MB" and spec["resources"]["cpu_limit"] == 0.25
    assert spec["env"] == {"MODEL_TYPE": "dnabert2", "LOG_LEVEL": "debug", "EXTRA": "1"}
    assert service["status"] == "running"
    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    assert "MODEL_TYPE=dnabert2" in container.attrs["Config"]["Env"]
    assert container.attrs["HostConfig"]["Memory"] == 32 * 1024**2
    read = (await cluster.hub.get(f"/api/services/{service['id']}", headers=alice)).json()
    assert read["spec"]["model"] == "dnabert2"

    # The type's probe is the spec's too (asked of the catalog alone: the example image has no model).
    assert (await cluster.hub.post("/api/admin/models", json={**TYPE, "name": "probed"})).status_code == 201
    probed = await model_spec(cluster.db, ServiceCreate(name="x", model="probed"))
    assert probed.probe is not None and probed.probe.model_dump() == TYPE["probe"]
    assert (probed.image, probed.env) == (EXAMPLE_IMAGE, TYPE["environment"])

    # An unknown type, or a merge that is no valid spec, writes nothing.
    for body, status, code in [
        ({"name": "x", "model": "nope"}, 404, "MODEL_NOT_FOUND"),
        ({"name": "x"}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "model": "dnabert2", "health_check": {"port": 5000, "path": "no-slash"}}, 422,
         "VALIDATION_ERROR"),
    ]:
        r = await cluster.hub.post("/api/alice/genomics/services", headers=alice, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    assert await services(cluster) == 1

    # Deleting the type deletes only the type: the service keeps its spec, and its updates keep the name.
    assert (await cluster.hub.delete("/api/admin/models/dnabert2")).status_code == 204
    kept = await cluster.hub.get(f"/api/services/{service['id']}", headers=alice)
    assert kept.status_code == 200 and kept.json()["spec"] == spec
    patched = await cluster.hub.patch(f"/api/services/{service['id']}", headers=alice,
                                      json={"env": {"MODEL_TYPE": "dnabert2"}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["spec"]["model"] == "dnabert2" and patched.json()["version"] == 2


def test_the_cli_registers_a_catalog_file_all_or_none(db: Database, tmp_path: Path) -> None:
    """``mmanager models register -f``: modelserver/catalog.json's shape, created then replaced; a file with
    one bad type registers none of it."""
    runner = CliRunner()
    pg_url = db.url
    env = {"MMANAGER_DATABASE_URL": pg_url}
    reference = runner.invoke(cli, ["models", "register", "-f", str(REFERENCE_CATALOG)], env=env)
    assert reference.exit_code == 0, reference.output
    names = [t["name"] for t in json.loads(REFERENCE_CATALOG.read_text())]
    assert all(f"created model type {name}" in reference.output for name in names)

    async def empty() -> None:
        await (await emptied(Database(pg_url))).dispose()

    asyncio.run(empty())
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([TYPE, {**TYPE, "name": "lucaone", "task": "embedding"}]))
    first = runner.invoke(cli, ["models", "register", "-f", str(catalog)], env=env)
    assert first.exit_code == 0, first.output
    assert "created model type dnabert2" in first.output and "created model type lucaone" in first.output
    catalog.write_text(json.dumps([{**TYPE, "image": "other:2"}, {**TYPE, "name": "evo2", "task": "features"}]))
    again = runner.invoke(cli, ["models", "register", "-f", str(catalog)], env=env)
    assert again.exit_code == 0, again.output
    assert "replaced model type dnabert2" in again.output and "created model type evo2" in again.output

    async def rows() -> list[tuple[str, str]]:
        db = Database(pg_url)
        try:
            async with db.session() as session:
                return [(r.name, r.image) for r in await session.scalars(
                    select(ModelTypeModel).order_by(ModelTypeModel.name))]
        finally:
            await db.dispose()

    expected = [("dnabert2", "other:2"), ("evo2", EXAMPLE_IMAGE), ("lucaone", EXAMPLE_IMAGE)]
    assert asyncio.run(rows()) == expected
    for bad, says in [([{**TYPE, "image": "third:3"}, {**TYPE, "name": "x", "gpus": 1}], "gpus"),
                      ([{**TYPE, "image": "third:3"}, {**TYPE, "name": "x", "spec": {"restart_policy": "often"}}],
                       "restart_policy"),
                      ([TYPE, TYPE], "named twice")]:
        catalog.write_text(json.dumps(bad))
        refused = runner.invoke(cli, ["models", "register", "-f", str(catalog)], env=env)
        assert refused.exit_code == 2 and says in refused.output, refused.output
    catalog.write_text("{not json")
    assert runner.invoke(cli, ["models", "register", "-f", str(catalog)], env=env).exit_code == 2
    assert asyncio.run(rows()) == expected
