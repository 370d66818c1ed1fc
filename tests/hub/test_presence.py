"""Presence streams (hub.services.presence) on a hub served on a real port, on real PostgreSQL, with real
connections: a stream that ends with ``bye`` leaves its controller alone; one cut off while the controller's
address refuses connections marks it lost at once; one cut off while the address answers does not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from sqlalchemy import update

from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.deps import Hub
from hub.models import ControllerModel, utcnow
from tests.hub.conftest import KEY
from tests.hub.test_failure_handling import heartbeat
from tests.support.net import free_port
from tests.support.poll import eventually

# ctl-dead's address refuses connections (nothing listens there); ctl-alive's answers.
DEAD, ALIVE = "ctl-dead", "ctl-alive"


@dataclass
class Served:
    port: int
    parts: Hub
    db: Database

    def sample(self, name: str, **labels: str) -> float:
        return self.parts.metrics.registry.get_sample_value(name, labels) or 0.0

    async def status(self, controller_id: str) -> tuple[str, str | None]:
        async with self.db.session() as session:
            row = await session.get(ControllerModel, controller_id, populate_existing=True)
            assert row is not None
            return row.status, row.error_message

    async def open(self, controller_id: str, key: str = KEY) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A presence stream as a controller opens it: headers, then a chunked body that goes on."""
        held = self.sample("mmanager_presence_streams")
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"POST /api/controllers/{controller_id}/presence HTTP/1.1\r\nHost: hub\r\n"
                     f"Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunk(b"hello\n"))
        await writer.drain()
        await eventually(lambda: self.sample("mmanager_presence_streams") == held + 1, 5, "the stream held")
        return reader, writer


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return status, json.loads(await reader.readexactly(length))


@pytest.fixture
async def served(db: Database) -> AsyncIterator[Served]:
    async def answer_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(answer_health, "127.0.0.1", 0)
    alive_port = listening.sockets[0].getsockname()[1]
    entries = [{"id": DEAD, "url": f"http://127.0.0.1:{free_port()}"},
               {"id": ALIVE, "url": f"http://127.0.0.1:{alive_port}"}]
    settings = HubSettings(database_url=db.url, api_key=KEY, controllers=json.dumps(entries), _env_file=None)
    parts = build_hub(settings, db=Database(db.url))
    port = free_port()
    # No loops: nothing but these tests writes the controllers' rows.
    server = uvicorn.Server(uvicorn.Config(create_app(settings, hub=parts, run_loops=False), host="127.0.0.1",
                                           port=port, log_config=None, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), 20, "the hub listening")
        async with db.session() as session:
            await session.execute(update(ControllerModel).values(status="healthy", last_heartbeat_at=utcnow()))
        yield Served(port, parts, db)
    finally:
        # As `mmanager hub serve` does on its way out: the streams end, so shutdown does not wait for them.
        parts.presence.close()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        listening.close()


async def test_a_stream_ended_with_bye_leaves_its_controller_alone(served: Served) -> None:
    reader, writer = await served.open(DEAD)
    writer.write(chunk(b"alive\n") + chunk(b"bye\n") + b"0\r\n\r\n")
    assert await answer(reader) == (200, {"ended": "bye"})
    writer.close()
    assert await served.status(DEAD) == ("healthy", None)
    assert served.sample("mmanager_controllers_suspected_total", outcome="confirmed") == 0
    assert served.sample("mmanager_controllers_suspected_total", outcome="cleared") == 0


async def test_a_stream_cut_off_where_nothing_listens_marks_its_controller_lost_at_once(served: Served) -> None:
    # A beat it sent just before it died, not yet written: it must not undo the mark once written.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as client:
        beat = await client.post(f"/api/controllers/{DEAD}/heartbeat", json=heartbeat(DEAD, []),
                                 headers={"Authorization": f"Bearer {KEY}"})
        assert beat.status_code == 200, beat.text
        _, writer = await served.open(DEAD)
        writer.close()  # as the kernel closes a killed process's connections
        await eventually(lambda: served.sample("mmanager_controllers_suspected_total", outcome="confirmed") == 1, 5,
                         "the suspicion confirmed")
        status, error = await served.status(DEAD)
        assert status == "unhealthy"
        assert error is not None and "refuses connections" in error
        await served.parts.ingest.flush()
        assert (await served.status(DEAD))[0] == "unhealthy"
        # Restarted, it beats again: it is taken back as any controller that was lost.
        again = await client.post(f"/api/controllers/{DEAD}/heartbeat", json=heartbeat(DEAD, []),
                                  headers={"Authorization": f"Bearer {KEY}"})
        assert again.status_code == 200, again.text
        await served.parts.ingest.flush()
        assert await served.status(DEAD) == ("healthy", None)
    assert await served.status(ALIVE) == ("healthy", None)


async def test_a_stream_cut_off_where_the_controller_answers_is_left_to_the_grace(served: Served) -> None:
    _, writer = await served.open(ALIVE)
    writer.close()
    await eventually(lambda: served.sample("mmanager_controllers_suspected_total", outcome="cleared") == 1, 5,
                     "the suspicion cleared")
    assert await served.status(ALIVE) == ("healthy", None)
    assert served.sample("mmanager_controllers_suspected_total", outcome="confirmed") == 0


async def test_a_stream_needs_the_controller_key_and_ends_when_the_replica_shuts_down(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(f"POST /api/controllers/{DEAD}/presence HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer wrong\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\n".encode() + chunk(b"hello\n"))
    status, body = await answer(reader)
    assert status == 401, body
    writer.close()

    reader, writer = await served.open(ALIVE)
    served.parts.presence.close()
    status, body = await answer(reader)
    assert status == 503 and body["error"]["code"] == "HUB_SHUTTING_DOWN"  # type: ignore[index]
    writer.close()
    assert served.sample("mmanager_controllers_suspected_total", outcome="cleared") == 0
