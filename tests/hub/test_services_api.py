"""The services API on real PostgreSQL, with controllers on the real Docker engine."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from examples.images import EXAMPLE_IMAGE
from hub.models import ContainerRegistryModel, OperationModel, ServiceModel
from hub.scheduler.snapshot import load_views
from tests.hub.conftest import Cluster
from tests.support.poll import eventually

SPEC = {
    "name": "dnabert2",
    "image": EXAMPLE_IMAGE,
    "ports": {"5000": None},
    "env": {"MODEL_PATH": "/models/dnabert2"},
    "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"},
    "health_check": {"path": "/health", "port": 5000, "interval": 5},
    "volumes": {"models": "/app/models"},
    "labels": {"team": "genomics"},
}


async def get_health(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await eventually(lambda: client.get(f"{url}/health", timeout=2), 10, f"an answer from {url}",
                                interval=0.1, retry_on=(httpx.TransportError,))


async def counts(cluster: Cluster) -> tuple[int, int]:
    async with cluster.db.session() as session:
        services = await session.scalar(select(func.count()).select_from(ServiceModel))
        registry = await session.scalar(select(func.count()).select_from(ContainerRegistryModel))
    return services or 0, registry or 0


async def fill_the_quota(cluster: Cluster, path: str, headers: dict[str, str]) -> None:
    """With one service made already: four more are created, the sixth is refused by
    max_services_per_user (5) and writes nothing."""
    for i in range(4):
        r = await cluster.hub.post(path, json={**SPEC, "name": f"q{i}"}, headers=headers)
        assert r.status_code == 201, r.text
    r = await cluster.hub.post(path, json={**SPEC, "name": "q5"}, headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "QUOTA_EXCEEDED"
    assert await counts(cluster) == (5, 5)


async def test_create_runs_the_container_where_placement_says(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    r = await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["status"] == "running"
    assert service["owner"] == "alice" and service["repo"] == "genomics"
    assert service["epoch"] == 1 and service["desired_state"] == "running"
    cpu1 = cluster.controller_ids[1]
    assert service["controller_id"] == cpu1  # the cpu controller of the best priority tier

    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    assert container.id == service["container_id"]
    labels = container.labels
    assert labels["mmanager.managed"] == "true"
    assert labels["mmanager.controller"] == cpu1
    assert labels["mmanager.epoch"] == "1"
    assert labels["team"] == "genomics"
    host_config = container.attrs["HostConfig"]
    assert host_config["Memory"] == 64 * 1024**2
    assert host_config["NanoCpus"] == 500_000_000
    assert "MODEL_PATH=/models/dnabert2" in container.attrs["Config"]["Env"]

    port = service["endpoint"]["ports"]["5000"]
    assert service["endpoint"]["host"] == f"{cpu1}.test"  # the controller URL's host
    assert service["url"] == f"http://{cpu1}.test:{port}"
    answer = await get_health(f"http://127.0.0.1:{port}")
    assert answer.json() == {"status": "healthy"}

    registry = (await cluster.hub.get("/api/admin/containers")).json()
    assert [(e["service_id"], e["controller_id"], e["container_id"], e["status"]) for e in registry] == [
        (service["id"], cpu1, container.id, "running")
    ]
    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": service["id"]})).json()
    assert [(o["operation"], o["status"], o["actor"]) for o in ops] == [("create", "succeeded", "alice")]
    assert ops[0]["finished_at"] is not None


async def test_gpu_service_lands_on_gpu_controller_with_its_devices(cluster: Cluster) -> None:
    spec = {**SPEC, "name": "evo2", "resources": {"gpu_count": 2, "memory_limit": "64MB"}}
    r = await cluster.hub.post("/api/admin/models/services", json=spec)
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["controller_id"] == cluster.controller_ids[0]
    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    env = container.attrs["Config"]["Env"]
    assert any(e in env for e in ("NVIDIA_VISIBLE_DEVICES=0,1", "NVIDIA_VISIBLE_DEVICES=1,0"))

    # Both GPUs are taken now: the next GPU service has nowhere to go, and is told why.
    r = await cluster.hub.post("/api/admin/models/services", json={**spec, "name": "evo2-b", "resources": {"gpu_count": 1}})
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "NO_FEASIBLE_CONTROLLER"
    reasons = {x["controller_id"]: x["code"] for x in error["details"]["rejections"]}
    assert reasons[cluster.controller_ids[0]] == "GPUS"
    assert reasons[cluster.controller_ids[1]] == "SERVER_TYPE"

    # The placement's snapshot, read straight through the driver, counts what the registry holds there.
    views, urls = await load_views(cluster.db)
    view = {v.id: v for v in views}[cluster.controller_ids[0]]
    assert view.gpus == ("0", "1") and view.gpus_used == {"0", "1"} and view.healthy and view.enabled
    assert view.containers == 1 and view.memory_reserved == 64 * 2**20 and view.memory_total > 0
    assert view.server_type == "gpu" and urls[cluster.controller_ids[0]].startswith("http://")
    others = [v for v in views if v.id in cluster.controller_ids[1:]]
    assert len(others) == 2 and all(v.containers == 0 and not v.gpus_used and v.memory_reserved == 0 for v in others)
    # The admin's usage report counts from the same snapshot.
    usage = await cluster.hub.get("/api/admin/resources/usage")
    assert usage.status_code == 200, usage.text
    reported = {c["id"]: c for c in usage.json()["controllers"]}
    gpu = reported[cluster.controller_ids[0]]
    assert (gpu["containers"], gpu["gpus_total"], gpu["gpus_used"], gpu["memory_reserved_bytes"]) == (1, 2, 2, 64 * 2**20)
    assert all(reported[cid]["containers"] == 0 and reported[cid]["gpus_used"] == 0
               for cid in cluster.controller_ids[1:])
    totals = usage.json()["totals"]
    assert totals["gpus_used"] == 2 and totals["containers"] == 1


async def test_lifecycle_stop_start_restart_logs_status_delete(cluster: Cluster) -> None:
    created = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    sid = created["id"]

    r = await cluster.hub.post(f"/api/services/{sid}/stop")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "stopped" and r.json()["desired_state"] == "stopped"
    assert cluster.docker.containers.get(created["container_id"]).status == "exited"
    assert (await cluster.hub.get(f"/api/services/{sid}/status")).json()["status"] == "stopped"

    r = await cluster.hub.post(f"/api/services/{sid}/start")
    assert r.status_code == 200 and r.json()["status"] == "running"
    port = r.json()["endpoint"]["ports"]["5000"]
    assert (await get_health(f"http://127.0.0.1:{port}")).status_code == 200

    started_at = cluster.docker.containers.get(created["container_id"]).attrs["State"]["StartedAt"]
    r = await cluster.hub.post(f"/api/services/{sid}/restart")
    assert r.status_code == 200 and r.json()["status"] == "running"
    assert cluster.docker.containers.get(created["container_id"]).attrs["State"]["StartedAt"] != started_at

    status = (await cluster.hub.get(f"/api/services/{sid}/status")).json()
    assert status["status"] == "running" and status["container_id"] == created["container_id"]

    logs = await cluster.hub.get(f"/api/services/{sid}/logs", params={"tail": 50})
    assert logs.status_code == 200
    assert "model service example listening on 5000" in logs.text

    r = await cluster.hub.delete(f"/api/services/{sid}")
    assert r.status_code == 204
    assert (await cluster.hub.get(f"/api/services/{sid}")).status_code == 404
    assert cluster.containers(**{"mmanager.service": sid}) == []
    assert await counts(cluster) == (0, 0)

    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": sid})).json()
    assert [o["operation"] for o in reversed(ops)] == ["create", "stop", "start", "restart", "delete"]
    assert all(o["status"] == "succeeded" for o in ops)


async def test_disabled_controller_gets_no_new_placements(cluster: Cluster) -> None:
    cpu1, cpu2 = cluster.controller_ids[1], cluster.controller_ids[2]
    r = await cluster.hub.post(f"/api/admin/controllers/{cpu1}/disable")
    assert r.status_code == 200 and r.json()["enabled"] is False
    placed = []
    for i in range(3):
        r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": f"s{i}"})
        assert r.status_code == 201, r.text
        placed.append(r.json()["controller_id"])
    assert placed == [cpu2, cpu2, cpu2]
    r = await cluster.hub.post(f"/api/admin/controllers/{cpu1}/enable")
    assert r.json()["enabled"] is True
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "after"})
    assert r.json()["controller_id"] == cpu1


async def test_update_makes_a_new_version_and_rollback_restores_it(cluster: Cluster) -> None:
    sid = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()["id"]
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"env": {"MODEL_PATH": "/models/v2"}})
    assert r.status_code == 200, r.text
    v2 = r.json()
    assert v2["version"] == 2 and v2["epoch"] == 2 and v2["status"] == "running"
    [container] = cluster.containers(**{"mmanager.service": sid})
    assert container.labels["mmanager.epoch"] == "2"
    assert "MODEL_PATH=/models/v2" in container.attrs["Config"]["Env"]

    history = (await cluster.hub.get(f"/api/services/{sid}/history")).json()
    assert [(h["version"], h["reason"], h["current"]) for h in history] == [(1, "create", False), (2, "update", True)]

    r = await cluster.hub.post(f"/api/services/{sid}/rollback", json={"version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 3 and r.json()["spec"]["env"] == {"MODEL_PATH": "/models/dnabert2"}
    [container] = cluster.containers(**{"mmanager.service": sid})
    assert "MODEL_PATH=/models/dnabert2" in container.attrs["Config"]["Env"]
    assert container.labels["mmanager.epoch"] == "3"

    r = await cluster.hub.post(f"/api/services/{sid}/rollback", json={"version": 9})
    assert r.status_code == 404 and r.json()["error"]["code"] == "VERSION_NOT_FOUND"


async def test_migrate_moves_the_service_and_get_is_refused(cluster: Cluster) -> None:
    service = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    r = await cluster.hub.get(f"/api/admin/containers/{entry['id']}/migrate")
    assert r.status_code == 405 and r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"

    target = cluster.controller_ids[2]
    # Its volume stays on its server: refused unless the caller accepts that.
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": target})
    assert r.status_code == 409 and r.json()["error"]["code"] == "VOLUME_STAYS_BEHIND", r.text
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate",
                               json={"target_controller": target, "leave_volumes": True})
    assert r.status_code == 200, r.text
    moved = r.json()
    assert moved["controller_id"] == target and moved["epoch"] == 2
    containers = cluster.containers(**{"mmanager.service": service["id"]})
    assert [c.labels["mmanager.controller"] for c in containers] == [target]
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    assert entry["controller_id"] == target and entry["epoch"] == 2


async def test_wait_false_answers_202_with_the_operation(cluster: Cluster) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", params={"wait": "false"}, json=SPEC)
    assert r.status_code == 202, r.text
    op = r.json()
    assert op["operation"] == "create" and op["status"] == "running"
    async def finished() -> list[dict[str, Any]] | None:
        ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": op["service_id"]})).json()
        return ops if ops[0]["status"] != "running" else None

    ops = await eventually(finished, 20, "the create's operation finished", interval=0.1)
    assert ops[0]["status"] == "succeeded"
    assert (await cluster.hub.get(f"/api/services/{op['service_id']}")).json()["status"] == "running"


async def test_quota_and_tenancy(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    sid = (await cluster.hub.post("/api/alice/r/services", json=SPEC, headers=alice)).json()["id"]
    for method, path in [
        ("GET", f"/api/services/{sid}"),
        ("GET", f"/api/services/{sid}/status"),
        ("GET", f"/api/services/{sid}/logs"),
        ("GET", f"/api/services/{sid}/history"),
        ("POST", f"/api/services/{sid}/stop"),
        ("POST", f"/api/services/{sid}/start"),
        ("POST", f"/api/services/{sid}/restart"),
        ("DELETE", f"/api/services/{sid}"),
    ]:
        r = await cluster.hub.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path, r.text)
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"env": {}}, headers=bob)
    assert r.status_code == 404
    assert (await cluster.hub.get("/api/services", headers=bob)).json() == []
    assert (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).json()["status"] == "running"
    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": sid})).json()
    assert [o["operation"] for o in ops] == ["create"]

    # bob cannot create in alice's name, nor reach admin endpoints
    assert (await cluster.hub.post("/api/alice/r/services", json={**SPEC, "name": "x"}, headers=bob)).status_code == 404
    assert (await cluster.hub.get("/api/admin/controllers", headers=bob)).status_code == 403

    await fill_the_quota(cluster, "/api/alice/r/services", alice)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"name": "x", "image": ', 400, "MALFORMED_JSON"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "privileged": True}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "resources": {"cpu_limit": -1}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "resources": {"cpu_limit": 1e9}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "resources": {"memory_limit": "lots"}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "resources": {"memory_limit": "-2GB"}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "resources": {"memory_limit": "900TB"}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "resources": {"gpu_count": -1}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "ports": {"http": None}}, 422, "VALIDATION_ERROR"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "labels": {"mmanager.epoch": "99"}}, 403, "SPEC_FORBIDDEN"),
        ({"name": "x", "image": EXAMPLE_IMAGE, "volumes": {"/etc": "/host"}}, 403, "SPEC_FORBIDDEN"),
        ({"name": "bad name!", "image": EXAMPLE_IMAGE}, 422, "VALIDATION_ERROR"),
        ({"image": EXAMPLE_IMAGE}, 422, "VALIDATION_ERROR"),
        # Pulled on create; Docker Hub lacks it or cannot be reached: refused all the same.
        ({"name": "x", "image": "no-such-image-anywhere:1"}, 422, "IMAGE_PULL_FAILED"),
    ],
)
async def test_bad_input_is_refused_and_changes_nothing(cluster: Cluster, body, status: int, code: str) -> None:
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = await cluster.hub.post("/api/admin/repo/services", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert await counts(cluster) == (0, 0)
    assert cluster.containers() == []


async def test_unknown_ids_and_bad_tokens(cluster: Cluster) -> None:
    for method, path in [("GET", "/api/services/nope"), ("POST", "/api/services/nope/start"),
                         ("DELETE", "/api/services/nope"), ("GET", "/api/admin/controllers/nope"),
                         ("POST", "/api/admin/controllers/nope/disable"), ("POST", "/api/admin/containers/nope/migrate")]:
        r = await cluster.hub.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"].endswith("NOT_FOUND")
    async with cluster.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(OperationModel)) == 0
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = await cluster.hub.get("/api/services", headers={**headers} if headers else {"Authorization": ""})
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    assert (await cluster.hub.get("/health", headers={"Authorization": ""})).status_code == 200


async def test_patch_null_resets_a_field_and_odd_values_are_refused_not_crashed(cluster: Cluster) -> None:
    """Found by the fuzzer: a PATCH with null fields was a 500; an offset past the database's integer
    range or a NUL in a query was a 503 that blamed the database. Each is the caller's problem (or a
    default), answered as such, and changes nothing."""
    sid = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()["id"]
    r = await cluster.hub.patch(f"/api/services/{sid}?wait=true",
                                json={"health_check": None, "restart_policy": None, "resources": None})
    assert r.status_code == 200, r.text
    spec = r.json()["spec"]
    assert spec["health_check"] is None and spec["restart_policy"] == "unless-stopped"
    assert spec["resources"]["memory_limit"] is None and spec["env"] == SPEC["env"]
    # Sub-objects merge: changing the CPU keeps the memory limit.
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"resources": {"memory_limit": "48MB"}})
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"resources": {"cpu_limit": 0.25}})
    assert r.status_code == 200, r.text
    assert (r.json()["spec"]["resources"]["cpu_limit"], r.json()["spec"]["resources"]["memory_limit"]) == (0.25, "48MB")
    before = await counts(cluster)
    for path, code in [("/api/services?offset=1000000000000000000000", "VALIDATION_ERROR"),
                       ("/api/admin/operations?service_id=a%00b", "INVALID_VALUE"),
                       ("/api/admin/containers?controller_id=%00", "INVALID_VALUE")]:
        r = await cluster.hub.get(path)
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), (path, r.text)
    assert await counts(cluster) == before


async def test_concurrent_rollbacks_roll_one_and_refuse_the_others(cluster: Cluster) -> None:
    """Found by the fuzzer: two rollbacks at once planned the same version number; the second broke
    the history's unique key and answered 503. One rolls out at a time now: the others are refused
    with a 409 that says so, and the history has the one new version."""
    sid = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()["id"]
    answers = await asyncio.gather(*(cluster.hub.post(f"/api/services/{sid}/rollback", json={"version": 1})
                                     for _ in range(3)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409], [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == {"UPDATE_IN_PROGRESS"}
    history = (await cluster.hub.get(f"/api/services/{sid}/history")).json()
    assert [(h["version"], h["reason"]) for h in history] == [(1, "create"), (2, "rollback")]
    service = (await cluster.hub.get(f"/api/services/{sid}")).json()
    assert (service["version"], service["status"]) == (2, "running")
    assert [c.id for c in cluster.containers(**{"mmanager.service": sid})] == [service["container_id"]]
