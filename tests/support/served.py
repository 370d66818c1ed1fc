"""A hub served in this process on a real port (uvicorn), for tests that speak HTTP to it from outside
the app: simulated controllers (``bench.sim``) beating to it, benchmark code measuring it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from hub.app import create_app
from hub.config import HubSettings
from hub.deps import Hub
from tests.support.net import free_port
from tests.support.poll import eventually


@asynccontextmanager
async def served_hub(settings: HubSettings, start_timeout: float = 20.0, hub: Hub | None = None) -> AsyncIterator[str]:
    """The hub's URL once it listens (``hub``: its parts, built by the caller to reach them); stopped (its
    lifespan run to the end) on the way out."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, hub), host="127.0.0.1", port=port, log_config=None,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), start_timeout, "the hub to start listening")
        assert server.started, "the hub stopped before it listened"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
