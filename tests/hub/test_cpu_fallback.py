"""CPU fallback on real PostgreSQL with controllers on the real Docker engine (the GPU controller's inventory
is ``GPU_DEVICES``: two A100s): a GPU service that finds no GPU runs its CPU variant, says why, and moves
back to a GPU by a planned move once one is free."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from sqlalchemy import update

from examples.images import EXAMPLE_IMAGE
from hub.models import ServiceModel
from tests.hub.conftest import Cluster
from tests.support.poll import eventually

CHECK = {"path": "/health", "port": 5000, "interval": 1}
HOG = {"name": "hog", "image": EXAMPLE_IMAGE, "resources": {"gpu_count": 2, "memory_limit": "64MB"}}
# Holds the GPU the service does not: the GPU controller (two GPUs) is then full.
ONE_GPU_HOG = {**HOG, "resources": {"gpu_count": 1, "memory_limit": "64MB"}}


@pytest.fixture
def cpu_image(docker_client: docker.DockerClient, example_image: str) -> Iterator[str]:
    """The CPU variant's image: the example model under a tag of its own (so the variant shows by its image)."""
    tag = f"mm-cpu-variant:{uuid.uuid4().hex[:8]}"
    docker_client.images.get(example_image).tag(tag)
    yield tag
    docker_client.images.remove(tag, noprune=True)


def fallback_spec(cpu_image: str, **more: Any) -> dict[str, Any]:
    return {"name": "dnabert2", "image": EXAMPLE_IMAGE, "health_check": CHECK,
            "resources": {"gpu_count": 1, "memory_limit": "64MB"},
            "cpu_fallback": {"image": cpu_image, "resources": {"memory_limit": "64MB", "cpu_limit": 0.5}}, **more}


async def test_no_gpu_runs_the_cpu_variant_then_moves_back_when_one_frees(cluster: Cluster, cpu_image: str) -> None:
    gpu_controller = cluster.controller_ids[0]
    hog = await cluster.hub.post("/api/admin/repo/services", json=HOG)
    assert hog.status_code == 201, hog.text
    assert hog.json()["variant"] == "main"

    r = await cluster.hub.post("/api/admin/repo/services", json=fallback_spec(cpu_image))
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["variant"] == "cpu_fallback" and service["controller_id"] != gpu_controller
    assert service["replicas"][0]["variant"] == "cpu_fallback"
    assert service["spec"]["cpu_fallback"]["image"] == cpu_image
    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    assert container.attrs["Config"]["Image"] == cpu_image
    assert "mmanager.gpus" not in container.attrs["Config"]["Labels"]
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    [create] = (await cluster.hub.get("/api/admin/operations",
                                      params={"service_id": service["id"], "operation": "create"})).json()
    assert create["status"] == "succeeded"
    assert create["details"]["fallback"] == "cpu" and "GPUS" in create["details"]["fallback_reason"]
    assert {x["controller_id"]: x["code"] for x in create["details"]["gpu_rejections"]}[gpu_controller] == "GPUS"

    # The GPU hog goes: the leader's loop moves the service back to a GPU, healthy before the CPU copy goes.
    assert (await cluster.hub.delete(f"/api/services/{hog.json()['id']}")).status_code == 204

    async def back() -> dict[str, Any] | None:
        read = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
        return read if read["variant"] == "main" and read["status"] == "running" else None

    moved = await eventually(back, 60, "the service back on a GPU", interval=0.2)
    assert moved["controller_id"] == gpu_controller and moved["health"] == "healthy"

    async def ended() -> dict[str, Any] | None:
        ops = (await cluster.hub.get("/api/admin/operations",
                                     params={"service_id": service["id"], "operation": "migrate"})).json()
        return ops[0] if len(ops) == 1 and ops[0]["status"] not in ("pending", "running") else None

    op = await eventually(ended, 30, "the move back's operation ended", interval=0.2)
    assert op["status"] == "succeeded" and op["actor"] == "system"
    assert op["details"]["reason"] == "gpu_free" and op["details"]["from_variant"] == "cpu_fallback"
    assert op["details"]["to_controller"] == gpu_controller
    assert op["details"]["old_containers_removed"] == 1

    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    assert container.attrs["Config"]["Image"] == EXAMPLE_IMAGE
    assert container.attrs["Config"]["Labels"]["mmanager.gpus"] in ("0", "1")


async def test_without_a_fallback_or_a_place_for_it_nothing_is_made(cluster: Cluster, cpu_image: str) -> None:
    assert (await cluster.hub.post("/api/admin/repo/services", json=HOG)).status_code == 201
    # No fallback: refused with the GPU reasons, as before.
    plain = {k: v for k, v in fallback_spec(cpu_image).items() if k != "cpu_fallback"}
    r = await cluster.hub.post("/api/admin/repo/services", json=plain)
    assert r.status_code == 409 and r.json()["error"]["code"] == "NO_FEASIBLE_CONTROLLER"
    # A fallback too large for any server: both sets of reasons.
    big = fallback_spec(cpu_image)
    big["cpu_fallback"]["resources"]["memory_limit"] = "4TB"
    r = await cluster.hub.post("/api/admin/repo/services", json=big)
    assert r.status_code == 409, r.text
    details = r.json()["error"]["details"]
    assert {x["code"] for x in details["cpu_fallback_rejections"]} == {"MEMORY"}
    services = (await cluster.hub.get("/api/services")).json()
    assert [s["name"] for s in services] == ["hog"]


