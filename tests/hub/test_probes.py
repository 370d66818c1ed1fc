"""Golden-inference probes through the hub's API on real PostgreSQL and the real Docker engine: a probe
needs a health check; a copy whose probe gets a wrong answer never enters the routing table and says why
in the service's status; an update to a version that answers wrong fails with that reason while the old
copies keep serving."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.hub.conftest import KEY, Cluster
from tests.hub.test_audit import heartbeat
from tests.hub.test_gateway_api import GATEWAY, routes, table_where
from tests.hub.test_replicas import ops_of, running, service
from tests.support.poll import eventually
from tests.support.probe_image import GOOD, build_probe_image, corrupt_on_restart

WRONG = 0.9871
DETAIL = f"probe /cgi-bin/predict: data.prediction: expected {GOOD}, got {WRONG}"
CHECK = {"path": "/health", "port": 5000, "interval": 1}
PROBE = {"path": "/cgi-bin/predict", "body": {"sequence": "ACGT"}, "expect": {"data": {"prediction": GOOD}},
         "tolerance": 1e-6}


@pytest.fixture
def spec(cluster: Cluster) -> dict[str, Any]:
    image = build_probe_image(cluster.docker)
    return {"name": "golden", "image": image, "ports": {"5000": None},
            "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}, "health_check": CHECK, "probe": PROBE}


async def route(cluster: Cluster, sid: str) -> dict[str, Any]:
    """The service's route; one without replicas while the table published has no route for it yet."""
    return next((r for r in (await routes(cluster))["services"] if r["id"] == sid), {"id": sid, "replicas": []})


async def test_a_probe_needs_a_health_check_and_nothing_is_written(cluster: Cluster, spec: dict[str, Any]) -> None:
    bare = {key: value for key, value in spec.items() if key != "health_check"}
    r = await cluster.hub.post("/api/admin/repo/services", json=bare)
    assert r.status_code == 422 and r.json()["error"]["code"] == "PROBE_NEEDS_HEALTH_CHECK", r.text
    assert (await cluster.hub.get("/api/services")).json() == []
    assert cluster.containers() == []
    bad = await cluster.hub.post("/api/admin/repo/services", json={**spec, "probe": {**PROBE, "path": "predict"}})
    assert bad.status_code == 422, bad.text
    # Nor can an update take the check away from a probe.
    sid = (await cluster.hub.post("/api/admin/repo/services", json=spec)).json()["id"]
    r = await cluster.hub.patch(f"/api/services/{sid}", json={"health_check": None})
    assert r.status_code == 422 and r.json()["error"]["code"] == "PROBE_NEEDS_HEALTH_CHECK", r.text
    after = await service(cluster, sid)
    assert after["version"] == 1 and after["spec"]["health_check"] is not None
    assert await ops_of(cluster, sid, "update") == []


async def test_a_create_waits_for_the_probe_and_a_wrong_answer_fails_it(cluster: Cluster,
                                                                          spec: dict[str, Any]) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json=spec)
    assert r.status_code == 201, r.text
    created = r.json()
    # Answered once the probe passed: healthy, and routed as soon as the table is published again.
    assert created["health"] == "healthy" and created["health_detail"] is None

    async def routed() -> list[str] | None:
        states = [x["state"] for x in (await route(cluster, created["id"]))["replicas"]]
        return states or None

    assert await eventually(routed, 10, "the copy routed", interval=0.1) == ["ready"]

    r = await cluster.hub.post("/api/admin/repo/services", json={**spec, "name": "garbage",
                                                                 "env": {"PREDICTION": str(WRONG)}})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "PROBE_FAILED" and DETAIL in error["message"], error
    assert error["details"]["health_detail"] == DETAIL
    # Like any failed create: no service left, its container removed, the operation failed with the reason.
    assert [s["name"] for s in (await cluster.hub.get("/api/services")).json()] == ["golden"]
    ops = (await cluster.hub.get("/api/admin/operations", params={"operation": "create"})).json()
    [failed] = [op for op in ops if op["status"] == "failed"]
    assert DETAIL in failed["error"], failed
    assert cluster.containers(**{"mmanager.service": failed["service_id"]}) == []


