"""The gateways' side of the hub on real PostgreSQL and Docker: the routing table follows the services,
gateways report themselves and give services their URL, and private services' keys are kept hashed."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from typing import Any

from hub.background.gateway import IdleWatch
from hub.config import HubSettings
from hub.models import utcnow
from tests.hub.conftest import KEY, Cluster
from tests.hub.test_services_api import SPEC
from tests.support.poll import eventually

GATEWAY = {"Authorization": f"Bearer {KEY}"}


async def routes(cluster: Cluster, headers: dict[str, str] = GATEWAY) -> dict[str, Any]:
    r = await cluster.hub.get("/api/gateway/routes", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == f'"{r.json()["version"]}"'
    return r.json()


async def table_where(cluster: Cluster, check: Any) -> dict[str, Any] | None:
    table = await routes(cluster)
    return table if check(table) else None


async def route_of(cluster: Cluster, name: str, check: Any = lambda route: True) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        for route in (await routes(cluster))["services"]:
            if route["name"] == name and check(route):
                return route
        return None
    return await eventually(found, 10, f"the route of {name} as expected", interval=0.05)


async def test_the_routing_table_follows_the_service(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    r = await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)
    assert r.status_code == 201, r.text
    service = r.json()
    # Ready once the hub has seen its check pass ("starting" until then: the gateway checks it first).
    route = await route_of(cluster, "dnabert2", lambda route: route["replicas"] and route["replicas"][0]["state"] == "ready")
    endpoint = service["endpoint"]
    assert route["owner"] == "alice" and route["id"] == service["id"] and route["health_path"] == "/health"
    assert route["replicas"] == [{"id": service["container_id"], "controller_id": service["controller_id"],
                                  "address": f"{endpoint['host']}:{endpoint['ports']['5000']}", "state": "ready"}]

    table = await routes(cluster)
    unchanged = await cluster.hub.get("/api/gateway/routes", headers={**GATEWAY, "If-None-Match": f'"{table["version"]}"'})
    assert unchanged.status_code == 304

    assert (await cluster.hub.post(f"/api/services/{service['id']}/stop", headers=alice)).status_code == 200
    await route_of(cluster, "dnabert2", lambda route: not route["replicas"] and route["state"] == "stopped")
    assert (await routes(cluster))["version"] > table["version"]

    assert (await cluster.hub.delete(f"/api/services/{service['id']}", headers=alice)).status_code in (200, 204)
    await eventually(lambda: table_where(cluster, lambda table: not table["services"]), 10,
                     "the service's route gone", interval=0.05)


async def test_only_the_hub_key_or_an_admin_reads_the_table(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    assert (await cluster.hub.get("/api/gateway/routes", headers=alice)).status_code == 403
    assert (await cluster.hub.get("/api/gateway/routes", headers={"Authorization": "Bearer nope"})).status_code == 401
    await routes(cluster, headers=cluster.as_user(cluster.admin_token))
    r = await cluster.hub.put("/api/gateways/gw-1", json={"url": "http://gw.lab:8080", "version": 1}, headers=alice)
    assert r.status_code == 403


async def test_a_live_gateway_gives_services_their_url(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    service = (await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)).json()
    assert service["url"].startswith("http://127.0.0.1:") or service["url"].startswith("http://")
    for bad in ({"url": "gw.lab", "version": 1}, {"url": "http://gw.lab", "version": -1}, {"url": "http://gw.lab"}):
        r = await cluster.hub.put("/api/gateways/gw-1", json=bad, headers=GATEWAY)
        assert r.status_code == 422, bad
    r = await cluster.hub.put("/api/gateways/gw-1", json={"url": "http://gw.lab:8080/", "version": 3}, headers=GATEWAY)
    assert r.status_code == 204, r.text
    await cluster.parts.gateways.refresh()
    read = (await cluster.hub.get(f"/api/services/{service['id']}", headers=alice)).json()
    assert read["url"] == "http://gw.lab:8080/s/alice/dnabert2/"
    listed = (await cluster.hub.get("/api/admin/gateways")).json()
    assert [(g["id"], g["url"], g["version"]) for g in listed] == [("gw-1", "http://gw.lab:8080/", 3)]


def test_an_empty_gateway_url_is_unset() -> None:
    assert HubSettings(gateway_url="", service_domain="", api_key=KEY).gateway_url is None


async def test_private_services_keys_are_shown_once_and_routed_as_hashes(cluster: Cluster) -> None:
    alice, bob = await cluster.user("alice"), await cluster.user("bob")
    service = (await cluster.hub.post("/api/alice/genomics/services", json=SPEC, headers=alice)).json()
    sid = service["id"]
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"private": True, "rate_limit_per_minute": 600},
                                headers=alice)
    assert r.status_code == 200, r.text
    # A gateway setting changes no container and makes no new version.
    patched = r.json()
    assert (patched["container_id"], patched["version"]) == (service["container_id"], service["version"])
    assert patched["spec"]["private"] is True
    history = (await cluster.hub.get("/api/admin/operations", params={"service_id": sid, "operation": "update"})).json()
    assert [(op["status"], op["details"]) for op in history] == [
        ("succeeded", {"gateway": {"private": True, "rate_limit_per_minute": 600}})]
    await route_of(cluster, "dnabert2", lambda route: route["private"] and route["rate_limit_per_minute"] == 600)

    r = await cluster.hub.post(f"/api/services/{sid}/keys", json={"name": "ci"}, headers=alice)
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("mms_") and created["prefix"] == key[:8]
    digest = hashlib.sha256(key.encode()).hexdigest()
    await eventually(lambda: table_where(cluster, lambda t: t["service_keys"] == [{"service_id": sid, "sha256": digest}]),
                     10, "the key's hash in the table", interval=0.05)
    listed = (await cluster.hub.get(f"/api/services/{sid}/keys", headers=alice)).json()
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert key not in (await cluster.hub.get("/api/gateway/routes", headers=GATEWAY)).text

    # Another user's service does not exist for bob, nor its keys.
    assert (await cluster.hub.post(f"/api/services/{sid}/keys", headers=bob)).status_code == 404
    assert (await cluster.hub.get(f"/api/services/{sid}/keys", headers=bob)).status_code == 404
    assert (await cluster.hub.delete(f"/api/services/{sid}/keys/{created['id']}", headers=bob)).status_code == 404
    for bad in ({"rate_limit_per_minute": -1}, {"max_body_size": "2GB"}, {"private": "maybe"}):
        assert (await cluster.hub.patch(f"/api/services/{sid}", json=bad, headers=alice)).status_code == 422

    assert (await cluster.hub.delete(f"/api/services/{sid}/keys/{created['id']}", headers=alice)).status_code == 204
    assert (await cluster.hub.delete(f"/api/services/{sid}/keys/{created['id']}", headers=alice)).status_code == 404
    await eventually(lambda: table_where(cluster, lambda t: t["service_keys"] == []), 10, "the key's hash gone",
                     interval=0.05)


async def test_a_move_removes_the_old_copy_only_once_the_gateways_route_past_it(cluster: Cluster) -> None:
    service = (await cluster.hub.post("/api/admin/repo/services", json=SPEC)).json()
    old = service["container_id"]
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()
    live = await routes(cluster)
    assert (await cluster.hub.put("/api/gateways/gw-1", json={"url": "http://gw.lab:8080", "version": live["version"]},
                                  headers=GATEWAY)).status_code == 204
    target = cluster.controller_ids[2]
    move = asyncio.create_task(cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate",
                                                json={"target_controller": target, "leave_volumes": True}))
    route = await route_of(cluster, "dnabert2", lambda route: route["replicas"] and route["replicas"][0]["id"] != old)
    new = route["replicas"][0]["id"]
    version = (await routes(cluster))["version"]
    # The gateway has not applied the table that routes past the old copy: the old copy stays.
    await asyncio.sleep(0)
    assert not move.done()
    present = {c.id for c in cluster.containers(**{"mmanager.service": service["id"]})}
    assert old in present, (old, new, present, route)
    assert (await cluster.hub.put("/api/gateways/gw-1", json={"url": "http://gw.lab:8080", "version": version},
                                  headers=GATEWAY)).status_code == 204
    moved = await asyncio.wait_for(move, 10)
    assert moved.status_code == 200, moved.text
    assert [c.id for c in cluster.containers(**{"mmanager.service": service["id"]})] == [new]
    [op] = (await cluster.hub.get("/api/admin/operations",
                                  params={"service_id": service["id"], "operation": "migrate"})).json()
    assert op["details"]["gateways_drained"] is True


async def report(cluster: Cluster, traffic: dict[str, int], version: int = 0) -> None:
    r = await cluster.hub.put("/api/gateways/gw-1", headers=GATEWAY,
                              json={"url": "http://gw.lab:8080", "version": version, "traffic": traffic})
    assert r.status_code == 204, r.text


async def applying(cluster: Cluster, traffic: dict[str, int]) -> None:
    """gw-1's beat as a live gateway sends it: the routing table's newest version applied, so that a stop
    waiting for the gateways to route past a copy goes on at once."""
    await report(cluster, traffic, (await routes(cluster))["version"])


async def while_applying(cluster: Cluster, call: Any, traffic: dict[str, int]) -> Any:
    """``call``'s response, awaited while gw-1 beats as a live gateway does."""
    task = asyncio.ensure_future(call)
    while not task.done():
        await applying(cluster, traffic)
        await asyncio.wait({task}, timeout=0.05)
    return task.result()


