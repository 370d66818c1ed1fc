"""Failure handling through the hub's API on real PostgreSQL and the real
Docker engine, with in-process controllers the hub polls (they do not push):
a controller made unreachable fails over, is fenced when it returns, drains
hand everything over, and planned moves wait for health checks. The
heartbeat endpoint is exercised here too; test_failover.py does the same
with real processes that push."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from examples.images import EXAMPLE_IMAGE
from hub.models import ContainerRegistryModel
from tests.hub.conftest import KEY, Cluster
from tests.support.poll import eventually

SPEC = {"name": "svc", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


def heartbeat(controller_id: str, containers: list[dict[str, Any]], url: str | None = None) -> dict[str, Any]:
    return {
        "server_id": controller_id, "url": url, "server_type": "cpu", "sequence": 1,
        "health": {
            "status": "healthy", "server_id": controller_id, "server_type": "cpu", "version": "t", "docker": True,
            "containers": {"running": len(containers), "max_allowed": 20},
            "resources": {"cpu_cores": 2, "memory_total_gb": 8, "memory_available_gb": 4},
            "load_percentage": 5.0, "memory_usage_percent": 50.0,
            "capabilities": {"gpu_support": False, "max_memory_gb": 8},
        },
        "containers": containers,
    }


async def test_heartbeat_needs_the_controller_key_before_anything_else(cluster: Cluster) -> None:
    cid = cluster.controller_ids[1]
    path = f"/api/controllers/{cid}/heartbeat"
    for headers in ({"Authorization": "Bearer wrong"}, cluster.as_user(cluster.admin_token), {"Authorization": ""}):
        r = await cluster.hub.post(path, json=heartbeat(cid, []), headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] in ("CONTROLLER_KEY_INVALID", "UNAUTHORIZED")
    key = {"Authorization": f"Bearer {KEY}"}
    r = await cluster.hub.post(path, content=b"{not json", headers={**key, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "MALFORMED_JSON"
    r = await cluster.hub.post(path, json=heartbeat("someone-else", []), headers=key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "SERVER_ID_MISMATCH"
    # A controller's key reaches no user endpoint.
    assert (await cluster.hub.get("/api/services", headers=key)).status_code == 401


async def test_heartbeat_answers_what_to_stop_and_joins_new_controllers(cluster: Cluster) -> None:
    service = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    # Only pushed heartbeats here: the poller would report the real (unprobed) health meanwhile.
    await cluster.parts.poller.stop()
    cid = service["controller_id"]
    key = {"Authorization": f"Bearer {KEY}"}
    current = {"container_id": service["container_id"], "name": "cur", "service_id": service["id"], "epoch": 1,
               "state": "running", "health": "healthy", "age_seconds": 30}
    orphan = {"container_id": "f" * 64, "name": "orphan", "service_id": service["id"], "epoch": 7,
              "state": "running", "age_seconds": 60}
    young = {"container_id": "e" * 64, "name": "young", "service_id": "nosuchservice", "epoch": 1,
             "state": "running", "age_seconds": 0.5}
    foreign = {"container_id": "d" * 64, "name": "geoml", "state": "running", "age_seconds": 999}
    r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", headers=key,
                               json=heartbeat(cid, [current, orphan, young, foreign]))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["interval"] == 0.5 and answer["grace"] == 3
    assert [(o["container_id"], o["reason"]) for o in answer["stop"]] == [("f" * 64, "orphan")]
    # Written by a later flush (a beat only overrides what is older than its listing): health reaches
    # the services as the controller keeps beating, several rows in one write.
    other = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "svc2"})).json()
    assert other["controller_id"] == cid
    second = {**current, "container_id": other["container_id"], "service_id": other["id"], "name": "two"}

    async def beat_and_look() -> Any:
        await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", headers=key,
                               json=heartbeat(cid, [current, second]))
        one = await _get(cluster, f"/api/services/{service['id']}", "health", "healthy")
        two = await _get(cluster, f"/api/services/{other['id']}", "health", "healthy")
        return (one, two) if one and two else None

    svc, svc2 = await eventually(beat_and_look, 8, "health", interval=0.1)
    assert svc["status"] == svc2["status"] == "running"

    r = await cluster.hub.post("/api/controllers/edge-new/heartbeat", headers=key,
                               json=heartbeat("edge-new", [], url="http://edge-new.test:8001"))
    assert r.status_code == 200, r.text
    joined = await eventually(lambda: _get(cluster, "/api/admin/controllers/edge-new", "status", "healthy"), 5, "join",
                              interval=0.1)
    assert joined["url"] == "http://edge-new.test:8001" and joined["last_heartbeat_at"]


async def _get(cluster: Cluster, path: str, key: str, value: Any) -> Any:
    r = await cluster.hub.get(path)
    return r.json() if r.status_code == 200 and r.json().get(key) == value else None


async def test_unreachable_controller_fails_over_and_is_fenced_on_return(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    services = [(await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": f"fo-{i}"})).json()
                for i in range(2)]
    assert {s["controller_id"] for s in services} == {cpu1}
    cluster.router.down.add(cluster.hosts[cpu1])

    async def moved() -> Any:
        now = [(await cluster.hub.get(f"/api/services/{s['id']}")).json() for s in services]
        return now if all(s["controller_id"] == cpu2 and s["status"] == "running" for s in now) else None

    now = await eventually(moved, 15, "failover to the other cpu controller", interval=0.1)
    assert all(s["epoch"] == 2 for s in now)

    async def ended() -> Any:
        # A failover's operation ends just after its service reads moved (the old copies' removal is tried first).
        ops = (await cluster.hub.get("/api/admin/operations", params={"operation": "failover"})).json()
        return ops if all(o["status"] != "running" for o in ops) else None

    ops = await eventually(ended, 5, "the failovers' operations ended", interval=0.1)
    assert sorted(o["service_id"] for o in ops) == sorted(s["id"] for s in services)
    assert all(o["status"] == "succeeded" and o["details"]["reason"] == "controller_lost" for o in ops)
    assert (await cluster.hub.get(f"/api/admin/controllers/{cpu1}")).json()["status"] == "unhealthy"
    # Both copies exist while cpu1 is cut off; the old rows say they are stale.
    rows = (await cluster.hub.get("/api/admin/containers")).json()
    assert sorted((r["controller_id"], r["status"]) for r in rows) == sorted(
        [(cpu1, "stale"), (cpu1, "stale"), (cpu2, "running"), (cpu2, "running")])

    cluster.router.down.discard(cluster.hosts[cpu1])

    async def fenced() -> bool:
        old = cluster.containers(**{"mmanager.controller": cpu1})
        rows = (await cluster.hub.get("/api/admin/containers")).json()
        return not old and all(r["status"] == "running" for r in rows) and len(rows) == 2

    await eventually(fenced, 10, "stale copies removed from the returning controller", interval=0.1)
    assert (await cluster.hub.get(f"/api/admin/controllers/{cpu1}")).json()["status"] == "healthy"


async def test_drain_hands_everything_over_and_leaves_the_controller_disabled(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    running = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "d-run"})).json()
    stopped = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "d-stop"})).json()
    await cluster.hub.post(f"/api/services/{stopped['id']}/stop")
    r = await cluster.hub.post(f"/api/admin/controllers/{cpu1}/drain")
    assert r.status_code == 200, r.text
    assert r.json()["status"] != "draining" and r.json()["enabled"] is False
    after = {s["id"]: s for s in (await cluster.hub.get("/api/services")).json()}
    assert after[running["id"]]["controller_id"] == cpu2 and after[running["id"]]["status"] == "running"
    assert after[stopped["id"]]["controller_id"] == cpu2 and after[stopped["id"]]["status"] == "stopped"
    assert not cluster.containers(**{"mmanager.controller": cpu1})
    ops = (await cluster.hub.get("/api/admin/operations", params={"controller_id": cpu1, "operation": "drain"})).json()
    assert [o["status"] for o in ops] == ["succeeded"]


async def test_delete_while_the_controller_is_away_cleans_up_when_it_returns(cluster: Cluster) -> None:
    cpu1 = cluster.controller_ids[1]
    service = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    cluster.router.down.add(cluster.hosts[cpu1])
    r = await cluster.hub.delete(f"/api/services/{service['id']}")
    assert r.status_code == 204, r.text
    assert len(cluster.containers(**{"mmanager.service": service["id"]})) == 1
    cluster.router.down.discard(cluster.hosts[cpu1])

    async def gone() -> bool:
        return not cluster.containers(**{"mmanager.service": service["id"]})

    await eventually(gone, 10, "the orphan removed", interval=0.1)


async def test_planned_move_waits_for_the_health_check(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    good = {**SPEC, "name": "hc", "health_check": {"path": "/health", "port": 5000, "interval": 1}}
    service = (await cluster.hub.post("/api/admin/repo/services", json=good)).json()
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": cpu2})
    assert r.status_code == 200, r.text
    assert r.json()["health"] == "healthy" and r.json()["controller_id"] == cpu2
    assert len(cluster.containers(**{"mmanager.service": service["id"]})) == 1

    # A new spec whose check never passes: the move gives up and the old copy keeps serving. It gives up when
    # the health timeout has passed since the new copy started: a shorter one than the fixture's, waited out.
    monkeypatch.setattr(cluster.parts.settings, "health_timeout", 3.0)
    r = await cluster.hub.patch(f"/api/services/{service['id']}",
                                json={"health_check": {"path": "/nope", "port": 5000, "interval": 1}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "HEALTH_CHECK_FAILED", r.text
    after = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert after["controller_id"] == cpu2 and after["status"] == "running"
    assert after["spec"]["health_check"]["path"] == "/health"
    copies = cluster.containers(**{"mmanager.service": service["id"]})
    assert [c.id for c in copies] == [after["container_id"]]
    async with cluster.db.session() as session:
        rows = (await session.execute(ContainerRegistryModel.__table__.select())).all()
    assert len(rows) == 1


async def test_a_service_that_stays_unhealthy_is_restarted_in_place_then_moved(cluster: Cluster) -> None:
    check = {"path": "/health", "port": 5000, "interval": 0.5, "failure_threshold": 1, "start_period": 0}
    service = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "health_check": check})).json()
    first = service["container_id"]

    async def healthy() -> Any:
        return await _get(cluster, f"/api/services/{service['id']}", "health", "healthy")

    await eventually(healthy, 10, "the first copy healthy", interval=0.1)
    # Break this copy for good: in-place restarts keep its filesystem, so they cannot cure it.
    cluster.docker.containers.get(first).exec_run(["rm", "/www/health"])

    async def moved() -> Any:
        now = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
        return now if now["container_id"] != first and now["health"] == "healthy" else None

    now = await eventually(moved, 40, "the service moved to a fresh, healthy copy", interval=0.1)
    assert now["status"] == "running" and now["epoch"] == 2
    async def move_done() -> Any:
        ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": service["id"]})).json()
        return [o for o in ops if o["operation"] == "migrate" and o["status"] != "running"]

    [move] = await eventually(move_done, 10, "the move recorded", interval=0.1)
    assert move["status"] == "succeeded" and move["details"]["reason"] == "unhealthy"
    # The broken copy was restarted in place first (max_health_restarts=3), then retired.
    await eventually(lambda: _no_copy(cluster, first), 10, "the broken copy removed", interval=0.1)


async def _no_copy(cluster: Cluster, container_id: str) -> bool:
    return not [c for c in cluster.containers() if c.id == container_id]


async def test_a_controller_registered_at_another_controllers_url_touches_nothing(cluster: Cluster) -> None:
    """An admin's typo: a second id pointing at cpu1's address. The hub must see that whoever answers
    there is not that controller, rather than take cpu1's containers for its orphans and remove them."""
    cpu1 = cluster.controller_ids[1]
    service = (await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "victim"})).json()
    assert service["controller_id"] == cpu1
    r = await cluster.hub.post("/api/admin/controllers", json={
        "id": "impostor", "url": f"http://{cluster.hosts[cpu1]}:8001", "server_type": "cpu"})
    assert r.status_code in (200, 201), r.text

    async def refused() -> Any:
        found = (await cluster.hub.get("/api/admin/controllers/impostor")).json()
        return found if found["status"] == "unhealthy" and cpu1 in (found["error"] or "") else None

    await eventually(refused, 5, "the impostor seen as not the controller at that address", interval=0.1)
    # Well past the orphan grace (2 s here): cpu1's container is still there and running.
    await asyncio.sleep(3)
    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    container.reload()
    assert container.id == service["container_id"] and container.status == "running"
    assert (await cluster.hub.get(f"/api/services/{service['id']}")).json()["status"] == "running"


async def test_a_create_refused_by_a_full_controller_goes_to_the_next_one(cluster: Cluster) -> None:
    gpu, cpu1, cpu2 = cluster.controller_ids
    cluster.router.full.add(cluster.hosts[cpu1])
    r = await cluster.hub.post("/api/admin/repo/services", json=SPEC)
    assert r.status_code == 201, r.text
    assert r.json()["controller_id"] != cpu1 and r.json()["status"] == "running"
    assert len(cluster.containers(**{"mmanager.service": r.json()["id"]})) == 1