async def test_a_watched_create_ends_at_the_verdict_like_one_that_waits(cluster: Cluster,
                                                                         spec: dict[str, Any]) -> None:
    """``?wait=false&watch=true`` (the SDK following a create's progress): answered at once, and its operation
    ends where a create that waits answers: healthy and routed, or failed with the wrong answer and removed."""
    async def ended(op_id: str) -> dict[str, Any] | None:
        found = (await cluster.hub.get(f"/api/operations/{op_id}")).json()
        return found if found["status"] not in ("pending", "running") else None

    r = await cluster.hub.post("/api/admin/repo/services", params={"wait": "false", "watch": "true"}, json=spec)
    assert r.status_code == 202, r.text
    assert (await eventually(lambda: ended(r.json()["id"]), 30, "the create ended"))["status"] == "succeeded"
    sid = r.json()["service_id"]
    assert (await service(cluster, sid))["health"] == "healthy"

    async def routed() -> bool:
        return [x["state"] for x in (await route(cluster, sid))["replicas"]] == ["ready"]

    assert await eventually(routed, 10, "the copy routed", interval=0.1)

    r = await cluster.hub.post("/api/admin/repo/services", params={"wait": "false", "watch": "true"},
                               json={**spec, "name": "garbage", "env": {"PREDICTION": str(WRONG)}})
    assert r.status_code == 202, r.text
    failed = await eventually(lambda: ended(r.json()["id"]), 30, "the create ended")
    assert failed["status"] == "failed" and "PROBE_FAILED" in failed["error"] and DETAIL in failed["error"], failed
    assert [s["name"] for s in (await cluster.hub.get("/api/services")).json()] == ["golden"]
    assert cluster.containers(**{"mmanager.service": failed["service_id"]}) == []


async def test_a_copy_that_answers_wrong_never_serves_and_says_why(cluster: Cluster, spec: dict[str, Any]) -> None:
    # Acknowledged at once (?wait=false): the service stays, and its status says what its probe found.
    r = await cluster.hub.post("/api/admin/repo/services", params={"wait": "false"},
                               json={**spec, "env": {"PREDICTION": str(WRONG)}})
    assert r.status_code == 202, r.text
    sid = r.json()["service_id"]

    async def judged() -> dict[str, Any] | None:
        found = await service(cluster, sid)
        return found if found["health"] == "unhealthy" else None

    found = await eventually(judged, 20, "the service unhealthy", interval=0.2)
    assert found["status"] == "unhealthy" and found["health_detail"] == DETAIL
    assert [(rep["health"], rep["health_detail"]) for rep in found["replicas"]] == [("unhealthy", DETAIL)]
    # The live read says the same.
    status = (await cluster.hub.get(f"/api/services/{sid}/status")).json()
    assert (status["status"], status["health"], status["health_detail"]) == ("unhealthy", "unhealthy", DETAIL)
    assert (await route(cluster, sid))["replicas"] == []
    # Left as it is (its probe says a restart cannot help): not restarted, not moved.
    [container] = cluster.containers(**{"mmanager.service": sid})
    assert container.attrs["RestartCount"] == 0 and container.status == "running"
    # So a request at a gateway is not held for a copy that will not come: it answers 503 at once.
    woken = await cluster.hub.post(f"/api/gateway/wake/{sid}", headers=GATEWAY)
    assert woken.status_code == 200 and woken.json() == {"waking": False}, woken.text


async def test_an_update_to_a_version_that_answers_wrong_fails_and_the_old_copies_serve(
    cluster: Cluster, spec: dict[str, Any]
) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json={**spec, "replicas": 2})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    async def ready() -> dict[str, Any] | None:
        table = await route(cluster, sid)
        return table if len(table["replicas"]) == 2 and all(x["state"] == "ready" for x in table["replicas"]) else None

    before = await eventually(ready, 10, "both copies routed", interval=0.1)
    serving = running(cluster, sid)
    assert set(serving) == {x["id"] for x in before["replicas"]}

    r = await cluster.hub.patch(f"/api/services/{sid}", json={"env": {"PREDICTION": str(WRONG)}})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "PROBE_FAILED" and DETAIL in error["message"], error
    [op] = await ops_of(cluster, sid, "update")
    assert op["status"] == "failed" and DETAIL in op["error"], op
    # The old copies keep serving, routed as they were; the bad one is gone.
    after = await service(cluster, sid)
    assert after["version"] == 1 and after["status"] == "running" and after["health"] == "healthy"
    assert after["spec"]["env"] == {}
    assert running(cluster, sid) == serving
    assert await ready() is not None
    assert {x["id"] for x in (await route(cluster, sid))["replicas"]} == set(serving)


