"""The controller app driven in process through httpx's ASGI transport.

Tests against the real Docker engine get their own SERVER_ID each, so the
containers a test makes are the only ones its controller sees, and a teardown
that removes every container carrying that id's label. Published ports bind
to 127.0.0.1 and are reached there. Tests of the HTTP layer alone use the
in-memory ``FakeRuntime``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import docker
import httpx
import pytest
from fastapi import FastAPI

from controller.app import create_app
from controller.config import ControllerSettings
from controller.fake import FakeRuntime
from controller.runtime import Runtime

KEY = "controller-test-key-" + "k" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Ctl:
    app: FastAPI
    client: httpx.AsyncClient
    settings: ControllerSettings

    @property
    def server_id(self) -> str:
        return self.settings.server_id

    async def create(self, image: str, **body: Any) -> httpx.Response:
        return await self.client.post("/containers/", json={"image": image, **body})


StartController = Callable[..., Awaitable[Ctl]]


def make_settings(server_id: str, **overrides: Any) -> ControllerSettings:
    values: dict[str, Any] = {
        "api_key": KEY,
        "server_id": server_id,
        "server_type": "cpu",
        "publish_ip": "127.0.0.1",
        "max_containers": 20,
        "docker_timeout": 20,
        # An explicit empty inventory: no NVML probing, whatever the machine has.
        "gpu_devices": [],
        **overrides,
    }
    # No .env: what a developer keeps there must not change what the tests see.
    return ControllerSettings(_env_file=None, **values)


@pytest.fixture
def server_id(docker_client: docker.DockerClient) -> Iterator[str]:
    sid = f"test-ctl-{uuid.uuid4().hex[:10]}"
    yield sid
    for container in docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={sid}"}):
        container.remove(force=True)


@asynccontextmanager
async def _controllers(default_id: str) -> AsyncIterator[StartController]:
    async with AsyncExitStack() as stack:

        async def start(
            runtime: Runtime | None = None, hub_transport: httpx.AsyncBaseTransport | None = None, **overrides: Any
        ) -> Ctl:
            settings = make_settings(overrides.pop("server_id", default_id), **overrides)
            app = create_app(settings, runtime, hub_transport=hub_transport)
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://controller", headers=AUTH, timeout=30
                )
            )
            return Ctl(app, client, settings)

        yield start


@pytest.fixture
async def start_controller(server_id: str, example_image: str) -> AsyncIterator[StartController]:
    """Start controllers (same SERVER_ID unless told otherwise) on the real engine."""
    async with _controllers(server_id) as start:
        yield start


@pytest.fixture
async def ctl(start_controller: StartController) -> Ctl:
    return await start_controller()


@pytest.fixture
def fake() -> FakeRuntime:
    return FakeRuntime("fake-ctl")


@pytest.fixture
async def start_fake(fake: FakeRuntime) -> AsyncIterator[StartController]:
    """Start controllers over the one in-memory runtime."""
    async with _controllers(fake.server_id) as start:
        yield partial(start, fake)


@pytest.fixture
async def fake_ctl(start_fake: StartController) -> Ctl:
    return await start_fake()

