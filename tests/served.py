"""A hub served in this process on a real port (uvicorn), for tests that speak HTTP to it from outside
the app: simulated controllers (``bench.sim``) beating to it, benchmark code measuring it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from hub.app import create_app
from hub.config import HubSettings
from tests.pg import _free_port


@asynccontextmanager
async def served_hub(settings: HubSettings, start_timeout: float = 20.0) -> AsyncIterator[str]:
    """The hub's URL once it listens; stopped (its lifespan run to the end) on the way out."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + start_timeout
    while not server.started and not task.done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    try:
        assert server.started, "the hub did not start listening"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
