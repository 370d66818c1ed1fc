"""Whom the leader polls: controllers that do not push, every tick; one that pushes only after a long
silence, and then once per that silence (a mass failure must not turn into a storm of polls of
dead or merely late controllers). Real PostgreSQL; the controllers are a client that records the
calls and answers none, as dead servers do."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hub.background.reconciler import PUSH_FALLBACK_MIN, ControllerPoller
from hub.config import HubSettings
from hub.db import Database
from hub.errors import ControllerUnavailable
from hub.metrics import HubMetrics
from hub.models import ControllerModel, utcnow
from hub.services.heartbeats import HeartbeatIngest

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
    poller = ControllerPoller(db, settings, client, HeartbeatIngest(db, settings, HubMetrics()))  # type: ignore[arg-type]

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
