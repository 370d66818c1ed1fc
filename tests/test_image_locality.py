"""Image locality and prefetch with real processes: a hub, three controllers each on a Docker engine of its own
(the machine's and two started for the test), a real registry on 127.0.0.1 and PostgreSQL. The images each
engine holds reach the hub in heartbeats; placement picks the controller that holds the image among equals; a
``prefetch`` service's image is pulled onto its next failover target before any failover, and the failover
then pulls nothing."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.support.engines import Engine, docker_engine
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api, stopped_after
from tests.support.registry import push, serve_registry

pytestmark = pytest.mark.slow

SPEC = {"ports": {"5000": None}, "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "loc")


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    with docker_engine(tmp_path) as b, docker_engine(tmp_path) as c:
        yield b, c


@pytest.fixture
def image(tmp_path: Path, docker_client: docker.DockerClient, example_image: str,
          engines: tuple[Engine, Engine]) -> Iterator[str]:
    """The example image in a registry as ``lab/loc:<random>``: on engine b, not on the machine's (nor c)."""
    (tmp_path / "registry").mkdir()
    with serve_registry(tmp_path / "registry") as registry:
        reference = push(docker_client, EXAMPLE_IMAGE, f"{registry}/lab/loc", uuid.uuid4().hex[:8])
        engines[0].client.images.pull(reference)
        try:
            yield reference
        finally:
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(reference)


@pytest.fixture
def lab(db_url: str, tmp_path: Path, request: pytest.FixtureRequest, docker_client: docker.DockerClient,
        engines: tuple[Engine, Engine], image: str) -> Iterator[tuple[LocalDeployment, httpx.Client]]:
    dep = LocalDeployment(db_url, tmp_path / "lab", extra_hub_env={
        "MMANAGER_PREFETCH_INTERVAL": "0.5", "MMANAGER_PREFETCH_MIN_IMAGE_BYTES": "0"})
    dep.plan_hubs(1)
    dep.add_controller("a")
    dep.add_controller("b", env={"DOCKER_HOST": engines[0].host})
    dep.add_controller("c", env={"DOCKER_HOST": engines[1].host})
    token = dep.create_admin()
    dep.start()
    with stopped_after(dep, request, docker_client):
        client = api(dep.hub(0).url, token)
        wait_until(lambda: all(c["status"] == "healthy" for c in client.get("/api/admin/controllers").json()), 20,
                   what="all controllers healthy")
        # Each controller's first heartbeat lists its images: b holds one, the others none of the test's.
        ids = [f"{name}-{dep.run}" for name in "abc"]
        wait_until(lambda: all(f'mmanager_controller_images{{controller="{cid}"}}' in
                               httpx.get(f"{dep.hub(0).url}/metrics").text for cid in ids), 20,
                   what="every controller's images at the hub")
        yield dep, client


def _operation(client: httpx.Client, service_id: str, kind: str) -> dict[str, Any]:
    ops = client.get("/api/admin/operations", params={"service_id": service_id, "operation": kind}).json()
    return next(o for o in ops if o["status"] == "succeeded")


def test_locality_and_prefetch(lab: tuple[LocalDeployment, httpx.Client], image: str,
                               docker_client: docker.DockerClient, engines: tuple[Engine, Engine]) -> None:
    dep, client = lab
    a, b, c = (f"{name}-{dep.run}" for name in "abc")

    # Equal controllers (same tier, no load): id order would pick a; b holds the image, as its heartbeats said.
    r = client.post("/api/root/lab/services", json={**SPEC, "name": "near", "image": image})
    assert r.status_code == 201, r.text
    near = r.json()
    assert near["controller_id"] == b
    create = _operation(client, near["id"], "create")
    assert create["details"]["placement"] == "image present" and "image_pull" not in create["details"]

    # A prefetch service: on b too (the image), and its image goes to its next failover target, a, at once.
    r = client.post("/api/root/lab/services", json={**SPEC, "name": "warm", "image": image, "prefetch": True})
    assert r.status_code == 201, r.text
    warm = r.json()
    assert warm["controller_id"] == b
    wait_until(lambda: docker_client.images.get(image), 60, retry_on=(docker.errors.ImageNotFound,),
               what="the image pre-pulled onto the machine's engine (controller a)")
    wait_until(lambda: 'mmanager_prefetch_pulls_total{outcome="pulled"} 1.0' in
               httpx.get(f"{dep.hub(0).url}/metrics").text, 20, what="the hub counting the pre-pull")
    with pytest.raises(docker.errors.ImageNotFound):
        engines[1].client.images.get(image)  # one target only: c is not the next one
    now = client.get(f"/api/services/{warm['id']}").json()
    assert (now["controller_id"], now["epoch"], now["status"]) == (b, 1, "running")

    # b's server dies: the failover lands on a, which holds the image now, and pulls nothing.
    dep.controllers[b].kill()
    for container in engines[0].client.containers.list():
        container.kill()
    moved = wait_until(lambda: (s := client.get(f"/api/services/{warm['id']}").json())["status"] == "running"
                       and s["controller_id"] != b and s, 40, what="the prefetch service moved")
    assert moved["controller_id"] == a
    failover = _operation(client, warm["id"], "failover")
    assert "image_pull" not in (failover["details"] or {}), failover
    assert failover["details"]["placement"] == "image present"
    # The service without prefetch moved to a holder too, and the prefetch service's next failover target is c
    # now (b is gone): its image is pre-pulled there in turn.
    near_now = wait_until(lambda: (s := client.get(f"/api/services/{near['id']}").json())["status"] == "running"
                          and s["controller_id"] != b and s, 40, what="the other service moved")
    assert near_now["controller_id"] == a
    wait_until(lambda: engines[1].client.images.get(image), 60, retry_on=(docker.errors.ImageNotFound,),
               what="the image pre-pulled onto c, the next failover target")
