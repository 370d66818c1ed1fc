"""End to end, as an operator runs it: the hub and three controllers as real
processes started with the `mmanager` command, real PostgreSQL, the real
Docker engine, and services reached through ports published on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.support.net import free_port, wait_for_port
from tests.support.pg import create_database
from tests.support.poll import wait_until

KEY = uuid.uuid4().hex + uuid.uuid4().hex
MMANAGER = [sys.executable, "-m", "mmanager.cli"]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen([*MMANAGER, *args], env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "e2e")


@pytest.fixture
def system(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[dict]:
    run = uuid.uuid4().hex[:6]
    procs: list[subprocess.Popen[bytes]] = []
    layout = [("gpu", "gpu", 1, 100, "0:A100:81920"), ("cpu-a", "cpu", 1, 100, None), ("cpu-b", "cpu", 2, 100, None)]
    controllers = []
    for name, server_type, priority, weight, gpus in layout:
        port = free_port()
        cid = f"e2e{run}-{name}"
        env = {"MMANAGER_API_KEY": KEY, "SERVER_ID": cid, "SERVER_TYPE": server_type, "MAX_CONTAINERS": "10",
               "CONTROLLER_URL": f"http://127.0.0.1:{port}", "PUBLISH_IP": "127.0.0.1", "PORT": str(port)}
        if gpus:
            env["GPU_DEVICES"] = gpus
        procs.append(spawn(["controller", "serve", "--host", "127.0.0.1"], env, tmp_path / f"{cid}.log"))
        controllers.append({"id": cid, "url": f"http://127.0.0.1:{port}", "server_type": server_type,
                            "priority": priority, "weight": weight})
    hub_port = free_port()
    hub_env = {"MMANAGER_DATABASE_URL": db_url, "MMANAGER_API_KEY": KEY, "MMANAGER_CONTROLLERS": json.dumps(controllers),
               "MMANAGER_HEARTBEAT_INTERVAL": "1", "MMANAGER_HEARTBEAT_GRACE": "3",
               "MMANAGER_MODEL_STORE": str(tmp_path / "model-store"),
               "MMANAGER_ARTIFACT_STORE": str(tmp_path / "artifact-store")}
    created = subprocess.run([*MMANAGER, "users", "create", "root", "--admin"], env={**os.environ, **hub_env},
                             capture_output=True, text=True, check=True)
    token = created.stdout.strip().splitlines()[-1]
    procs.append(spawn(["hub", "serve", "--host", "127.0.0.1", "--port", str(hub_port)], hub_env, tmp_path / "hub.log"))
    try:
        for c in controllers:
            wait_for_port(int(c["url"].rsplit(":", 1)[1]))
        wait_for_port(hub_port)
        yield {"hub": f"http://127.0.0.1:{hub_port}", "token": token, "controllers": [c["id"] for c in controllers],
               "logs": tmp_path}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for c in controllers:
            for container in docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={c['id']}"}):
                container.remove(force=True)


def get_with_retry(url: str, timeout: float = 10) -> httpx.Response:
    """A service's port is published before the process inside listens; give it a moment."""
    return wait_until(lambda: httpx.get(url, timeout=2), timeout, f"an answer from {url}", interval=0.1,
                      retry_on=(httpx.TransportError,))


def wait_healthy(api: httpx.Client, n: int, timeout: float = 20) -> list[dict]:
    def all_healthy() -> list[dict] | None:
        controllers = api.get("/api/admin/controllers").json()
        return controllers if sum(c["status"] == "healthy" for c in controllers) == n else None

    return wait_until(all_healthy, timeout, f"{n} controllers healthy", retry_on=())


