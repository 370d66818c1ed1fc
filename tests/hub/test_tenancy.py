"""Tenancy on real PostgreSQL and the real Docker engine: another user's ids answer 404
and change nothing, the per-user quota holds under concurrency and across hub
replicas, and the per-user rate limit answers 429 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import func, select

from examples.images import EXAMPLE_IMAGE
from hub.app import build_hub, create_app
from hub.db import Database
from hub.models import ApiTokenModel, ContainerRegistryModel, JobModel, OperationModel, ServiceModel, UserModel
from tests.hub.conftest import Cluster

SPEC = {
    "name": "secret-model",
    "image": EXAMPLE_IMAGE,
    "ports": {"5000": None},
    "resources": {"memory_limit": "32MB"},
    "volumes": {"x-data": "/data"},
}
# Valid bodies, so that a refusal can only come from ownership, never from validation.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/{username}/{repo}/services"): {**SPEC, "name": "planted-by-bob"},
    ("PATCH", "/api/services/{service_id}"): {"env": {"STOLEN": "1"}},
    ("POST", "/api/services/{service_id}/rollback"): {"version": 1},
    ("POST", "/api/services/{service_id}/keys"): {"name": "stolen"},
}
PUBLIC = {"/health", "/metrics"}


def routes(cluster: Cluster) -> list[tuple[str, APIRoute, str]]:
    """(method, route, path) for every API route of the hub app as built, so a route added later is covered."""
    app = create_app(cluster.parts.settings, hub=cluster.parts)
    found = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            found += [(method, route, context.path) for method in sorted(context.methods or ())]
    return found


def variants(route: APIRoute) -> list[dict[str, str]]:
    """Every combination of the route's boolean query flags (wait, follow): each takes another code path."""
    flags = [p.name for p in route.dependant.query_params if p.field_info.annotation is bool]
    combos: list[dict[str, str]] = [{}]
    for flag in flags:
        combos = [{**c, flag: value} for c in combos for value in ("true", "false")]
    return combos


