"""The hub on real PostgreSQL, driven through its HTTP API in process, with
real controllers (the controller app on the real Docker engine) reached
through an in-process router: each controller's URL host maps to its app."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from controller.app import create_app as create_controller_app
from controller.config import ControllerSettings
from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.services.users import create_user

KEY = "test-key-" + "x" * 32
# The hub key that seals services' registry credentials (MMANAGER_HUB_KEY): base64 of 32 bytes.
HUB_KEY = base64.b64encode(os.urandom(32)).decode()


class Router(httpx.AsyncBaseTransport):
    """Sends each request to the in-process app registered for its host; others are unreachable."""

    def __init__(self) -> None:
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.down: set[str] = set()
        # Hosts whose creates are refused as a full controller refuses them (its last slot taken by
        # something the hub has not seen yet: another replica's create, a container made by hand).
        self.full: set[str] = set()
        # Hosts whose creates are refused as a controller whose pull of the image failed refuses them,
        # and the hosts that refused so, in order.
        self.pull_fails: set[str] = set()
        self.pull_refused: list[str] = []

    def add(self, host: str, app: Any) -> None:
        self.apps[host] = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down or host not in self.apps:
            raise httpx.ConnectError(f"{host} is unreachable", request=request)
        if host in self.full and request.method == "POST" and request.url.path == "/containers/":
            return httpx.Response(409, json={"error": {"code": "CAPACITY_EXCEEDED",
                                                       "message": "this controller runs its maximum of containers"}})
        if host in self.pull_fails and request.method == "POST" and request.url.path == "/containers/":
            self.pull_refused.append(host)
            return httpx.Response(404, json={"error": {
                "code": "IMAGE_PULL_FAILED", "message": "pulling 'x' failed: manifest unknown",
                "details": {"image": "x", "registry": "manifest unknown"}}})
        return await self.apps[host].handle_async_request(request)


@dataclass
class Cluster:
    hub: httpx.AsyncClient
    admin_token: str
    db: Database
    router: Router
    docker: docker.DockerClient
    controller_ids: list[str]
    tokens: dict[str, str] = field(default_factory=dict)
    # The hub's parts (hub.deps.Hub), for what the API does not show.
    parts: Any = None
    hosts: dict[str, str] = field(default_factory=dict)

    def as_user(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def user(self, name: str, admin: bool = False) -> dict[str, str]:
        async with self.db.session() as session:
            _, token = await create_user(session, name, admin)
        self.tokens[name] = token
        return self.as_user(token)

    def containers(self, **labels: str) -> list[Any]:
        filters = [f"{k}={v}" for k, v in labels.items()]
        out = []
        for cid in self.controller_ids:
            out += self.docker.containers.list(all=True, filters={"label": [f"mmanager.controller={cid}", *filters]})
        return out


CONTROLLERS = [
    # (suffix, server_type, priority, weight, gpu devices)
    ("gpu", "gpu", 1, 100, "0:A100:81920,1:A100:81920"),
    ("cpu1", "cpu", 1, 100, None),
    ("cpu2", "cpu", 2, 100, None),
]


@pytest.fixture
async def cluster(db: Database, docker_client: docker.DockerClient, example_image: str,
                  request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    run = uuid.uuid4().hex[:6]
    router = Router()
    entries, ids, controller_apps = [], [], []
    for suffix, server_type, priority, weight, gpus in CONTROLLERS:
        cid = f"t{run}-{suffix}"
        host = f"{cid}.test"
        settings = ControllerSettings(
            MMANAGER_API_KEY=KEY, SERVER_ID=cid, SERVER_TYPE=server_type, MAX_CONTAINERS=20,
            CONTROLLER_URL=f"http://{host}:8001", PUBLISH_IP="127.0.0.1",
            **({"GPU_DEVICES": gpus} if gpus else {}),
        )
        app = create_controller_app(settings)
        controller_apps.append(app)
        router.add(host, app)
        entries.append({"id": cid, "url": f"http://{host}:8001", "server_type": server_type,
                        "priority": priority, "weight": weight})
        ids.append(cid)
    settings = HubSettings(database_url=db.url, api_key=KEY, hub_key=HUB_KEY, controllers=json.dumps(entries),
                           heartbeat_interval=0.5, heartbeat_grace=3, orphan_grace=2, health_timeout=8,
                           model_store=tmp_path / "model-store", artifact_store=tmp_path / "artifact-store")
    hub = build_hub(settings, db=Database(db.url), transport=router)
    app = create_app(settings, hub=hub)
    async with app.router.lifespan_context(app):
        contexts = [a.router.lifespan_context(a) for a in controller_apps]
        for ctx in contexts:
            await ctx.__aenter__()
        async with db.session() as session:
            _, admin_token = await create_user(session, "admin", is_admin=True)
        await hub.refresh_controllers()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub",
                                   headers={"Authorization": f"Bearer {admin_token}"}, timeout=60)
        cluster = Cluster(client, admin_token, db, router, docker_client, ids, parts=hub,
                          hosts={cid: f"{cid}.test" for cid in ids})
        try:
            yield cluster
        finally:
            await client.aclose()
            for ctx in reversed(contexts):
                await ctx.__aexit__(None, None, None)
            for container in cluster.containers():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
