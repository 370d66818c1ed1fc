"""The hub's usage alerts pushed to Alertmanager (``MMANAGER_ALERTMANAGER_URL``): through a real Alertmanager
(Debian's, with the shipped configuration) to the webhook receiver the test runs, opened and then resolved by
heartbeats to an in-process hub on real PostgreSQL; what is sent for which stored alerts; and an Alertmanager
that cannot be reached, logged once and retried, never in the way."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.app import create_app
from hub.config import HubSettings
from hub.db import Database
from hub.models import AlertModel
from hub.services.alertmanager import ALERTNAME, Alertmanagers, hold, postable, where
from hub.services.users import create_user
from tests.hub.conftest import KEY
from tests.support.alertmanager import Webhook, alertmanager_server, webhook
from tests.support.net import free_port


@pytest.fixture
def receiver() -> Iterator[Webhook]:
    with webhook() as hook:
        yield hook


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: Webhook) -> Iterator[str]:
    with alertmanager_server(tmp_path, receiver.url) as url:
        yield url


@pytest.fixture
async def hub(db: Database, alertmanager: str) -> AsyncIterator[httpx.AsyncClient]:
    """A hub that leads at once and pushes its alerts every 0.2 s; no controller but the test's heartbeats."""
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=0.5, heartbeat_grace=3,
                           alert_cpu_percent=80, alertmanager_url=alertmanager, alertmanager_interval=0.2)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with db.session() as session:
            _, admin = await create_user(session, "admin", is_admin=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub", timeout=30,
                                     headers={"Authorization": f"Bearer {admin}"}) as client:
            yield client


def beat(cid: str, sequence: int, cpu: float) -> dict[str, Any]:
    usage = {"sampled_at": datetime.now(UTC).isoformat(), "cpu_percent": cpu, "memory_bytes": 2**20,
             "memory_percent": 5}
    return {
        "server_id": cid, "url": f"http://{cid}.test:8001", "server_type": "cpu", "sequence": sequence,
        "health": {
            "status": "healthy", "server_id": cid, "server_type": "cpu", "version": "t", "docker": True,
            "containers": {"running": 1, "max_allowed": 20},
            "resources": {"cpu_cores": 2, "memory_total_gb": 8, "memory_available_gb": 4},
            "load_percentage": 5.0, "memory_usage_percent": 50.0,
            "capabilities": {"gpu_support": False, "max_memory_gb": 8},
        },
        "containers": [{"container_id": "c" * 64, "name": "mm-busy-1", "service_id": "s" * 32, "state": "running",
                        "usage": usage}],
    }


async def test_a_hub_alert_and_its_resolution_reach_the_webhook_through_alertmanager(
        hub: httpx.AsyncClient, receiver: Webhook) -> None:
    cid = f"am-{uuid.uuid4().hex[:6]}"
    key = {"Authorization": f"Bearer {KEY}"}
    r = await hub.post(f"/api/controllers/{cid}/heartbeat", json=beat(cid, 1, cpu=95.5), headers=key)
    assert r.status_code == 200, r.text

    def ours(status: str) -> Any:
        return lambda notification, alert: (alert["labels"].get("controller") == cid and alert["status"] == status
                                            and notification["status"] == status)

    firing = await asyncio.to_thread(receiver.alert, ours("firing"), 20)
    [stored] = (await hub.get("/api/admin/alerts", params={"active": "true", "controller_id": cid})).json()
    assert firing["labels"] == {"alertname": ALERTNAME, "kind": "cpu", "controller": cid, "service": "s" * 32,
                                "container": "mm-busy-1", "severity": "warning"}
    assert firing["annotations"]["summary"] == \
        f"CPU at 95.5% of one core on container mm-busy-1 on controller {cid} (threshold 80%)"
    assert firing["annotations"]["alert_id"] == stored["id"]
    assert datetime.fromisoformat(firing["startsAt"]) == datetime.fromisoformat(stored["started_at"])

    # Under the threshold less the hysteresis: the hub resolves it, and Alertmanager says so (send_resolved).
    r = await hub.post(f"/api/controllers/{cid}/heartbeat", json=beat(cid, 2, cpu=3.0), headers=key)
    assert r.status_code == 200, r.text
    resolved = await asyncio.to_thread(receiver.alert, ours("resolved"), 20)
    [stored] = (await hub.get("/api/admin/alerts", params={"controller_id": cid})).json()
    assert stored["resolved_at"] is not None
    assert resolved["annotations"]["alert_id"] == stored["id"]
    assert datetime.fromisoformat(resolved["endsAt"]) == datetime.fromisoformat(stored["resolved_at"])


