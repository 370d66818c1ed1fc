"""GPU selection and sharing through the services API (issue 25), on real PostgreSQL with controllers on the
real Docker engine (the GPU controller's inventory is ``GPU_DEVICES``: two A100s of 80 GiB)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from examples.images import EXAMPLE_IMAGE
from hub.models import ContainerRegistryModel, ServiceModel
from hub.scheduler.snapshot import load_views
from tests.hub.conftest import Cluster

GIB = 1024**3
SPEC = {"name": "dnabert2", "image": EXAMPLE_IMAGE, "resources": {"memory_limit": "64MB"}}


async def counts(cluster: Cluster) -> tuple[int, int]:
    async with cluster.db.session() as session:
        services = await session.scalar(select(func.count()).select_from(ServiceModel))
        registry = await session.scalar(select(func.count()).select_from(ContainerRegistryModel))
    return services or 0, registry or 0


@pytest.mark.parametrize(("resources", "error_type"), [
    ({"gpu_memory": "8GB", "gpu_count": 1}, "gpu_memory_with_gpu_count"),
    ({"gpu_memory": "8GB", "gpu_count": 2}, "gpu_memory_with_gpu_count"),
    ({"gpu_memory": "1MB"}, "gpu_memory_too_small"),
    ({"gpu_min_memory": "4TB"}, "gpu_memory_too_large"),
    ({"gpu_memory": "lots"}, "value_error"),
    ({"gpu_model": "A100; rm -rf"}, "string_pattern_mismatch"),
])
async def test_gpu_asks_that_cannot_be_are_refused(cluster: Cluster, resources: dict, error_type: str) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "resources": resources})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error_type in [p["type"] for p in error["details"]], error
    assert await counts(cluster) == (0, 0)


async def test_shared_services_pack_onto_one_gpu_and_whole_asks_keep_apart(cluster: Cluster) -> None:
    gpu_controller = cluster.controller_ids[0]
    ids = []
    for name in ("a", "b"):
        r = await cluster.hub.post("/api/admin/models/services",
                                   json={**SPEC, "name": name, "resources": {"gpu_memory": "8GB", "memory_limit": "64MB"}})
        assert r.status_code == 201, r.text
        assert r.json()["controller_id"] == gpu_controller
        ids.append(r.json()["id"])
    devices = set()
    for sid in ids:
        [container] = cluster.containers(**{"mmanager.service": sid})
        env = container.attrs["Config"]["Env"]
        assert f"MMANAGER_GPU_MEMORY_BYTES={8 * GIB}" in env
        devices.add(container.attrs["Config"]["Labels"]["mmanager.gpus"])
    assert len(devices) == 1  # best fit: the second joins the first's GPU
    [shared] = devices

    views, _ = await load_views(cluster.db)
    view = {v.id: v for v in views}[gpu_controller]
    assert dict(view.gpu_shared) == {shared: 16 * GIB} and not view.gpus_used
    assert view.gpu_models == ("A100", "A100") and view.gpu_memory == (80 * GIB, 80 * GIB)

    # Two whole GPUs: one has shared tenants, so no.
    r = await cluster.hub.post("/api/admin/models/services", json={**SPEC, "name": "w2", "resources": {"gpu_count": 2}})
    assert r.status_code == 409
    reasons = {x["controller_id"]: x["code"] for x in r.json()["error"]["details"]["rejections"]}
    assert reasons[gpu_controller] == "GPUS"
    # One whole GPU: the other one.
    r = await cluster.hub.post("/api/admin/models/services",
                               json={**SPEC, "name": "w1", "resources": {"gpu_count": 1, "gpu_model": "a100"}})
    assert r.status_code == 201, r.text
    [container] = cluster.containers(**{"mmanager.service": r.json()["id"]})
    assert container.attrs["Config"]["Labels"]["mmanager.gpus"] != shared
    assert "mmanager.gpu_memory" not in container.attrs["Config"]["Labels"]
    # A model the fleet does not have, and a share where nothing is left.
    r = await cluster.hub.post("/api/admin/models/services",
                               json={**SPEC, "name": "h", "resources": {"gpu_model": "H100"}})
    assert r.status_code == 409
    reasons = {x["controller_id"]: x["code"] for x in r.json()["error"]["details"]["rejections"]}
    assert reasons[gpu_controller] == "GPU_MODEL"
    r = await cluster.hub.post("/api/admin/models/services",
                               json={**SPEC, "name": "big", "resources": {"gpu_memory": "70GB"}})
    assert r.status_code == 409
    reasons = {x["controller_id"]: x["code"] for x in r.json()["error"]["details"]["rejections"]}
    assert reasons[gpu_controller] == "NO_SHARED_GPU"
