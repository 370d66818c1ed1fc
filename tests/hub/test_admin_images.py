"""The admin image API on real controllers and the real Docker engine: a controller's images, a pull onto
chosen controllers from a real registry that needs a login, and a prune that removes only unused images."""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.hub.conftest import Cluster
from tests.support.registry import push, serve_registry

PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture
def private(tmp_path: Path, docker_client: docker.DockerClient, example_image: str) -> Iterator[str]:
    with serve_registry(tmp_path, {"lab": PASSWORD}) as registry:
        reference = push(docker_client, example_image, f"{registry}/lab/admin", uuid.uuid4().hex[:8],
                         {"username": "lab", "password": PASSWORD})
        try:
            yield reference
        finally:
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(reference, force=True)


async def test_admin_image_routes_are_for_admins_and_check_their_input(cluster: Cluster) -> None:
    cid = cluster.controller_ids[0]
    user = await cluster.user("someone")
    for method, path, body in (("GET", f"/api/admin/controllers/{cid}/images", None),
                               ("POST", "/api/admin/images/pull", {"image": EXAMPLE_IMAGE, "controllers": [cid]}),
                               ("POST", "/api/admin/images/prune", {"controllers": [cid]})):
        r = await cluster.hub.request(method, path, json=body, headers=user)
        assert r.status_code == 403, r.text
    r = await cluster.hub.get("/api/admin/controllers/nowhere/images")
    assert r.status_code == 404 and r.json()["error"]["code"] == "CONTROLLER_NOT_FOUND"
    # A controller that cannot be reached answers for itself, as its health does.
    cluster.router.down.add(cluster.hosts[cid])
    r = await cluster.hub.get(f"/api/admin/controllers/{cid}/images")
    assert r.status_code == 200, r.text
    assert (r.json()["ok"], r.json()["images"], r.json()["error"]["code"]) == (False, [], "CONTROLLER_UNAVAILABLE")
    cluster.router.down.discard(cluster.hosts[cid])
    for path, body in (("/api/admin/images/pull", {"image": EXAMPLE_IMAGE, "controllers": [cid, "nowhere"]}),
                       ("/api/admin/images/prune", {"controllers": ["nowhere"]})):
        r = await cluster.hub.post(path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "CONTROLLER_NOT_FOUND", r.text
    for path, body in (("/api/admin/images/pull", {"image": EXAMPLE_IMAGE, "controllers": []}),
                       ("/api/admin/images/pull", {"controllers": [cid]}),
                       ("/api/admin/images/pull", {"image": "a b", "controllers": [cid]}),
                       ("/api/admin/images/pull", {"image": EXAMPLE_IMAGE, "controllers": [cid, cid]}),
                       ("/api/admin/images/prune", {"controllers": [cid], "all": True}),
                       ("/api/admin/images/prune", {})):
        r = await cluster.hub.post(path, json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR", (body, r.text)
    # Audited, refusals too.
    audit = (await cluster.hub.get("/api/admin/audit", params={"limit": 1000})).json()
    paths = {(e["path"], e["status_code"]) for e in audit}
    assert ("/api/admin/images/pull", 404) in paths and ("/api/admin/images/prune", 403) in paths


async def test_pull_onto_chosen_controllers_with_a_login(
    cluster: Cluster, private: str, docker_client: docker.DockerClient
) -> None:
    chosen = cluster.controller_ids[1:]
    wrong = {"username": "lab", "password": "not-" + PASSWORD}
    r = await cluster.hub.post("/api/admin/images/pull",
                               json={"image": private, "controllers": chosen, "registry_auth": wrong})
    assert r.status_code == 200, r.text
    assert PASSWORD not in r.text
    outcomes = r.json()
    assert [o["controller_id"] for o in outcomes] == chosen
    for outcome in outcomes:
        assert not outcome["ok"] and outcome["error"]["code"] == "IMAGE_PULL_FAILED", outcome
        assert private in outcome["error"]["message"]
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(private)

    r = await cluster.hub.post("/api/admin/images/pull", json={
        "image": private, "controllers": chosen, "registry_auth": {"username": "lab", "password": PASSWORD}})
    assert r.status_code == 200, r.text
    assert PASSWORD not in r.text
    for outcome in r.json():
        assert outcome["ok"], outcome
        assert outcome["image"]["exists"] and private in outcome["image"]["tags"]
    listed = (await cluster.hub.get(f"/api/admin/controllers/{chosen[0]}/images")).json()
    assert listed["controller_id"] == chosen[0] and listed["ok"]
    assert any(f"{i['repository']}:{i['tag']}" == private for i in listed["images"])
    audit = (await cluster.hub.get("/api/admin/audit", params={"limit": 1000})).json()
    assert PASSWORD not in str(audit)


async def test_prune_removes_only_unused_images(cluster: Cluster, docker_client: docker.DockerClient) -> None:
    """An image no container uses and no tag names goes; one a container uses, and the running service's,
    stay."""
    r = await cluster.hub.post("/api/admin/repo/services", json={
        "name": "kept", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"}})
    assert r.status_code == 201, r.text
    run = uuid.uuid4().hex[:8]
    tag = f"mm-prune-{run}:t"

    def build(label: str) -> str:
        dockerfile = io.BytesIO(f"FROM {EXAMPLE_IMAGE}\nLABEL mmanager.test.prune={run}-{label}\n".encode())
        image, _ = docker_client.images.build(fileobj=dockerfile, tag=tag, rm=True)
        return str(image.id)

    used = build("used")
    holder = docker_client.containers.create(used, name=f"mm-prune-{run}", command=["true"])
    unused = build("unused")
    last = build("last")  # takes the tag from "unused": both older ones are dangling now
    try:
        r = await cluster.hub.post("/api/admin/images/prune", json={"controllers": [cluster.controller_ids[0]]})
        assert r.status_code == 200, r.text
        [outcome] = r.json()
        assert outcome["ok"] and outcome["controller_id"] == cluster.controller_ids[0], outcome
        # The engine's dangling prune: another prune on this engine (a concurrent test's) may have taken
        # ``unused`` first, so what counts is that it is gone and that what is used stays.
        assert used not in outcome["images_deleted"] and last not in outcome["images_deleted"]
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(unused)
        docker_client.images.get(used)
        docker_client.images.get(last)
        docker_client.images.get(EXAMPLE_IMAGE)
        [container] = cluster.containers()
        container.reload()
        assert container.status == "running"
    finally:
        holder.remove(force=True)
        for image in (last, used):
            with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                docker_client.images.remove(image, force=True)
