"""The controller's presence stream (controller.presence) against a bare HTTP server on a real port: what
it sends, that ``stop()`` ends it with ``bye``, and that it opens another when the hub ends one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from controller.presence import PresenceAgent
from tests.controller.conftest import make_settings
from tests.support.poll import eventually


@dataclass
class BareHub:
    """Reads each presence stream's chunks; answers 503 (as a replica shutting down) when told to."""

    port: int = 0
    streams: list[list[bytes]] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    answer_now: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        lines: list[bytes] = []
        self.streams.append(lines)
        self.ended.append(False)
        index = len(self.streams) - 1
        answer = asyncio.ensure_future(self.answer_now.wait())
        try:
            while True:
                size = asyncio.ensure_future(reader.readline())
                await asyncio.wait((size, answer), return_when=asyncio.FIRST_COMPLETED)
                if not size.done():
                    size.cancel()
                    self.answer_now.clear()
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    await writer.drain()
                    return
                length = int(size.result().strip() or b"0", 16)
                if length == 0:
                    await reader.readline()
                    self.ended[index] = True
                    writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{"ended":"bye"}')
                    await writer.drain()
                    return
                lines.append((await reader.readexactly(length + 2))[:-2])
        finally:
            answer.cancel()
            writer.close()


@pytest.fixture
async def bare_hub() -> AsyncIterator[BareHub]:
    hub = BareHub()
    server = await asyncio.start_server(hub.handle, "127.0.0.1", 0)
    hub.port = server.sockets[0].getsockname()[1]
    yield hub
    server.close()


async def test_the_stream_carries_keepalives_and_ends_with_bye_on_stop(bare_hub: BareHub) -> None:
    settings = make_settings("ctl-p", hub_url=f"http://127.0.0.1:{bare_hub.port}")
    agent = PresenceAgent(settings, lambda: f"http://127.0.0.1:{bare_hub.port}", lambda: "the-key", keepalive=0.05)
    agent.start()
    try:
        await eventually(lambda: len(bare_hub.streams) == 1 and len(bare_hub.streams[0]) >= 3, 5, "keepalives")
    finally:
        await agent.stop()
    head = bare_hub.heads[0].decode()
    assert head.startswith("POST /api/controllers/ctl-p/presence HTTP/1.1")
    assert "authorization: bearer the-key" in head.lower()
    lines = bare_hub.streams[0]
    assert lines[0] == b"hello\n" and set(lines[1:-1]) == {b"alive\n"} and lines[-1] == b"bye\n"
    assert bare_hub.ended == [True]
    assert len(bare_hub.streams) == 1  # none opened after the stop


async def test_a_stream_the_hub_ends_is_opened_again(bare_hub: BareHub) -> None:
    settings = make_settings("ctl-p", hub_url=f"http://127.0.0.1:{bare_hub.port}")
    agent = PresenceAgent(settings, lambda: f"http://127.0.0.1:{bare_hub.port}", lambda: "the-key", keepalive=0.05)
    agent.start()
    try:
        await eventually(lambda: len(bare_hub.streams) == 1, 5, "the first stream")
        bare_hub.answer_now.set()
        # The 503 is seen at the next keepalive's write at the latest; another stream follows after a backoff.
        await eventually(lambda: len(bare_hub.streams) == 2 and bare_hub.streams[1], 5, "a second stream")
    finally:
        await agent.stop()
    assert bare_hub.ended == [False, True]