@pytest.mark.parametrize(("change", "error_type"), [
    ({"resources": {"memory_limit": "64MB"}}, "cpu_fallback_without_gpu"),
    ({"cpu_fallback": {"image": "x", "resources": {"gpu_count": 1}}}, "cpu_fallback_gpu"),
    ({"health_check": None}, "cpu_fallback_needs_health_check"),
])
async def test_a_fallback_that_cannot_be_is_refused(cluster: Cluster, cpu_image: str, change: dict,
                                                    error_type: str) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json={**fallback_spec(cpu_image), **change})
    assert r.status_code == 422, r.text
    assert error_type in [p["type"] for p in r.json()["error"]["details"]]
    assert (await cluster.hub.get("/api/services")).json() == []


async def _on_gpu_with_the_other_gpu_held(cluster: Cluster, cpu_image: str) -> dict[str, Any]:
    r = await cluster.hub.post("/api/admin/repo/services", json=fallback_spec(cpu_image))
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["variant"] == "main" and service["controller_id"] == cluster.controller_ids[0]
    assert (await cluster.hub.post("/api/admin/repo/services", json=ONE_GPU_HOG)).status_code == 201
    return service


async def _still_on_its_gpu(cluster: Cluster, service: dict[str, Any]) -> None:
    read = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert (read["variant"], read["controller_id"], read["container_id"], read["status"]) == (
        "main", service["controller_id"], service["container_id"], "running")
    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    assert container.attrs["Config"]["Image"] == EXAMPLE_IMAGE


async def test_an_update_of_a_gpu_copy_never_takes_the_fallback(cluster: Cluster, cpu_image: str) -> None:
    """The old copy holds its GPU until the new one is healthy: with no other GPU free the update is refused
    as it was before fallbacks, not run for a while on the CPU and moved back."""
    service = await _on_gpu_with_the_other_gpu_held(cluster, cpu_image)
    r = await cluster.hub.patch(f"/api/services/{service['id']}", json={"env": {"V": "2"}})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "NO_FEASIBLE_CONTROLLER"
    await _still_on_its_gpu(cluster, service)
    ops = (await cluster.hub.get("/api/admin/operations", params={"service_id": service["id"]})).json()
    assert "fallback" not in str([op["details"] for op in ops])


async def test_a_move_of_a_gpu_copy_never_takes_the_fallback(cluster: Cluster, cpu_image: str) -> None:
    service = await _on_gpu_with_the_other_gpu_held(cluster, cpu_image)
    [entry] = (await cluster.hub.get("/api/admin/containers", params={"service_id": service["id"]})).json()
    # Anywhere else: no GPU is free, so nowhere.
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate")
    assert r.status_code == 409 and r.json()["error"]["code"] == "NO_FEASIBLE_CONTROLLER", r.text
    # Onto a named CPU server: refused too.
    cpu = cluster.controller_ids[1]
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": cpu})
    assert r.status_code == 409 and r.json()["error"]["code"] == "NO_FEASIBLE_CONTROLLER", r.text
    await _still_on_its_gpu(cluster, service)


async def test_a_move_to_a_named_controller_never_takes_the_fallback(cluster: Cluster, cpu_image: str) -> None:
    """A copy already on its fallback, moved to a named server: the user named where the service runs, not
    a variant of it, so it is refused with the reason rather than run there as the fallback."""
    assert (await cluster.hub.post("/api/admin/repo/services", json=HOG)).status_code == 201
    service = (await cluster.hub.post("/api/admin/repo/services", json=fallback_spec(cpu_image))).json()
    assert service["variant"] == "cpu_fallback"
    [entry] = (await cluster.hub.get("/api/admin/containers", params={"service_id": service["id"]})).json()
    other = next(c for c in cluster.controller_ids[1:] if c != service["controller_id"])
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": other})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "NO_FEASIBLE_CONTROLLER" and "never takes the CPU fallback" in error["message"]
    assert error["details"]["cpu_fallback"] == "not for a named controller"
    read = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert (read["controller_id"], read["container_id"]) == (service["controller_id"], service["container_id"])


