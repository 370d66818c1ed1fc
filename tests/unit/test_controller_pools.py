"""The hub's connection pool per controller (``PoolPerController``), against real HTTP servers on
127.0.0.1: calls to one controller reuse its connections, pools past the bound are closed least
recently used first, and never one whose response is still being read."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from hub.controller_client import PoolPerController
from tests.support.poll import eventually


@dataclass
class Server:
    url: str
    opened: int = 0
    closed: int = 0
    # Set to let a streamed (/slow) response finish.
    release: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def http_server() -> AsyncIterator[Server]:
    """HTTP/1.1 with keep-alive: ``/`` answers "ok"; ``/slow`` sends its first chunk, then the last one
    once ``release`` is set."""
    server = Server(url="")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.opened += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path == b"/slow":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    await writer.drain()
                    await server.release.wait()
                    writer.write(b"4\r\nlast\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            server.closed += 1
            writer.close()

    listening = await asyncio.start_server(serve, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        listening.close()


async def test_a_controllers_calls_reuse_its_connection_and_pools_past_the_bound_close_idle_first() -> None:
    async with http_server() as a, http_server() as b, http_server() as c:
        transport = PoolPerController(ssl.create_default_context(), max_pools=2)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                assert (await client.get(f"{a.url}/")).text == "ok"
            assert (await client.get(f"{b.url}/")).text == "ok"
            assert (await client.get(f"{a.url}/")).text == "ok"
            assert (a.opened, b.opened) == (1, 1)  # four calls to a on one connection

            # A third controller: the least recently used pool (b's) is closed, a's kept.
            assert (await client.get(f"{c.url}/")).text == "ok"
            await eventually(lambda: b.closed == 1, 2, "the pool closed")
            assert (a.closed, b.closed, c.closed) == (0, 1, 0)

            # a's response is still being read when its pool is the least recently used: a new pool
            # (b's again) closes c's instead.
            async with client.stream("GET", f"{a.url}/slow") as slow:
                chunks = slow.aiter_raw()
                assert await anext(chunks) == b"first"
                assert (await client.get(f"{c.url}/")).text == "ok"
                assert (await client.get(f"{b.url}/")).text == "ok"
                await eventually(lambda: c.closed == 1, 2, "the pool closed")
                assert (a.closed, c.closed) == (0, 1)
                a.release.set()
                assert [chunk async for chunk in chunks] == [b"last"]
            # Read to the end, a's pool is idle, and the next to go.
            assert (await client.get(f"{c.url}/")).text == "ok"
            await eventually(lambda: a.closed == 1, 2, "the pool closed")
            assert (a.opened, a.closed, b.opened, c.opened) == (1, 1, 2, 2)
        await eventually(lambda: b.closed == 2 and c.closed == 2, 2, "the pool closed")
        assert (b.closed, c.closed) == (2, 2)  # the client's close closes every pool
