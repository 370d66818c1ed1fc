"""Whom the leader polls: controllers that do not push, every tick; one that pushes only after a long
silence, and then once per that silence (a mass failure must not turn into a storm of polls of
dead or merely late controllers); and a poll that answered counts at once, before the poller's reads.
Real PostgreSQL; the controllers are a client that records the calls and answers none, as dead servers
do, or one that answers healthy."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from hub.background.poller import PUSH_FALLBACK_MIN, ControllerPoller
from hub.config import HubSettings
from hub.db import Database
from hub.errors import ControllerUnavailable
from hub.metrics import HubMetrics
from hub.models import ControllerModel, utcnow
from hub.services.heartbeats import HeartbeatIngest
from mmanager.wire import ControllerHealth
from tests.hub.test_failure_handling import heartbeat
from tests.support.poll import eventually

KEY = "test-key-" + "x" * 32


class Unreachable:
    """Every controller is down; the health calls are counted."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def health(self, controller_id: str, url: str, **_: Any) -> Any:
        self.asked.append(controller_id)
        raise ControllerUnavailable(f"controller {controller_id} is unreachable")


async def test_pushing_controllers_are_polled_only_after_a_long_silence_and_then_rarely(db: Database) -> None:
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=2, heartbeat_grace=6)
    now = utcnow()
    async with db.session() as session:
        session.add_all([
            ControllerModel(id="polled", url="http://polled:8001", status="healthy"),
            ControllerModel(id="late", url="http://late:8001", status="unhealthy",
                            last_push_at=now - timedelta(seconds=20)),
            ControllerModel(id="gone", url="http://gone:8001", status="unhealthy",
                            last_push_at=now - timedelta(seconds=PUSH_FALLBACK_MIN + 5)),
            ControllerModel(id="beating", url="http://beating:8001", status="healthy", last_push_at=now),
        ])
    client = Unreachable()
    poller = ControllerPoller(db, settings, client, HeartbeatIngest(db, settings, HubMetrics()))

    await poller.run_once()
    # Silent past the grace (6 s) but not for long: maybe late, maybe dead; its heartbeats decide.
    assert sorted(client.asked) == ["gone", "polled"]

    client.asked.clear()
    await poller.run_once()
    await poller.run_once()
    # The one that never pushed is polled each tick; the long-silent pusher was asked once already.
    assert client.asked == ["polled", "polled"]

    # Once the fallback period has passed since it was last asked, it is asked again.
    poller._fallback_polled["gone"] -= PUSH_FALLBACK_MIN + 1
    client.asked.clear()
    await poller.run_once()
    assert sorted(client.asked) == ["gone", "polled"]


class Answering:
    """Every controller answers healthy, with no containers."""

    async def health(self, controller_id: str, url: str, **_: Any) -> Any:
        return ControllerHealth.model_validate(heartbeat(controller_id, [])["health"])

    async def list_containers(self, controller_id: str, url: str) -> list[Any]:
        return []


async def test_a_polled_controller_is_heard_before_its_rows_are_read(db: Database) -> None:
    """A poll that answered counts even while the poller's pool is taken (a mass failover's moves): its
    controller is not declared lost for the hub's own wait."""
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=2, heartbeat_grace=6)
    async with db.session() as session:
        session.add(ControllerModel(id="polled", url="http://polled:8001", status="healthy"))
    busy = Database(db.url, pool_size=1, max_overflow=0)
    ingest = HeartbeatIngest(db, settings, HubMetrics())
    poller = ControllerPoller(busy, settings, Answering(), ingest)
    held = await busy.engine.connect()
    try:
        before = utcnow()
        poll = asyncio.create_task(poller.poll("polled", "http://polled:8001"))
        await eventually(lambda: "polled" in ingest.heard, 2, "the poll's heartbeat heard")
        assert ingest.heard["polled"] >= before
        assert not poll.done()  # still waiting for a connection to read its rows
    finally:
        await held.close()
    await poll
    await busy.dispose()