@contextlib.asynccontextmanager
async def replica(cluster: Cluster, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Another hub replica on the cluster's database and controllers, with its own settings.

    It runs its loops like any replica: without its liveness beat, the leader would take its
    operations in flight for those of a stopped replica and finish them itself.
    """
    hub_settings = cluster.parts.settings.model_copy(update=settings)
    hub = build_hub(hub_settings, db=Database(cluster.db.url), transport=cluster.router)
    app = create_app(hub_settings, hub=hub)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub",
                                     timeout=120) as client:
            yield client


async def count(cluster: Cluster, model: Any, *where: Any) -> int:
    async with cluster.db.session() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where)) or 0


async def snapshot(cluster: Cluster, alice: dict[str, str], sid: str) -> dict[str, Any]:
    """What alice and an admin can see of alice's service, and the container itself."""
    service = (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).json()
    as_admin = (await cluster.hub.get(f"/api/services/{sid}")).json()
    # Heartbeats and polls keep writing the observed health and the time of the last look.
    for seen in (service, as_admin):
        seen.pop("updated_at"), seen.pop("health")
    container = cluster.docker.containers.get(service["container_id"])
    state = container.attrs["State"]
    registry = (await cluster.hub.get("/api/admin/containers", params={"service_id": sid})).json()
    controllers = (await cluster.hub.get("/api/admin/controllers")).json()
    return {
        "service": service,
        "as_admin": as_admin,
        "container": (container.id, container.attrs["Created"], container.attrs["Config"]["Env"],
                      container.attrs["RestartCount"], state["Status"], state["Pid"], state["StartedAt"]),
        "containers": sorted(c.id for c in cluster.containers()),
        "operations": (await cluster.hub.get("/api/admin/operations", params={"service_id": sid})).json(),
        "all_operations": len((await cluster.hub.get("/api/admin/operations")).json()),
        "history": (await cluster.hub.get(f"/api/services/{sid}/history", headers=alice)).json(),
        "registry": [(e["id"], e["controller_id"], e["container_id"], e["epoch"], e["status"]) for e in registry],
        "controllers": [(c["id"], c["enabled"], c["priority"], c["weight"]) for c in controllers],
        "services": await count(cluster, ServiceModel),
        "users": await count(cluster, UserModel),
    }


async def _alices_job_and_artifact(cluster: Cluster, alice: dict[str, str]) -> dict[str, str]:
    """An upload of alice's, and a finished job of hers (written as the watcher leaves one: no controller runs it)."""
    r = await cluster.hub.post("/api/artifacts", params={"name": "in.txt"}, content=b"alice's", headers=alice)
    assert r.status_code == 201, r.text
    async with cluster.db.session() as session:
        owner = await session.scalar(select(UserModel.id).where(UserModel.username == "alice"))
        job = JobModel(name="done", owner_id=owner, spec={"name": "done", "image": "busybox"}, status="succeeded",
                       needs=[])
        session.add(job)
        await session.flush()
        job_id = job.id
    return {"job_id": job_id, "artifact_id": r.json()["id"]}


async def test_another_users_ids_answer_404_on_every_route_and_change_nothing(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    r = await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    [entry] = (await cluster.hub.get("/api/admin/containers", params={"service_id": sid})).json()
    controller_id = r.json()["controller_id"]
    before = await snapshot(cluster, alice, sid)
    ghost = uuid.uuid4().hex  # an id nobody has: alice's must look exactly like it to bob

    user_routes = [(m, route, p) for m, route, p in routes(cluster)
                   if p.startswith("/api/")
                   # Admins' and machines' routes (the gateways': tests/hub/test_gateway_api.py).
                   and not p.startswith(("/api/admin/", "/api/controllers/", "/api/gateway/", "/api/gateways/"))]
    tried = []
    tried_jobs: dict[str, str] = {}
    for method, route, path in user_routes:
        if path == "/api/services":
            assert method == "GET"
            assert (await cluster.hub.get(path, headers=bob)).json() == []
            continue
        if path in ("/api/models", "/api/models/{name}"):
            # The model catalog is no user's: every user reads the same one (tests/hub/test_models_api.py).
            assert method == "GET"
            continue
        if path.startswith(("/api/jobs", "/api/artifacts")):
            # Alice's job and upload answer bob exactly as ids nobody has; the lists show him nothing of hers.
            # (A submit naming another user's input: tests/hub/test_jobs_queue.py.)
            if method == "POST" and path in ("/api/jobs", "/api/artifacts"):
                continue
            if "{" not in path:
                assert method == "GET"
                assert (await cluster.hub.get(path, headers=bob)).json() == []
                continue
            if not tried_jobs:
                tried_jobs.update(await _alices_job_and_artifact(cluster, alice))
            key = "job_id" if "{job_id}" in path else "artifact_id"
            for target in (tried_jobs[key], ghost):
                r = await cluster.hub.request(method, path.replace("{" + key + "}", target), headers=bob)
                code = "JOB_NOT_FOUND" if key == "job_id" else "ARTIFACT_NOT_FOUND"
                assert r.status_code == 404 and r.json()["error"]["code"] == code, f"{method} {path}: {r.text}"
            continue
        if path.startswith("/api/model-files"):
            # Nor is the model-file store: content-addressed, shared, deleted only by admins
            # (tests/hub/test_model_files.py).
            continue
        if path in ("/api/me", "/api/operations", "/api/audit", "/api/alerts", "/api/operations/{operation_id}"):
            # Scoped to the caller, whoever asks (tests/hub/test_client_routes.py): nothing of alice's.
            assert method == "GET"
            if path == "/api/operations/{operation_id}":
                [op] = before["operations"]
                r = await cluster.hub.get(f"/api/operations/{op['id']}", headers=bob)
                assert r.status_code == 404 and r.json()["error"]["code"] == "OPERATION_NOT_FOUND", r.text
            elif path == "/api/audit":
                # Bob's own calls only (his refused tries at alice's ids among them).
                assert {e["actor"] for e in (await cluster.hub.get(path, headers=bob)).json()} <= {"bob"}
            else:
                assert "alice" not in (await cluster.hub.get(path, headers=bob)).text
            continue
        if path.startswith("/api/me/tokens"):
            # Alice's token ids answer bob as ids nobody has (tests/hub/test_users_admin.py); his list is his own.
            if "{" not in path:
                if method == "GET":
                    assert "alice" not in (await cluster.hub.get(path, headers=bob)).text
                continue
            async with cluster.db.session() as session:
                alices = await session.scalar(select(ApiTokenModel.id).join(UserModel).where(
                    UserModel.username == "alice"))
            for target in (str(alices), "999999"):
                r = await cluster.hub.request(method, path.replace("{token_id}", target), headers=bob)
                assert r.status_code == 404 and r.json()["error"]["code"] == "TOKEN_NOT_FOUND", r.text
            continue
        if path.startswith("/api/pipelines"):
            # Pipelines have their own matrix (tests/hub/test_pipelines.py).
            continue
        if path == "/api/services/{service_id}/migrate":
            # An admin's move: refused to every user alike, their own services' or not.
            for target in (sid, ghost):
                r = await cluster.hub.post(path.replace("{service_id}", target), headers=bob)
                assert r.status_code == 403 and r.json()["error"]["code"] == "ADMIN_REQUIRED", r.text
            continue
        if "{service_id}" in path:
            mine, theirs = path.replace("{service_id}", sid), path.replace("{service_id}", ghost)
            swap = (sid, ghost)
        else:
            assert path == "/api/{username}/{repo}/services", f"{method} {path}: add it to the tenancy matrix"
            mine, theirs = "/api/alice/genomics/services", "/api/nobody/genomics/services"
            swap = ("alice", "nobody")
        body = BODIES.get((method, path))
        assert body is not None or route.body_field is None, f"{method} {path}: give it a valid body in BODIES"
        for params in variants(route):
            r = await cluster.hub.request(method, mine, params=params, json=body, headers=bob)
            missing = await cluster.hub.request(method, theirs, params=params, json=body, headers=bob)
            assert r.status_code == 404, (method, mine, params, r.text)
            assert r.json()["error"]["code"] in ("SERVICE_NOT_FOUND", "USER_NOT_FOUND"), r.text
            assert r.text.replace(*swap) == missing.text, (method, mine, params)
            tried.append((method, path, tuple(params.items())))
    # The matrix is not empty by accident: every lifecycle verb, with and without waiting, logs followed or not.
    assert {(m, p) for m, p, _ in tried} >= {
        ("GET", "/api/services/{service_id}"), ("PATCH", "/api/services/{service_id}"),
        ("DELETE", "/api/services/{service_id}"), ("POST", "/api/services/{service_id}/stop"),
        ("GET", "/api/services/{service_id}/logs"), ("POST", "/api/services/{service_id}/rollback"),
        ("POST", "/api/{username}/{repo}/services"),
    }
    assert ("GET", "/api/services/{service_id}/logs", (("follow", "true"),)) in tried
    assert ("POST", "/api/services/{service_id}/start", (("wait", "false"),)) in tried

    # Admin routes refuse a user token; the controller route refuses it too; nothing answers without a token.
    ids = {"controller_id": controller_id, "entry_id": entry["id"], "key_id": "1"}
    for method, _, path in routes(cluster):
        url = path.format(**{name: ids.get(name, "x") for name in re.findall(r"{(\w+)}", path)})
        r = await cluster.hub.request(method, url, headers=bob)
        if path.startswith("/api/admin/"):
            assert r.status_code == 403 and r.json()["error"]["code"] == "ADMIN_REQUIRED", (method, url, r.text)
        elif path.startswith("/api/controllers/"):
            assert r.status_code == 401, (method, url, r.text)
        anonymous = await cluster.hub.request(method, url, headers={"Authorization": ""})
        if path in PUBLIC:
            assert anonymous.status_code == 200, (method, url)
        else:
            assert anonymous.status_code == 401, (method, url, anonymous.text)
            assert anonymous.json()["error"]["code"] == "UNAUTHORIZED"

    assert await snapshot(cluster, alice, sid) == before
    assert before["container"][4] == "running"
    assert [(o["operation"], o["actor"]) for o in before["operations"]] == [("create", "alice")]


async def test_owner_volumes_are_distinct_even_when_names_run_together(cluster: Cluster) -> None:
    """``alice`` + volume ``x-data`` and ``alice-x`` + volume ``data`` once mapped to the same Docker volume."""
    mounts = {}
    for user, volume in (("alice", "x-data"), ("alice-x", "data")):
        headers = await cluster.user(user)
        r = await cluster.hub.post(f"/api/{user}/r/services", json={**SPEC, "volumes": {volume: "/data"}},
                                   headers=headers)
        assert r.status_code == 201, r.text
        [mount] = cluster.docker.containers.get(r.json()["container_id"]).attrs["Mounts"]
        mounts[user] = mount["Name"]
        await cluster.hub.delete(f"/api/services/{r.json()['id']}")
    for name in mounts.values():
        with contextlib.suppress(Exception):
            cluster.docker.volumes.get(name).remove(force=True)
    assert mounts["alice"] != mounts["alice-x"], mounts


@pytest.mark.parametrize("replicas", [1, 2])
async def test_quota_holds_under_concurrent_creates(cluster: Cluster, replicas: int) -> None:
    alice = await cluster.user("alice")
    async with contextlib.AsyncExitStack() as stack:
        hubs = [await stack.enter_async_context(replica(cluster, max_services_per_user=10)) for _ in range(replicas)]
        answers = await asyncio.gather(*(
            hubs[i % replicas].post("/api/alice/r/services", json={**SPEC, "name": f"q{i}"}, headers=alice)
            for i in range(50)
        ))
    outcomes = Counter((r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else r.json()["status"])
                       for r in answers)
    assert outcomes == {(201, "running"): 10, (409, "QUOTA_EXCEEDED"): 40}, outcomes
    assert await count(cluster, ServiceModel) == 10
    assert await count(cluster, ContainerRegistryModel) == 10
    assert len(cluster.containers()) == 10
    # A refused create recorded no operation.
    assert await count(cluster, OperationModel, OperationModel.operation == "create") == 10


async def test_a_failed_create_holds_no_quota(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    async with replica(cluster, max_services_per_user=1) as hub:
        r = await hub.post("/api/alice/r/services", json={**SPEC, "image": "no-such-image-anywhere:1"}, headers=alice)
        assert r.status_code == 422 and r.json()["error"]["code"] == "IMAGE_PULL_FAILED", r.text
        r = await hub.post("/api/alice/r/services", json=SPEC, headers=alice)
        assert r.status_code == 201, r.text
        r = await hub.post("/api/alice/r/services", json={**SPEC, "name": "two"}, headers=alice)
        assert r.status_code == 409 and r.json()["error"]["code"] == "QUOTA_EXCEEDED"
    assert await count(cluster, ServiceModel) == 1


async def test_rate_limit_answers_429_with_retry_after_and_does_nothing(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    admin = cluster.as_user(cluster.admin_token)
    async with replica(cluster, rate_limit=0.5, rate_burst=3) as hub:
        for _ in range(3):
            assert (await hub.get("/api/services", headers=alice)).status_code == 200
        r = await hub.post("/api/alice/r/services", json=SPEC, headers=alice)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "RATE_LIMITED"
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 2  # a token every 2 s
        assert await count(cluster, ServiceModel) == 0 and cluster.containers() == []

        # Another user, and the unauthenticated endpoints, are not slowed by alice's burst.
        for _ in range(3):
            assert (await hub.get("/api/services", headers=bob)).status_code == 200
        for _ in range(10):
            assert (await hub.get("/health")).status_code == 200
            assert (await hub.get("/metrics")).status_code == 200
        # Admins are limited like everyone else.
        codes = [(await hub.get("/api/admin/controllers", headers=admin)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]

        await asyncio.sleep(retry)
        r = await hub.post("/api/alice/r/services", json=SPEC, headers=alice)
        assert r.status_code == 201, r.text
    assert await count(cluster, ServiceModel) == 1