async def test_a_pushed_heartbeat_carries_the_detail_to_the_status(cluster: Cluster, spec: dict[str, Any]) -> None:
    created = (await cluster.hub.post("/api/admin/repo/services", json=spec)).json()
    sid, cid = created["id"], created["controller_id"]
    [container] = cluster.containers(**{"mmanager.service": sid})

    def beat(health: str, detail: str | None) -> dict[str, Any]:
        entry = {"container_id": container.id, "name": container.name, "service_id": sid, "epoch": created["epoch"],
                 "state": "running", "health": health, "age_seconds": 5.0,
                 "ports": {"5000/tcp": created["endpoint"]["ports"]["5000"]}}
        if detail is not None:
            entry["health_detail"] = detail
        return heartbeat(cid, containers=[entry])

    async def pushed(health: str, detail: str | None) -> dict[str, Any] | None:
        r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", json=beat(health, detail),
                                   headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        found = await service(cluster, sid)
        return found if (found["health"], found["health_detail"]) == (health, detail) else None

    found = await eventually(lambda: pushed("unhealthy", DETAIL), 10, "the detail recorded", interval=0.3)
    assert found["status"] == "unhealthy"
    await eventually(lambda: table_where(cluster, lambda t: not any(
        r["replicas"] for r in t["services"] if r["id"] == sid)), 10, "the copy out of the routing table")
    await eventually(lambda: pushed("healthy", None), 10, "the detail cleared", interval=0.3)


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-copy", "rolling"])
async def test_a_copy_restarted_onto_wrong_weights_is_never_routed(cluster: Cluster, spec: dict[str, Any],
                                                                   replicas: int) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json={**spec, "replicas": replicas})
    assert r.status_code == 201, r.text
    created = r.json()
    sid, primary = created["id"], created["container_id"]

    async def ready() -> dict[str, Any] | None:
        table = await route(cluster, sid)
        return table if len(table["replicas"]) == replicas else None

    await eventually(ready, 10, "the copies routed", interval=0.1)
    # Its weights change on disk: it answers right until it starts again.
    container = cluster.docker.containers.get(primary)
    first_start = container.attrs["State"]["StartedAt"]
    corrupt_on_restart(container, WRONG)

    routed: list[bool] = []
    restarted = asyncio.Event()

    async def watch() -> None:
        # Whether the routing table read after the copy started again has it, each time (a table published
        # before the restart began may still be the current one for a moment).
        while True:
            if cluster.docker.api.inspect_container(primary)["State"]["StartedAt"] != first_start:
                routed.append(primary in {x["id"] for x in (await route(cluster, sid))["replicas"]})
                restarted.set()
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        r = await cluster.hub.post(f"/api/services/{sid}/restart")
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "PROBE_FAILED" and DETAIL in error["message"], error
        await asyncio.wait_for(restarted.wait(), 5)
        # After it too, a few heartbeats and publishes on.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        watcher.cancel()
    # Out of the table from the moment it started again (or from the first table published since), for good.
    assert routed and not routed[-1], routed
    assert not any(routed[routed.index(False):]), routed
    found = await service(cluster, sid)
    assert (found["status"], found["health"], found["health_detail"]) == ("unhealthy", "unhealthy", DETAIL)
    by_id = {rep["id"]: rep for rep in found["replicas"]}
    assert (by_id[primary]["health"], by_id[primary]["health_detail"]) == ("unhealthy", DETAIL)
    [op] = await ops_of(cluster, sid, "restart")
    assert op["status"] == "failed" and DETAIL in op["error"], op
    # A rolling restart stops at the copy that answers wrong: the other one, not restarted, keeps serving.
    others = {x["id"] for x in (await route(cluster, sid))["replicas"]}
    assert others == set(running(cluster, sid)) - {primary}
    assert len(others) == replicas - 1
    # Its weights mended, a restart passes the probe: healthy again, and routed.
    corrupt_on_restart(cluster.docker.containers.get(primary), GOOD)
    r = await cluster.hub.post(f"/api/services/{sid}/restart")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["health"], r.json()["health_detail"]) == ("running", "healthy", None)
    await eventually(ready, 10, "every copy routed again", interval=0.1)


async def test_a_probed_service_is_not_placed_on_a_controller_that_does_not_run_probes(
    cluster: Cluster, spec: dict[str, Any]
) -> None:
    # Every controller reports as an older one does: no golden_probes among its capabilities (it would
    # ignore the probe and call a copy that computes garbage healthy after the GET alone).
    for cid in cluster.controller_ids:
        r = await cluster.hub.post(f"/api/controllers/{cid}/heartbeat", json=heartbeat(cid),
                                   headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
    await cluster.parts.ingest.flush()
    cluster.parts.services.placement.stale()
    r = await cluster.hub.post("/api/admin/repo/services", json=spec)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "NO_FEASIBLE_CONTROLLER", error
    reasons = {x["controller_id"]: (x["code"], x["reason"]) for x in error["details"]["rejections"]}
    assert reasons == {cid: ("NO_GOLDEN_PROBES", "controller does not run golden probes")
                       for cid in cluster.controller_ids}
    assert cluster.containers() == []
    # A service without a probe is placed there as before.
    bare = {key: value for key, value in spec.items() if key != "probe"}
    r = await cluster.hub.post("/api/admin/repo/services", json={**bare, "name": "plain"})
    assert r.status_code == 201, r.text
