"""Logs cannot exhaust a controller: followed streams are capped and kept off the pool every other Docker call
needs, a tail is cut to its newest bytes, and Docker rotates every container's log files.

Streams go through a real uvicorn server: httpx's in-process transport buffers whole responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import docker
import httpx
import uvicorn
from fastapi import FastAPI

from controller.runtime import _POOL_THREADS
from tests.controller.conftest import AUTH, Ctl, StartController
from tests.support.poll import eventually


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10, limits=limits) as c:
        yield c
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def running(ctl: Ctl, image: str, **body: object) -> str:
    response = await ctl.create(image, **body)
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


async def follow(stack: AsyncExitStack, client: httpx.AsyncClient, cid: str) -> httpx.Response:
    return await stack.enter_async_context(client.stream("GET", f"/containers/{cid}/logs", params={"follow": "true"}))


async def assert_prompt(ctl: Ctl, client: httpx.AsyncClient, image: str) -> None:
    """Listing and creating answer within seconds while the streams are open."""
    async with asyncio.timeout(10):
        listing = await asyncio.wait_for(client.get("/containers", params={"all": "true"}), 5)
        assert listing.status_code == 200 and listing.json()["containers"]
        created = await client.post("/containers", json={"image": image})
    assert created.status_code == 201, created.text


async def test_follow_streams_over_the_cap_are_refused_and_a_closed_one_frees_its_slot(
    start_controller: StartController, example_image: str
) -> None:
    ctl = await start_controller(max_log_streams=2)
    cid = await running(ctl, example_image)
    async with serving(ctl.app) as client, AsyncExitStack() as streams:
        first = await follow(streams, client, cid)
        second = await follow(streams, client, cid)
        assert (first.status_code, second.status_code) == (200, 200)

        refused = await client.get(f"/containers/{cid}/logs", params={"follow": "true"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "TOO_MANY_LOG_STREAMS"
        assert int(refused.headers["retry-after"]) >= 1
        await assert_prompt(ctl, client, example_image)

        await first.aclose()
        async def slot_free() -> bool:
            async with client.stream("GET", f"/containers/{cid}/logs", params={"follow": "true"}) as third:
                return third.status_code == 200

        await eventually(slot_free, 5, "closing a stream to free its slot", interval=0.05)


async def test_as_many_streams_as_docker_threads_leave_docker_calls_free(
    start_controller: StartController, example_image: str
) -> None:
    """Followers once shared the Docker call pool: this many idle ones took every thread, and listing hung."""
    ctl = await start_controller(max_log_streams=_POOL_THREADS)
    cid = await running(ctl, example_image)
    async with serving(ctl.app) as client, AsyncExitStack() as streams:
        opened = await asyncio.gather(*(follow(streams, client, cid) for _ in range(_POOL_THREADS)))
        assert {response.status_code for response in opened} == {200}
        await assert_prompt(ctl, client, example_image)


async def test_containers_rotate_their_logs_and_a_tail_keeps_the_newest_bytes(
    start_controller: StartController, docker_client: docker.DockerClient, example_image: str
) -> None:
    ctl = await start_controller(max_log_bytes=4096, log_max_size="2m", log_max_files=2)
    script = "for i in $(seq 1 2000); do echo line-$i-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; done; exec sleep 600"
    cid = await running(ctl, example_image, command=["sh", "-c", script])

    log_config = docker_client.containers.get(cid).attrs["HostConfig"]["LogConfig"]
    assert log_config == {"Type": "json-file", "Config": {"max-size": "2m", "max-file": "2"}}

    async def whole() -> str | None:
        logs = (await ctl.client.get(f"/containers/{cid}/logs", params={"lines": 100_000})).json()["logs"]
        return logs if "line-2000-" in logs else None

    logs = await eventually(whole, 10, "the last line in the tail", interval=0.05)
    assert len(logs.encode()) <= 4096
    assert logs.startswith("line-") and logs.endswith("line-2000-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
    assert "line-1-" not in logs
    # A short tail is answered whole.
    short = (await ctl.client.get(f"/containers/{cid}/logs", params={"lines": 2})).json()["logs"]
    assert short.splitlines() == [f"line-{i}-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" for i in (1999, 2000)]
