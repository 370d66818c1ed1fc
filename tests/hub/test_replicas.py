"""Replicas through the hub's API on real PostgreSQL and the real Docker engine: a service of several copies
is placed in one batch spread over the controllers, lists its replicas, scales up and down, rolls an update
over them one at a time, and replaces the copy of a controller it lost while the others keep serving."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from examples.images import EXAMPLE_IMAGE
from hub.background import reconciler
from hub.models import ServiceModel
from tests.hub.conftest import Cluster
from tests.hub.test_services_api import counts, get_health
from tests.support.poll import eventually

SPEC = {"name": "rep", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"},
        "health_check": {"path": "/health", "port": 5000, "interval": 1}}


async def service(cluster: Cluster, sid: str) -> dict[str, Any]:
    r = await cluster.hub.get(f"/api/services/{sid}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def running(cluster: Cluster, sid: str) -> dict[str, str]:
    """The service's containers that run, by container id: their controller (one listing: a container the
    hub removes meanwhile is simply not in it)."""
    listed = cluster.docker.api.containers(filters={"label": [f"mmanager.service={sid}"], "status": "running"})
    return {c["Id"]: c["Labels"]["mmanager.controller"] for c in listed}


async def ops_of(cluster: Cluster, sid: str, operation: str) -> list[dict[str, Any]]:
    return (await cluster.hub.get("/api/admin/operations", params={"service_id": sid, "operation": operation})).json()  # type: ignore[no-any-return]


async def test_replicas_are_placed_in_one_batch_spread_over_controllers_and_listed(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "replicas": 2})
    assert r.status_code == 201, r.text
    created = r.json()
    sid = created["id"]
    assert created["spec"]["replicas"] == 2 and created["status"] == "running"
    # Never two on one controller while another fits: the two CPU controllers, one copy each.
    replicas = created["replicas"]
    assert sorted(rep["controller_id"] for rep in replicas) == [cpu1, cpu2]
    assert created["container_id"] in {rep["id"] for rep in replicas}
    assert {rep["id"]: rep["controller_id"] for rep in replicas} == running(cluster, sid)
    # Each copy has an epoch (and a registry row) of its own, and answers where the status says.
    epochs = sorted(int(c.labels["mmanager.epoch"]) for c in cluster.containers(**{"mmanager.service": sid}))
    assert epochs == [1, 2] and created["epoch"] == 2
    rows = [row for row in (await cluster.hub.get("/api/admin/containers")).json() if row["service_id"] == sid]
    assert sorted(row["epoch"] for row in rows) == [1, 2]
    for rep in replicas:
        assert rep["state"] == "running" and rep["endpoint"]["host"] == cluster.hosts[rep["controller_id"]]
        assert (await get_health(f"http://127.0.0.1:{rep['endpoint']['ports']['5000']}")).status_code == 200
    [create] = await ops_of(cluster, sid, "create")
    assert create["status"] == "succeeded" and create["details"]["replicas"] == 2
    # Each replica's logs, by its id; the primary's by default; another service's container is none of its.
    other = next(rep["id"] for rep in replicas if rep["id"] != created["container_id"])
    texts = []
    for params, container in (({}, created["container_id"]), ({"replica": other}, other)):
        r = await cluster.hub.get(f"/api/services/{sid}/logs", params={**params, "tail": 100_000})
        assert r.status_code == 200, r.text
        # Its whole log so far (the probes add lines as it runs): it names the clients' ports, each copy's own.
        assert r.text.startswith("model service") and "response:200" in r.text, r.text
        assert cluster.docker.containers.get(container).logs().decode().startswith(r.text)
        texts.append(r.text)
    assert texts[0] != texts[1]
    r = await cluster.hub.get(f"/api/services/{sid}/logs", params={"replica": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "REPLICA_NOT_FOUND"

    # A third fits only on the GPU controller (CPU services prefer CPU ones): it goes there rather than doubling up.
    three = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "three", "replicas": 3})).json()
    assert sorted(rep["controller_id"] for rep in three["replicas"]) == sorted([gpu, cpu1, cpu2])
    # Stopping and starting acts on every copy.
    assert (await cluster.hub.post(f"/api/services/{three['id']}/stop")).status_code == 200
    assert running(cluster, three["id"]) == {}
    started = (await cluster.hub.post(f"/api/services/{three['id']}/start")).json()
    assert len(running(cluster, three["id"])) == 3 and started["status"] == "running"
    # Deleting removes them all.
    assert (await cluster.hub.delete(f"/api/services/{three['id']}")).status_code == 204
    assert cluster.containers(**{"mmanager.service": three["id"]}) == []


@pytest.mark.parametrize("replicas", [0, -1, 65, "two"])
async def test_replicas_out_of_bounds_are_refused_and_change_nothing(cluster: Cluster, replicas: Any) -> None:
    before = await counts(cluster)
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "replicas": replicas})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("VALIDATION_ERROR", "TOO_MANY_REPLICAS")
    assert await counts(cluster) == before
    sid = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()["id"]
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": replicas})
    assert r.status_code == 422, r.text
    assert (await service(cluster, sid))["spec"]["replicas"] == 1 and len(running(cluster, sid)) == 1


async def test_scaling_up_adds_spread_copies_and_down_removes_them(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    sid = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()["id"]
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 3})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["version"] == 1 and up["spec"]["replicas"] == 3
    assert sorted(rep["controller_id"] for rep in up["replicas"]) == sorted([gpu, cpu1, cpu2])
    assert len(running(cluster, sid)) == 3
    first = up["container_id"]

    r = await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 1})
    assert r.status_code == 200, r.text
    down = r.json()
    assert [rep["id"] for rep in down["replicas"]] == [down["container_id"]]
    assert running(cluster, sid) == {down["container_id"]: down["controller_id"]}
    assert down["status"] == "running"
    assert (await get_health(f"http://127.0.0.1:{down['endpoint']['ports']['5000']}")).status_code == 200
    scales = await ops_of(cluster, sid, "scale")
    assert [(op["status"], op["details"]["from_replicas"], op["details"]["to_replicas"]) for op in scales] == [
        ("succeeded", 3, 1), ("succeeded", 1, 3)]
    assert scales[0]["details"]["removed"] == 2 and scales[1]["details"]["added"] == 2
    # Copies added beside it leave the service's own container as it was; the one kept may be another.
    assert up["container_id"] == first and down["container_id"] in {rep["id"] for rep in up["replicas"]}


async def test_an_update_rolls_over_the_replicas_and_a_second_one_is_refused(cluster: Cluster) -> None:
    sid = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "replicas": 2})).json()["id"]
    before = running(cluster, sid)
    r = await cluster.hub.patch(f"/api/services/{sid}", params={"wait": "false"}, json={"env": {"V": "2"}})
    assert r.status_code == 202, r.text
    second = await cluster.hub.patch(f"/api/services/{sid}", json={"env": {"V": "3"}})
    assert second.status_code == 409 and second.json()["error"]["code"] == "UPDATE_IN_PROGRESS", second.text

    async def rolled() -> list[dict[str, Any]] | None:
        ops = await ops_of(cluster, sid, "update")
        return ops if ops and ops[0]["status"] != "running" else None

    [op] = await eventually(rolled, 60, "the rolling update ended", interval=0.2)
    assert op["status"] == "succeeded" and op["details"]["replicas_rolled"] == 2, op
    after = await service(cluster, sid)
    assert after["version"] == 2 and len(after["replicas"]) == 2
    now = running(cluster, sid)
    assert len(now) == 2 and not set(now) & set(before)
    for container in cluster.containers(**{"mmanager.service": sid}):
        assert "V=2" in container.attrs["Config"]["Env"]
    # A rollback rolls the same way.
    r = await cluster.hub.post(f"/api/services/{sid}/rollback", json={"version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 3 and len(running(cluster, sid)) == 2
    for container in cluster.containers(**{"mmanager.service": sid}):
        assert "V=2" not in container.attrs["Config"]["Env"]


async def test_a_lost_controllers_replica_is_replaced_while_the_other_serves(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    created = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "replicas": 2})).json()
    sid = created["id"]
    on_cpu2 = next(rep for rep in created["replicas"] if rep["controller_id"] == cpu2)
    cluster.router.down.add(cluster.hosts[cpu2])

    async def replaced() -> dict[str, Any] | None:
        now = await service(cluster, sid)
        where = sorted(rep["controller_id"] for rep in now["replicas"])
        return now if where == sorted([gpu, cpu1]) else None

    now = await eventually(replaced, 20, "the lost replica replaced elsewhere", interval=0.1)
    kept = next(rep for rep in now["replicas"] if rep["controller_id"] == cpu1)
    assert kept["id"] in {rep["id"] for rep in created["replicas"]}
    assert on_cpu2["id"] not in {rep["id"] for rep in now["replicas"]}
    [failover] = await eventually(lambda: ops_of(cluster, sid, "failover"), 5, "the failover recorded", interval=0.1)
    assert failover["details"]["reason"] == "controller_lost" and failover["details"]["from_controller"] == cpu2
    cluster.router.down.discard(cluster.hosts[cpu2])
    await eventually(lambda: cluster.containers(**{"mmanager.service": sid, "mmanager.controller": cpu2}) == [], 15,
                     "the stale copy fenced", interval=0.1)
    async with httpx.AsyncClient() as client:
        for rep in now["replicas"]:
            port = rep["endpoint"]["ports"]["5000"]
            assert (await client.get(f"http://127.0.0.1:{port}/health", timeout=5)).status_code == 200


async def test_the_quota_counts_every_replica(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    r = await cluster.hub.post("/api/alice/lab/services", json={**SPEC, "replicas": 3}, headers=alice)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    # Five in all (MMANAGER_MAX_SERVICES_PER_USER): three run, so three more are refused, two are not.
    r = await cluster.hub.post("/api/alice/lab/services", json={**SPEC, "name": "more", "replicas": 3}, headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "QUOTA_EXCEEDED", r.text
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 6}, headers=alice)
    assert r.status_code == 409 and r.json()["error"]["code"] == "QUOTA_EXCEEDED", r.text
    assert len(running(cluster, sid)) == 3 and (await service(cluster, sid))["spec"]["replicas"] == 3
    r = await cluster.hub.post("/api/alice/lab/services", json={**SPEC, "name": "more", "replicas": 2}, headers=alice)
    assert r.status_code == 201, r.text


async def test_the_reconciler_brings_a_service_to_its_count(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an interrupted scale leaves (its count written, its copies not yet made or removed), and a
    replica whose container vanished, are finished by the reconciler."""
    # It finds a count to bring about when it counts every service's copies, which a hub does every few
    # seconds; counted more often here, each step does not wait out a whole period.
    monkeypatch.setattr(reconciler, "RECOUNT_EVERY", timedelta(seconds=0.5))
    sid = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "replicas": 2})).json()["id"]

    async def count_is(n: int) -> None:
        async with cluster.db.session() as session:
            await session.execute(update(ServiceModel).where(ServiceModel.id == sid).values(replicas=n))

    async def replicas(n: int) -> dict[str, Any] | None:
        now = await service(cluster, sid)
        return now if len(now["replicas"]) == n and len(running(cluster, sid)) == n else None

    await count_is(3)
    await eventually(lambda: replicas(3), 30, "a third replica added", interval=0.2)
    await count_is(1)
    one = await eventually(lambda: replicas(1), 30, "the excess removed", interval=0.2)
    assert one["status"] == "running" and one["replicas"][0]["id"] == one["container_id"]
    # The last copy removed behind the hub's back: its heartbeat finds it gone, and a new one runs.
    await count_is(2)
    two = await eventually(lambda: replicas(2), 30, "a second replica added", interval=0.2)
    other = next(rep for rep in two["replicas"] if rep["id"] != two["container_id"])
    cluster.docker.containers.get(other["id"]).remove(force=True)
    again = await eventually(lambda: _if(replicas(2), lambda s: other["id"] not in {r["id"] for r in s["replicas"]}),
                             30, "the vanished replica replaced", interval=0.2)
    assert again["container_id"] == two["container_id"]

    async def ended() -> list[dict[str, Any]] | None:
        ops = [op for op in await ops_of(cluster, sid, "scale") if op["actor"] == "system"]
        return ops if ops and all(op["status"] != "running" for op in ops) else None

    scales = await eventually(ended, 10, "the reconciler's scales ended", interval=0.1)
    assert all(op["status"] == "succeeded" for op in scales), [(op["status"], op["error"]) for op in scales]