async def test_a_service_without_gateway_traffic_goes_idle_and_a_request_wakes_it(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    service = (await cluster.hub.post("/api/alice/genomics/services", json={**SPEC, "idle_timeout": 2},
                                      headers=alice)).json()
    sid = service["id"]
    # Traffic that keeps flowing keeps it running, however long.
    for requests in range(1, 12):
        await report(cluster, {sid: requests})
        await asyncio.sleep(0.3)
        assert (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).json()["status"] == "running"

    # The gateway beats on, its count unchanged, and applies the table without the stopped copy.
    async def idle() -> dict[str, Any] | None:
        await applying(cluster, {sid: 11})
        return await service_where(cluster, sid, lambda s: s["status"] == "idle")

    idle = await eventually(idle, 15, "the service idle", interval=0.1)
    assert idle["desired_state"] == "stopped" and idle["endpoint"] is None
    assert cluster.docker.containers.get(service["container_id"]).status == "exited"
    route = await route_of(cluster, "dnabert2", lambda route: route["state"] == "idle")
    assert route["replicas"] == []
    # Heartbeats see an exited container: the service stays idle, not stopped.
    await cluster.parts.refresh_controllers()
    assert (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).json()["status"] == "idle"

    # A user cannot wake it through the gateway's route; the gateway can, once.
    assert (await cluster.hub.post(f"/api/gateway/wake/{sid}", headers=alice)).status_code == 403
    r = await cluster.hub.post(f"/api/gateway/wake/{sid}", headers=GATEWAY)
    assert r.status_code == 202 and r.json()["waking"] is True, r.text
    # Another gateway asking while it wakes holds its requests too, and starts nothing more.
    meanwhile = await cluster.hub.post(f"/api/gateway/wake/{sid}", headers=GATEWAY)
    assert meanwhile.status_code == 202 and meanwhile.json() == {"waking": False, "replacing": True, "hold": 5.0}
    awake = await eventually(lambda: service_where(cluster, sid, lambda s: s["status"] == "running"), 15,
                             "the service running again", interval=0.1)
    assert awake["desired_state"] == "running" and awake["container_id"] == service["container_id"]
    # A leader that last judged it before it went idle (its traffic unchanged since, for longer than the
    # timeout) does not stop it again: the wake is activity.
    watch = IdleWatch(cluster.db, cluster.parts.services, cluster.parts.settings)
    watch._seen[sid] = (11, utcnow() - timedelta(hours=1))
    await report(cluster, {sid: 11})
    await watch.run_once()
    assert not watch._stopping and sid in watch._seen
    # Running: a gateway that found no replica for it (a copy lost before the hub knew) may hold requests.
    again = await cluster.hub.post(f"/api/gateway/wake/{sid}", headers=GATEWAY)
    assert again.status_code == 202 and again.json() == {"waking": False, "replacing": True, "hold": 5.0}
    # Stopped by its owner: no request may start it, nor wait for it.
    stop = cluster.hub.post(f"/api/services/{sid}/stop", headers=alice)
    assert (await while_applying(cluster, stop, {sid: 11})).status_code == 200
    stopped = await cluster.hub.post(f"/api/gateway/wake/{sid}", headers=GATEWAY)
    assert stopped.status_code == 200 and stopped.json() == {"waking": False}
    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": sid})).json()
    assert [(op["operation"], op["status"], op["actor"]) for op in ops if op["operation"] in ("idle_stop", "wake")] \
        == [("wake", "succeeded", "gateway"), ("idle_stop", "succeeded", "system")]
    assert (await cluster.hub.post("/api/gateway/wake/nope", headers=GATEWAY)).status_code == 404


async def service_where(cluster: Cluster, sid: str, check: Any) -> dict[str, Any] | None:
    service = (await cluster.hub.get(f"/api/services/{sid}")).json()
    return service if check(service) else None
