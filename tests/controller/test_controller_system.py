"""Health, metrics, auth, GPU placement and images, on the real Docker engine."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import quote

import docker
import httpx
import pytest

from tests.controller.conftest import Ctl, StartController

GPUS = "0:A100:81920,1:A100:81920"


async def test_health_reports_capacity_and_usage(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    await ctl.create(example_image)
    stopped = (await ctl.create(example_image)).json()["container_id"]
    await ctl.client.post(f"/containers/{stopped}/stop", params={"timeout": 0})

    response = await ctl.client.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200
    health = response.json()
    info = docker_client.info()
    assert health["status"] == "healthy" and health["docker"] is True
    assert (health["server_id"], health["server_type"], health["wire_version"]) == (ctl.server_id, "cpu", 1)
    assert health["containers"] == {"running": 1, "max_allowed": 20, "managed": 2}
    assert health["load_percentage"] == 5.0
    assert health["resources"]["cpu_cores"] == info["NCPU"]
    assert health["resources"]["memory_total_gb"] == round(info["MemTotal"] / 1024**3, 2)
    assert 0 < health["resources"]["memory_available_gb"] <= health["resources"]["memory_total_gb"] + 1
    assert 0 < health["memory_usage_percent"] < 100
    assert health["capabilities"] == {
        "gpu_support": False,
        "max_memory_gb": health["resources"]["memory_total_gb"],
        "gpus": [],
        "golden_probes": True,
    }


async def test_metrics(ctl: Ctl, example_image: str) -> None:
    await ctl.create(example_image)
    response = await ctl.client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    label = f'{{controller="{ctl.server_id}"}}'
    assert f"mmanager_containers_running{label} 1.0" in lines
    assert f"mmanager_load_percentage{label} 5.0" in lines
    assert f"mmanager_docker_up{label} 1.0" in lines
    assert any(line.startswith(f"mmanager_memory_usage_percent{label} ") for line in lines)


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic Zm9vOmJhcg==", "Bearer"])
async def test_everything_but_health_and_metrics_needs_the_key(ctl: Ctl, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ctl.app), base_url="http://controller") as anonymous:
        for method, path in [
            ("GET", "/containers/"),
            ("POST", "/containers/"),
            ("GET", "/containers/abc"),
            ("DELETE", "/containers/abc"),
            ("POST", "/images/pull"),
            ("GET", "/images/"),
            ("GET", "/images/busybox:latest"),
        ]:
            response = await anonymous.request(method, path, headers=headers, json={"image": "x"})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "UNAUTHORIZED"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await anonymous.get("/health", headers=headers)).status_code == 200
        assert (await anonymous.get("/metrics", headers=headers)).status_code == 200


async def test_unreachable_docker_is_503_and_quick(start_controller: StartController) -> None:
    ctl = await start_controller(docker_host="unix:///nonexistent.sock")
    response = await asyncio.wait_for(ctl.client.get("/health"), 3)
    assert response.status_code == 503
    health = response.json()
    assert (health["status"], health["docker"], health["server_id"]) == ("unhealthy", False, ctl.server_id)
    assert health["containers"] == {"running": 0, "max_allowed": 20, "managed": 0}
    assert health["resources"]["cpu_cores"] == 0 and health["error"]

    for method, path in [("GET", "/containers/"), ("POST", "/containers/abc/start"), ("GET", "/images/")]:
        response = await ctl.client.request(method, path)
        assert response.status_code == 503, (method, path)
        assert response.json()["error"]["code"] == "DOCKER_UNAVAILABLE"
    create = await ctl.create("mmanager/example-model:latest", service_id="s", epoch=1)
    assert (create.status_code, create.json()["error"]["code"]) == (503, "DOCKER_UNAVAILABLE")
    assert f'mmanager_docker_up{{controller="{ctl.server_id}"}} 0.0' in (await ctl.client.get("/metrics")).text


async def test_gpus_are_reported_and_handed_out_one_by_one(
    start_controller: StartController, example_image: str, docker_client: docker.DockerClient
) -> None:
    ctl = await start_controller(gpu_devices=GPUS, server_type="gpu")
    capabilities = (await ctl.client.get("/health")).json()["capabilities"]
    assert capabilities["gpu_support"] is True
    assert capabilities["gpus"] == [
        {"index": "0", "model": "A100", "memory_mb": 81920, "in_use": False},
        {"index": "1", "model": "A100", "memory_mb": 81920, "in_use": False},
    ]

    first = (await ctl.create(example_image, gpu_count=1)).json()
    second = (await ctl.create(example_image, gpu_count=1)).json()
    assert (first["gpu_device_ids"], second["gpu_device_ids"]) == (["0"], ["1"])
    for body, index in ((first, "0"), (second, "1")):
        attrs = docker_client.api.inspect_container(body["container_id"])
        assert f"NVIDIA_VISIBLE_DEVICES={index}" in attrs["Config"]["Env"]
        assert attrs["Config"]["Labels"]["mmanager.gpus"] == index
        assert not attrs["HostConfig"].get("DeviceRequests")
    assert [g["in_use"] for g in (await ctl.client.get("/health")).json()["capabilities"]["gpus"]] == [True, True]

    full = await ctl.create(example_image, gpu_count=1)
    assert (full.status_code, full.json()["error"]["code"]) == (409, "GPU_UNAVAILABLE")
    busy = await ctl.create(example_image, gpu_count=1, gpu_device_ids=["1"])
    assert (busy.status_code, busy.json()["error"]["code"]) == (409, "GPU_UNAVAILABLE")
    unknown = await ctl.create(example_image, gpu_device_ids=["7"])
    assert unknown.status_code == 422

    # A stopped container gives its GPU back.
    await ctl.client.post(f"/containers/{first['container_id']}/stop", params={"timeout": 0})
    third = (await ctl.create(example_image, gpu_count=1)).json()
    assert third["gpu_device_ids"] == ["0"]


async def test_images_list_inspect_delete_prune(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    images = (await ctl.client.get("/images/")).json()["images"]
    example = next(i for i in images if f"{i['repository']}:{i['tag']}" == example_image)
    assert example["id"].startswith("sha256:") and example["size"] > 0 and example["created"]

    found = (await ctl.client.get(f"/images/{quote(example_image, safe='')}")).json()
    assert (found["exists"], found["id"], found["os"]) == (True, example["id"], "linux")
    assert example_image in found["tags"]
    # Unencoded slashes and colons reach the same route.
    assert (await ctl.client.get(f"/images/{example_image}")).json()["exists"] is True
    for missing in ("registry.example.com/none/such:1.0", "UPPER:case"):
        response = await ctl.client.get(f"/images/{quote(missing, safe='')}")
        assert (response.status_code, response.json()["exists"]) == (200, False)

    scratch = f"mmanager/controller-test-{uuid.uuid4().hex[:8]}:tmp"
    docker_client.images.get(example_image).tag(scratch)
    removed = await ctl.client.delete(f"/images/{quote(scratch, safe='')}", params={"force": "false"})
    assert removed.status_code == 200
    assert removed.json()["status"] == "success" and {"Untagged": scratch} in removed.json()["deleted"]
    assert (await ctl.client.get(f"/images/{quote(scratch, safe='')}")).json()["exists"] is False
    again = await ctl.client.delete(f"/images/{quote(scratch, safe='')}")
    assert (again.status_code, again.json()["error"]["code"]) == (404, "IMAGE_NOT_FOUND")

    pruned = await ctl.client.post("/images/prune")
    assert pruned.status_code == 200
    assert pruned.json()["status"] == "success" and pruned.json()["space_reclaimed"] >= 0
    assert (await ctl.client.get(f"/images/{quote(example_image, safe='')}")).json()["exists"] is True


async def test_pull_without_a_registry_fails_fast_and_clearly(ctl: Ctl) -> None:
    response = await asyncio.wait_for(
        ctl.client.post("/images/pull", json={"image": "registry.invalid/none:latest", "auth": None}), 10)
    assert response.status_code == 502
    body = response.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "IMAGE_PULL_FAILED"
    assert "registry.invalid" in body["message"]