# ------------------------------------------------------------------ what is sent


NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def alert(kind: str = "cpu", container: str | None = "k1", started: int = 0, resolved: int | None = None,
          **more: Any) -> AlertModel:
    return AlertModel(id=uuid.uuid4().hex, kind=kind, controller_id="c1", service_id="s1" if container else None,
                      container_id=container, container_name=f"mm-{container}" if container else None, value=91.25,
                      threshold=80, started_at=NOW + timedelta(minutes=started),
                      resolved_at=None if resolved is None else NOW + timedelta(minutes=resolved), **more)


def test_per_key_the_open_alert_or_else_the_newest_resolved_one_is_sent() -> None:
    old, newer, reopened = alert(started=-30, resolved=-20), alert(started=-10, resolved=-5), alert(started=-1)
    disk_old, disk_new = alert("disk", None, started=-9, resolved=-8), alert("disk", None, started=-7, resolved=-6)
    other = alert(container="k2", started=-3, resolved=-2)
    sent = postable([newer, reopened, old, disk_new, other, disk_old], NOW, interval=30)
    assert [a["annotations"]["alert_id"] for a in sent] == [reopened.id, other.id, disk_new.id]
    # An open alert ends ahead of now, pushed on at each send; a resolved one at its resolution.
    assert sent[0]["endsAt"] == "2025-03-01T12:02:00Z" and hold(30) == 120 and hold(0.2) == 60
    assert (sent[1]["startsAt"], sent[1]["endsAt"]) == ("2025-03-01T11:57:00Z", "2025-03-01T11:58:00Z")
    assert sent[2]["labels"] == {"alertname": ALERTNAME, "kind": "disk", "controller": "c1", "severity": "warning"}
    assert sent[2]["annotations"]["summary"] == "disk at 91.25% on controller c1 (threshold 80%)"
    assert postable([], NOW, 30) == []
    json.dumps(sent)  # the body as posted


def test_alerts_alertmanager_takes_for_one_are_sent_as_one() -> None:
    # Two rows of different container ids with the same labels (a container re-created under its name):
    # Alertmanager knows them as one alert, so only the open one is sent, not both overwriting each other.
    gone = alert(started=-10, resolved=-5)
    again = alert(container="k9", started=-1)
    again.container_name = gone.container_name
    sent = postable([gone, again], NOW, interval=30)
    assert [a["annotations"]["alert_id"] for a in sent] == [again.id]


async def test_an_alertmanager_out_of_reach_is_logged_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here
    secret = "pw-" + uuid.uuid4().hex
    managers = Alertmanagers([f"http://alerts:{secret}@127.0.0.1:{port}"])
    body = postable([alert()], NOW, 30)
    try:
        with caplog.at_level(logging.INFO, logger="hub.services.alertmanager"):
            assert await managers.send(body) == 0
            assert await managers.send(body) == 0
    finally:
        await managers.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "hub.services.alertmanager"]
    assert len(lines) == 1 and f"alertmanager http://127.0.0.1:{port}: 1 alert(s) not sent" in lines[0], lines
    assert secret not in caplog.text
    assert where(f"https://u:{secret}@am.example:9443/prefix") == "https://am.example:9443/prefix"