def test_real_processes_real_engine_real_database(system: dict, docker_client: docker.DockerClient) -> None:
    api = httpx.Client(base_url=system["hub"], headers={"Authorization": f"Bearer {system['token']}"}, timeout=60)
    gpu, cpu_a, cpu_b = system["controllers"]
    controllers = wait_healthy(api, 3)
    assert {c["id"]: c["gpus"] for c in controllers}[gpu] == [{"index": "0", "model": "A100", "memory_mb": 81920, "in_use": False}]

    spec = {"name": "cpu-1", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
            "resources": {"cpu_limit": 0.25, "memory_limit": "32MB"}}
    # CPU services: the priority-1 cpu controller, never the GPU server
    first = api.post("/api/root/lab/services", json=spec)
    assert first.status_code == 201, first.text
    assert first.json()["controller_id"] == cpu_a
    # a disabled controller gets no new placements: the next goes to the priority-2 cpu controller
    assert api.post(f"/api/admin/controllers/{cpu_a}/disable").json()["enabled"] is False
    second = api.post("/api/root/lab/services", json={**spec, "name": "cpu-2"}).json()
    assert second["controller_id"] == cpu_b
    api.post(f"/api/admin/controllers/{cpu_a}/enable")
    # a GPU service goes to the gpu controller
    gpu_service = api.post("/api/root/lab/services", json={**spec, "name": "gpu-1", "resources": {"gpu_count": 1}}).json()
    assert gpu_service["controller_id"] == gpu

    for service, controller in [(first.json(), cpu_a), (second, cpu_b), (gpu_service, gpu)]:
        container = docker_client.containers.get(service["container_id"])
        assert container.status == "running"
        assert container.labels["mmanager.managed"] == "true"
        assert container.labels["mmanager.controller"] == controller
        assert container.labels["mmanager.service"] == service["id"]
        assert container.labels["mmanager.epoch"] == "1"
        answer = get_with_retry(f"{service['url']}/health")
        assert answer.json() == {"status": "healthy"}
    container = docker_client.containers.get(first.json()["container_id"])
    assert container.attrs["HostConfig"]["Memory"] == 32 * 1024**2
    assert container.attrs["HostConfig"]["NanoCpus"] == 250_000_000
    gpu_env = docker_client.containers.get(gpu_service["container_id"]).attrs["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=0" in gpu_env

    sid = first.json()["id"]
    assert api.post(f"/api/services/{sid}/stop").json()["status"] == "stopped"
    assert docker_client.containers.get(first.json()["container_id"]).status == "exited"
    assert api.get(f"/api/services/{sid}/status").json()["status"] == "stopped"
    started = api.post(f"/api/services/{sid}/start").json()
    assert started["status"] == "running"
    assert get_with_retry(f"{started['url']}/health").status_code == 200
    restarted = api.post(f"/api/services/{sid}/restart").json()
    assert restarted["status"] == "running"
    assert get_with_retry(f"{restarted['url']}/health").status_code == 200
    assert "listening on 5000" in api.get(f"/api/services/{sid}/logs", params={"tail": 20}).text
    # follow streams: each request to the service shows up as a new log line while we read
    with api.stream("GET", f"/api/services/{sid}/logs", params={"tail": 0, "follow": "true"}) as stream:
        assert stream.status_code == 200
        get_with_retry(f"{restarted['url']}/model/info")
        assert "response:200" in next(stream.iter_text())
    assert api.delete(f"/api/services/{sid}").status_code == 204
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(first.json()["container_id"])
    assert api.get(f"/api/services/{sid}").status_code == 404

    ops = api.get("/api/admin/operations", params={"service_id": sid}).json()
    assert [(o["operation"], o["status"]) for o in reversed(ops)] == [
        ("create", "succeeded"), ("stop", "succeeded"), ("start", "succeeded"), ("restart", "succeeded"),
        ("delete", "succeeded"),
    ]
    metrics = httpx.get(f"{system['hub']}/metrics").text
    assert 'mmanager_operations_total{operation="create",status="succeeded"} 3.0' in metrics
    assert f'mmanager_controller_up{{controller="{gpu}"}} 1.0' in metrics
