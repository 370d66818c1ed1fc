"""A controller pulls a missing image on create: from a real registry (Debian's ``docker-registry``) on
127.0.0.1, through the hub, on the real Docker engine; and the hub tries the next controller when one
controller's pull fails."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.hub.conftest import Cluster
from tests.support.net import free_port, terminate, wait_for_port

SPEC = {"name": "pulled", "ports": {"5000": None}, "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"}}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A plain-HTTP registry on 127.0.0.1 (Docker trusts 127.0.0.0/8 without TLS), storage in tmp, no auth."""
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed: make system-deps (scripts/ensure-system-deps.sh)"
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    with (tmp_path / "registry.log").open("wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 20, proc)
        yield f"127.0.0.1:{port}"
    finally:
        terminate(proc)


@pytest.fixture
def pushed(registry: str, docker_client: docker.DockerClient, example_image: str) -> Iterator[str]:
    """The example image pushed to the registry as ``lab/example:<random>``, the local tag removed again.

    Only tags this fixture made are removed (the pulled one too, at the end); the example image stays."""
    repository, tag = f"{registry}/lab/example", uuid.uuid4().hex[:8]
    reference = f"{repository}:{tag}"
    docker_client.images.get(example_image).tag(repository, tag)
    try:
        for event in docker_client.api.push(repository, tag=tag, stream=True, decode=True):
            assert "error" not in event, event
    finally:
        docker_client.images.remove(reference)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(reference)
    try:
        yield reference
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(reference)


async def test_a_create_pulls_the_image_from_a_registry(
    cluster: Cluster, pushed: str, registry: str, docker_client: docker.DockerClient
) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "image": pushed})
    assert r.status_code == 201, r.text
    service = r.json()
    assert service["status"] == "running"
    [container] = cluster.containers(**{"mmanager.service": service["id"]})
    assert container.status == "running" and container.image.id == docker_client.images.get(EXAMPLE_IMAGE).id
    assert pushed in docker_client.images.get(pushed).tags
    # The pull shows in the create's operation (its layers are the example image's, already here).
    [op] = (await cluster.hub.get("/api/admin/operations", params={"service_id": service["id"]})).json()
    pull = op["details"]["image_pull"]
    assert pull["image"] == pushed and pull["bytes"] > 0 and pull["seconds"] >= 0 and pull["layers"] >= 0

    # A tag the registry lacks: refused, naming the image and what the registry said; nothing made.
    missing = pushed.rsplit(":", 1)[0] + ":missing"
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "name": "ghost", "image": missing})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "IMAGE_PULL_FAILED"
    assert missing in error["message"] and "manifest unknown" in error["message"]
    assert error["details"]["image"] == missing and "manifest unknown" in error["details"]["registry"]
    assert len(cluster.containers()) == 1
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(missing)

    r = await cluster.hub.delete(f"/api/services/{service['id']}")
    assert r.status_code in (200, 204), r.text
    assert cluster.containers() == []


async def test_a_failed_pull_moves_on_to_the_next_controller(cluster: Cluster) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", json={**SPEC, "image": EXAMPLE_IMAGE})
    assert r.status_code == 201, r.text
    service = r.json()
    source = service["controller_id"]
    others = {cluster.hosts[cid] for cid in cluster.controller_ids if cid != source}
    [entry] = (await cluster.hub.get("/api/admin/containers")).json()

    # Every other controller fails the pull: the move fails with the pull's error, the service stays.
    cluster.router.pull_fails |= others
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    assert r.status_code == 422 and r.json()["error"]["code"] == "IMAGE_PULL_FAILED", r.text
    assert set(cluster.router.pull_refused) == others
    after = (await cluster.hub.get(f"/api/services/{service['id']}")).json()
    assert (after["controller_id"], after["status"]) == (source, "running")

    # Only the first choice fails it: the move lands on the next one.
    first = cluster.router.pull_refused[0]
    cluster.router.pull_fails, cluster.router.pull_refused = {first}, []
    r = await cluster.hub.post(f"/api/admin/containers/{entry['id']}/migrate", json={})
    assert r.status_code == 200, r.text
    assert cluster.router.pull_refused == [first]
    moved = r.json()["controller_id"]
    assert moved not in (source,) and cluster.hosts[moved] != first
    containers = cluster.containers(**{"mmanager.service": service["id"]})
    assert [c.labels["mmanager.controller"] for c in containers] == [moved]
