"""A create that waits for its controller's pull shows the pull's progress (layers and bytes) in its
operation while it runs, and the pull's outcome once done: a real registry on 127.0.0.1 behind a slow
link, an image built here with a layer of random bytes, the real Docker engine."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from tests.hub.conftest import Cluster
from tests.support.poll import eventually
from tests.support.registry import push, serve_registry, throttled

LAYER_BYTES = 6 * 1024 * 1024
# About three seconds for the layer: the hub looks after one and then every second.
LINK_BYTES_PER_SECOND = 2 * 1024 * 1024


@pytest.fixture
def slow_image(tmp_path: Path, docker_client: docker.DockerClient, example_image: str) -> Iterator[str]:
    """The example image with a layer of random (incompressible) bytes, pushed to a registry and reachable
    through a slow link to it; no local tag of it is left, so a create must pull it."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "blob").write_bytes(os.urandom(LAYER_BYTES))
    (context / "Dockerfile").write_text(f"FROM {example_image}\nCOPY blob /blob\n")
    run = uuid.uuid4().hex[:8]
    built, _ = docker_client.images.build(path=str(context), tag=f"mm-slow-{run}:built", rm=True)
    with serve_registry(tmp_path) as registry, throttled(registry, LINK_BYTES_PER_SECOND) as link:
        push(docker_client, f"mm-slow-{run}:built", f"{registry}/lab/slow", run)
        # The built image goes too: its random layer must come from the registry.
        docker_client.images.remove(f"mm-slow-{run}:built")
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(built.id)
        reference = f"{link}/lab/slow:{run}"
        try:
            yield reference
        finally:
            for image in (reference, f"mm-slow-{run}:built", built.id):
                with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                    docker_client.images.remove(image, force=True)


async def test_a_create_shows_its_pull_as_it_goes(cluster: Cluster, slow_image: str) -> None:
    r = await cluster.hub.post("/api/admin/repo/services", params={"wait": "false"}, json={
        "name": "slow", "image": slow_image, "ports": {"5000": None},
        "resources": {"cpu_limit": 0.5, "memory_limit": "64MB"}})
    assert r.status_code == 202, r.text
    op_id = r.json()["id"]

    async def operation() -> dict[str, Any]:
        [op] = [o for o in (await cluster.hub.get("/api/admin/operations")).json() if o["id"] == op_id]
        return op

    async def pulling() -> dict[str, Any] | None:
        op = await operation()
        pull = op["details"].get("image_pull")
        if op["status"] == "running" and pull and pull.get("bytes_total", 0) > 0:
            return op
        assert op["status"] == "running", f"finished before its pull showed: {op}"
        return None

    seen = await eventually(pulling, within=60, what="the pull's progress in the running operation", interval=0.1)
    progress = seen["details"]["image_pull"]
    assert progress["image"] == slow_image and progress["controller_id"] in cluster.controller_ids
    assert 0 < progress["layers_total"] and 0 <= progress["layers_done"] <= progress["layers_total"]
    assert 0 <= progress["bytes_done"] <= progress["bytes_total"] and progress["bytes_total"] >= LAYER_BYTES // 2
    assert seen["details"]["epoch"] == 1  # what the operation began with is kept beside it
    # The same bytes as every long operation shows its progress (docs/API.md), for the clients' progress bars.
    assert seen["details"]["progress"] == {"done": progress["bytes_done"], "total": progress["bytes_total"],
                                           "unit": "bytes", "step": f"pulling {slow_image} on {progress['controller_id']}"}

    async def finished() -> dict[str, Any] | None:
        op = await operation()
        return op if op["status"] != "running" else None

    done = await eventually(finished, within=120, what="the create's end", interval=0.1)
    assert done["status"] == "succeeded", done
    pulled = done["details"]["image_pull"]
    assert set(pulled) == {"image", "layers", "bytes", "seconds"} and pulled["image"] == slow_image
    assert pulled["bytes"] >= LAYER_BYTES and pulled["layers"] >= 1
    # Nothing is pulling any more: no controller reports a pull.
    for cid in cluster.controller_ids:
        assert await cluster.parts.client.image_pulls(cid, f"http://{cluster.hosts[cid]}:8001", timeout=5) == []
