"""The spec policy through the hub's API, with real controllers on the real Docker engine: hostile
specs are refused before anything is written, and every managed container is hardened."""

from __future__ import annotations

import docker
import httpx
from sqlalchemy import func, select

from examples.images import EXAMPLE_IMAGE
from hub.models import ContainerRegistryModel, OperationModel, ServiceModel
from mmanager.policy import ALLOWED_CAPABILITIES
from tests.hostile_specs import CORPUS
from tests.hub.conftest import KEY, Cluster

LEGIT = {"name": "legit", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
         "resources": {"cpu_limit": 0.25, "memory_limit": "64MB"}}


async def written(cluster: Cluster) -> tuple[int, int, int]:
    """Services, registry rows and operations in the database."""
    async with cluster.db.session() as session:
        return tuple([
            await session.scalar(select(func.count()).select_from(model)) or 0
            for model in (ServiceModel, ContainerRegistryModel, OperationModel)
        ])


async def test_every_hostile_spec_is_refused_and_nothing_is_written(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    problems = []
    for case in CORPUS:
        response = await cluster.hub.post("/api/alice/r/services", json=case.hub_body(EXAMPLE_IMAGE), headers=alice)
        problems.append(case.refusal_problem(response, case.hub_expect))
    assert [p for p in problems if p] == []
    assert await written(cluster) == (0, 0, 0)
    assert cluster.containers() == []
    assert (await cluster.hub.get("/api/services", headers=alice)).json() == []
    # And each refusal is in the audit log: who, what, with the code she got.
    audit = (await cluster.hub.get("/api/admin/audit", params={"actor": "alice", "result": "refused",
                                                               "limit": 1000})).json()
    assert sorted((e["method"], e["status_code"], e["error_code"]) for e in audit) == sorted(
        ("POST", *case.hub_expect) for case in CORPUS)
    assert {e["path"] for e in audit} == {"/api/alice/r/services"}


async def test_a_hostile_patch_changes_nothing(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    created = await cluster.hub.post("/api/alice/r/services", json=LEGIT, headers=alice)
    assert created.status_code == 201, created.text
    service = created.json()
    before = await written(cluster)
    problems = []
    for case in CORPUS:
        response = await cluster.hub.patch(f"/api/services/{service['id']}", json=case.hub, headers=alice)
        problems.append(case.refusal_problem(response, case.hub_expect))
    assert [p for p in problems if p] == []
    assert await written(cluster) == before
    after = (await cluster.hub.get(f"/api/services/{service['id']}", headers=alice)).json()
    assert (after["version"], after["container_id"], after["spec"]) == (1, service["container_id"], service["spec"])
    [container] = cluster.containers()
    assert container.id == service["container_id"]


async def test_image_allow_list_covers_create_and_rollback(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    created = (await cluster.hub.post("/api/alice/r/services", json=LEGIT, headers=alice)).json()
    patched = await cluster.hub.patch(f"/api/services/{created['id']}", json={"env": {"V": "2"}}, headers=alice)
    assert patched.status_code == 200 and patched.json()["version"] == 2
    before = await written(cluster)

    # What MMANAGER_ALLOWED_IMAGES sets: from now on only the lab's registry.
    cluster.parts.settings.allowed_images = ["ghcr.io/lab"]
    refused = await cluster.hub.post("/api/alice/r/services", json={**LEGIT, "name": "other"}, headers=alice)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["details"] == {"field": "image", "rule": "image"}
    rollback = await cluster.hub.post(f"/api/services/{created['id']}/rollback", json={"version": 1}, headers=alice)
    assert rollback.status_code == 403 and rollback.json()["error"]["code"] == "SPEC_FORBIDDEN"
    assert await written(cluster) == before
    assert (await cluster.hub.get(f"/api/services/{created['id']}", headers=alice)).json()["version"] == 2

    cluster.parts.settings.allowed_images = ["ghcr.io/lab", EXAMPLE_IMAGE.rsplit(":", 1)[0]]
    allowed = await cluster.hub.post("/api/alice/r/services", json={**LEGIT, "name": "other"}, headers=alice)
    assert allowed.status_code == 201, allowed.text


async def test_a_controller_stricter_than_the_hub_refuses_and_nothing_is_left(cluster: Cluster) -> None:
    """The hub allows a host path its controllers do not: the controllers' refusal reaches the caller."""
    alice = await cluster.user("alice")
    cluster.parts.settings.allowed_host_paths = ["/srv/datasets"]
    spec = {**LEGIT, "volumes": {"/srv/datasets/genomes": "/data"}}
    response = await cluster.hub.post("/api/alice/r/services", json=spec, headers=alice)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["details"] == {"field": "volumes./srv/datasets/genomes", "rule": "host_path"}
    services, registry, _ = await written(cluster)
    assert (services, registry) == (0, 0)
    assert cluster.containers() == []
    async with cluster.db.session() as session:
        [operation] = (await session.scalars(select(OperationModel))).all()
    assert operation.status == "failed" and operation.error.startswith("SPEC_FORBIDDEN")


def _host_namespace(mode: str | None) -> bool:
    return (mode or "") == "host" or (mode or "").startswith("container:")


async def test_every_managed_container_is_hardened(cluster: Cluster, docker_client: docker.DockerClient) -> None:
    alice = await cluster.user("alice")
    specs = [
        {**LEGIT, "cap_add": ["IPC_LOCK"]},
        # No memory limit: the controller's default applies.
        {"name": "no-limits", "image": EXAMPLE_IMAGE, "volumes": {"models": "/models"}, "labels": {"team": "bio"}},
    ]
    for spec in specs:
        response = await cluster.hub.post("/api/alice/r/services", json=spec, headers=alice)
        assert response.status_code == 201, response.text
    # And one straight to a controller, with nothing but an image, as a GeoML-Hub backend might.
    host = cluster.hosts[cluster.controller_ids[1]]
    async with httpx.AsyncClient(transport=cluster.router, base_url=f"http://{host}:8001",
                                 headers={"Authorization": f"Bearer {KEY}"}) as controller:
        direct = await controller.post("/containers/", json={"image": EXAMPLE_IMAGE})
        assert direct.status_code == 201, direct.text

    allowed_caps = ALLOWED_CAPABILITIES | {f"CAP_{cap}" for cap in ALLOWED_CAPABILITIES}
    checked = []
    for container in docker_client.containers.list(all=True, filters={"label": "mmanager.managed=true"}):
        host_config = container.attrs["HostConfig"]
        name = container.name
        assert host_config["Privileged"] is False, name
        for key in ("NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode", "CgroupnsMode"):
            assert not _host_namespace(host_config.get(key)), (name, key, host_config.get(key))
        # The only host paths are model files from the controller's cache, bound read-only.
        for mount in container.attrs["Mounts"]:
            model_file = mount["Type"] == "bind" and "/sha256/" in mount["Source"] and mount["RW"] is False
            assert mount["Type"] == "volume" or model_file, (name, mount)
        assert not any(":" in bind and not bind.endswith(":ro") for bind in host_config.get("Binds") or []), name
        assert not host_config.get("Devices") and not host_config.get("DeviceCgroupRules"), name
        assert set(host_config.get("CapAdd") or []) <= allowed_caps, (name, host_config["CapAdd"])
        assert "no-new-privileges:true" in (host_config.get("SecurityOpt") or []), name
        assert host_config["Memory"] > 0 and host_config["PidsLimit"] > 0, name
        checked.append(container.id)
    assert {c.id for c in cluster.containers()} <= set(checked)
    assert len(cluster.containers()) == 3
    [no_limits] = cluster.containers(**{"mmanager.service": _service_id(cluster, "no-limits")})
    assert no_limits.attrs["HostConfig"]["Memory"] == 2 * 1024**3


def _service_id(cluster: Cluster, name: str) -> str:
    for container in cluster.containers():
        if container.name.startswith(f"mm-{name}-"):
            return container.labels["mmanager.service"]
    raise AssertionError(f"no container for service {name}")