async def _if(found: Any, check: Any) -> Any:
    value = await found
    return value if value is not None and check(value) else None


async def test_a_rollback_or_a_queued_update_keeps_the_count_of_replicas(cluster: Cluster) -> None:
    sid = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()["id"]
    assert (await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 2})).status_code == 200
    # Version 1 ran one replica; rolling back to it changes the spec, not the count.
    r = await cluster.hub.post(f"/api/services/{sid}/rollback", json={"version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["replicas"] == 2 and len(r.json()["replicas"]) == 2
    # An update queued behind a scale does not undo it.
    scale, update_ = await asyncio.gather(
        cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 3}),
        cluster.hub.patch(f"/api/services/{sid}", json={"env": {"V": "2"}}))
    assert scale.status_code == 200 and update_.status_code == 200, (scale.text, update_.text)
    after = await service(cluster, sid)
    assert after["spec"]["replicas"] == 3 and len(after["replicas"]) == 3 and len(running(cluster, sid)) == 3


async def test_every_replica_holds_gpus_of_its_own(cluster: Cluster) -> None:
    gpu = cluster.controller_ids[0]
    spec = {**SPEC, "name": "evo2", "resources": {"gpu_count": 1, "memory_limit": "32MB"}}
    # One GPU controller with two GPUs: two replicas fit there (no other controller may take them), one each.
    r = await cluster.hub.post("/api/admin/models/services", json={**spec, "replicas": 2})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert [rep["controller_id"] for rep in r.json()["replicas"]] == [gpu, gpu]
    devices = sorted(next(e for e in c.attrs["Config"]["Env"] if e.startswith("NVIDIA_VISIBLE_DEVICES="))
                     for c in cluster.containers(**{"mmanager.service": sid}))
    assert devices == ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1"]
    # Both GPUs are held: a third replica has nowhere to go, and nothing changes.
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"replicas": 3})
    assert r.status_code == 409 and r.json()["error"]["code"] == "NO_FEASIBLE_CONTROLLER", r.text
    r = await cluster.hub.post("/api/admin/models/services", json={**spec, "name": "evo2-b"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "NO_FEASIBLE_CONTROLLER", r.text
    assert len(running(cluster, sid)) == 2 and (await service(cluster, sid))["spec"]["replicas"] == 2