async def test_the_fallback_image_obeys_the_image_allow_list(cluster: Cluster, cpu_image: str) -> None:
    cluster.parts.settings.allowed_images = [EXAMPLE_IMAGE.rsplit(":", 1)[0]]
    r = await cluster.hub.post("/api/admin/repo/services", json=fallback_spec(cpu_image))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["details"] == {"field": "cpu_fallback.image", "rule": "image"}
    assert (await cluster.hub.get("/api/services")).json() == []
    allowed = fallback_spec(EXAMPLE_IMAGE)
    r = await cluster.hub.post("/api/admin/repo/services", json=allowed)
    assert r.status_code == 201, r.text
    service = r.json()
    r = await cluster.hub.patch(f"/api/services/{service['id']}",
                                json={"cpu_fallback": {"image": cpu_image, "resources": {}}})
    assert r.status_code == 403 and r.json()["error"]["details"]["field"] == "cpu_fallback.image", r.text
    read = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert read["version"] == service["version"] and read["spec"]["cpu_fallback"]["image"] == EXAMPLE_IMAGE


async def test_the_fallback_env_goes_over_the_services(cluster: Cluster, cpu_image: str) -> None:
    assert (await cluster.hub.post("/api/admin/repo/services", json=HOG)).status_code == 201
    spec = fallback_spec(cpu_image, env={"MODE": "gpu", "KEEP": "1"})
    spec["cpu_fallback"]["env"] = {"MODE": "cpu"}
    r = await cluster.hub.post("/api/admin/repo/services", json=spec)
    assert r.status_code == 201 and r.json()["variant"] == "cpu_fallback", r.text
    [container] = cluster.containers(**{"mmanager.service": r.json()["id"]})
    env = container.attrs["Config"]["Env"]
    assert "MODE=cpu" in env and "KEEP=1" in env and "MODE=gpu" not in env
    # A GPU variable in the fallback's env is refused as in the service's own.
    bad = fallback_spec(cpu_image, name="other")
    bad["cpu_fallback"]["env"] = {"NVIDIA_VISIBLE_DEVICES": "all"}
    r = await cluster.hub.post("/api/admin/repo/services", json=bad)
    assert r.status_code == 403 and r.json()["error"]["details"]["field"] == "cpu_fallback.env.NVIDIA_VISIBLE_DEVICES"


async def test_a_cpu_copy_whose_spec_lost_its_fallback_still_moves_back(cluster: Cluster, cpu_image: str) -> None:
    """A copy on the CPU under a spec that no longer names a fallback (what a partial rolling update or
    a cleared cpu_fallback leaves): it reads as on its fallback, and goes back to a GPU once one frees."""
    hog = (await cluster.hub.post("/api/admin/repo/services", json=HOG)).json()
    service = (await cluster.hub.post("/api/admin/repo/services", json=fallback_spec(cpu_image))).json()
    assert service["variant"] == "cpu_fallback"
    spec = {k: v for k, v in service["spec"].items() if k != "cpu_fallback"}
    async with cluster.db.session() as session:
        await session.execute(update(ServiceModel).where(ServiceModel.id == service["id"]).values(spec=spec))
    read = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert "cpu_fallback" not in read["spec"]
    assert read["variant"] == "cpu_fallback" and read["replicas"][0]["variant"] == "cpu_fallback"

    assert (await cluster.hub.delete(f"/api/services/{hog['id']}")).status_code == 204

    async def back() -> dict[str, Any] | None:
        now = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
        return now if now["variant"] == "main" and now["status"] == "running" else None

    moved = await eventually(back, 60, "the service back on a GPU", interval=0.2)
    assert moved["controller_id"] == cluster.controller_ids[0] and moved["health"] == "healthy"


async def test_no_move_back_while_an_update_rolls(cluster: Cluster, cpu_image: str) -> None:
    """The update replaces the copy itself: a move back beside it would race it for the same copy."""
    hog = (await cluster.hub.post("/api/admin/repo/services", json=HOG)).json()
    service = (await cluster.hub.post("/api/admin/repo/services", json=fallback_spec(cpu_image))).json()
    [entry] = (await cluster.hub.get("/api/admin/containers", params={"service_id": service["id"]})).json()
    # An update of this hub's that is rolling (its operation begun, its replace not yet at the copy).
    rolling = await cluster.parts.ops.begin("update", "admin", service_id=service["id"])
    assert (await cluster.hub.delete(f"/api/services/{hog['id']}")).status_code == 204

    assert await cluster.parts.services.back_to_gpu(service["id"], entry["id"]) is None
    migrates = (await cluster.hub.get("/api/admin/operations",
                                      params={"service_id": service["id"], "operation": "migrate"})).json()
    assert migrates == []
    assert (await cluster.hub.get(f"/api/services/{service['id']}")).json()["variant"] == "cpu_fallback"

    await cluster.parts.ops.finish(rolling)
    moved = await cluster.parts.services.back_to_gpu(service["id"], entry["id"])
    if moved is None:  # the leader's own look got there first
        moved = await eventually(
            lambda: _on_gpu(cluster, service["id"]), 60, "the service back on a GPU", interval=0.2)
    read = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert read["variant"] == "main" and read["controller_id"] == cluster.controller_ids[0]


async def _on_gpu(cluster: Cluster, service_id: str) -> dict[str, Any] | None:
    read = (await cluster.hub.get(f"/api/services/{service_id}")).json()
    return read if read["variant"] == "main" and read["status"] == "running" else None
