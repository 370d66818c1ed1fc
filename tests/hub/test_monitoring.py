"""Container monitoring through the hub, on real PostgreSQL and the real Docker engine: a service
burning CPU on a polled controller opens an alert, shows on the hub's /metrics and in its history;
stopping it resolves the alert."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from controller.app import create_app as create_controller_app
from controller.config import ControllerSettings
from examples.images import EXAMPLE_IMAGE
from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.metrics import HubMetrics
from hub.migrate import upgrade
from hub.models import AlertModel, ServiceMetricModel
from hub.services.monitoring import Monitor, service_history
from hub.services.users import create_user
from mmanager.wire import (
    ContainerUsage,
    ControllerHealth,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    HeartbeatContainer,
)
from tests.hub.conftest import KEY, Cluster, Router
from tests.support.pg import create_database
from tests.support.poll import eventually

BURN = ["sh", "-c", "trap 'exit 0' TERM; while :; do :; done"]


@pytest.fixture
async def monitored(db: Database, docker_client: docker.DockerClient, example_image: str) -> AsyncIterator[Cluster]:
    """One polled controller sampling stats twice a second; a hub with low thresholds and 1 s history."""
    cid = f"m{uuid.uuid4().hex[:6]}"
    router = Router()
    controller = create_controller_app(ControllerSettings(
        _env_file=None, MMANAGER_API_KEY=KEY, SERVER_ID=cid, MAX_CONTAINERS=10, CONTROLLER_URL=f"http://{cid}.test",
        PUBLISH_IP="127.0.0.1", GPU_DEVICES="", MMANAGER_STATS_INTERVAL=0.5,
    ))
    router.add(f"{cid}.test", controller)
    settings = HubSettings(
        database_url=db.url, api_key=KEY, heartbeat_interval=0.5, heartbeat_grace=3, orphan_grace=2,
        controllers=json.dumps([{"id": cid, "url": f"http://{cid}.test"}]),
        alert_cpu_percent=40, alert_disk_percent=0.01, metrics_resolution=1,
    )
    hub = build_hub(settings, db=Database(db.url), transport=router)
    app = create_app(settings, hub=hub)
    async with controller.router.lifespan_context(controller), app.router.lifespan_context(app):
        async with db.session() as session:
            _, admin_token = await create_user(session, "admin", is_admin=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub", timeout=60,
                                     headers={"Authorization": f"Bearer {admin_token}"}) as client:
            cluster = Cluster(client, admin_token, db, router, docker_client, [cid], parts=hub)
            try:
                yield cluster
            finally:
                for container in cluster.containers():
                    with contextlib.suppress(docker.errors.APIError):
                        container.remove(force=True)


def metric(text: str, name: str, **labels: str) -> list[float]:
    return [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


async def test_a_busy_service_opens_an_alert_shows_in_metrics_and_history_and_resolves_when_stopped(
        monitored: Cluster) -> None:
    hub, cid = monitored.hub, monitored.controller_ids[0]
    alice, bob = await monitored.user("alice"), await monitored.user("bob")
    r = await hub.post("/api/alice/load/services", headers=alice, json={
        "name": "burner", "image": EXAMPLE_IMAGE, "command": BURN, "resources": {"cpu_limit": 1, "memory_limit": "64MB"}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = await hub.post("/api/alice/load/services", headers=alice, json={
        "name": "healthy", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "health_check": {"path": "/health", "port": 5000, "interval": 1}})
    assert r.status_code == 201, r.text
    healthy_sid = r.json()["id"]

    async def open_cpu_alert() -> list[dict[str, Any]]:
        r = await hub.get("/api/admin/alerts", params={"active": "true", "kind": "cpu"})
        assert r.status_code == 200, r.text
        return [a for a in r.json() if a["service_id"] == sid]

    [alert] = await eventually(open_cpu_alert, 20, "a cpu alert for the busy service", interval=0.25)
    assert alert["controller_id"] == cid and alert["value"] >= 40 and alert["threshold"] == 40
    assert alert["active"] and alert["resolved_at"] is None
    # The disk of the controller's Docker is fuller than 0.01 %.
    disk = (await hub.get("/api/admin/alerts", params={"kind": "disk", "controller_id": cid})).json()
    assert [(a["kind"], a["active"], a["service_id"]) for a in disk] == [("disk", True, None)]

    # One scrape of the hub shows it all.
    async def scraped() -> str | None:
        text = (await hub.get("/metrics")).text
        return text if metric(text, "mmanager_service_health", service=healthy_sid) == [1.0] else None

    text = await eventually(scraped, 15, "the healthy service's health on /metrics", interval=0.25)
    assert metric(text, "mmanager_container_cpu_percent", controller=cid, service=sid)[0] > 50
    assert 0 < metric(text, "mmanager_container_memory_bytes", controller=cid, service=sid)[0] <= 64 * 2**20
    assert metric(text, "mmanager_alerts_active", kind="cpu") == [1.0]
    assert metric(text, "mmanager_alerts_total", kind="cpu") == [1.0]
    assert 0 < metric(text, "mmanager_disk_usage_percent", controller=cid)[0] < 100
    assert metric(text, "mmanager_controller_call_duration_seconds_count", call="create") == [2.0]
    assert metric(text, "mmanager_controller_call_duration_seconds_count", call="list")[0] > 0
    assert metric(text, "mmanager_service_health", service=sid) == []  # no health check: unknown

    # History, for its owner only.
    async def history() -> list[dict[str, Any]]:
        r = await hub.get(f"/api/services/{sid}/metrics", params={"resolution": 1}, headers=alice)
        assert r.status_code == 200, r.text
        return [p for p in r.json()["points"] if p["cpu_percent_max"] > 50]

    [point, *_] = await eventually(history, 10, "history points", interval=0.25)
    assert point["samples"] >= 1 and 0 < point["memory_bytes_max"] <= 64 * 2**20
    r = await hub.get(f"/api/services/{sid}/metrics", params={"resolution": 3600}, headers=alice)
    assert r.json()["resolution"] == 3600 and len(r.json()["points"]) <= 2
    r = await hub.get(f"/api/services/{sid}/metrics", headers=bob)
    assert r.status_code == 404 and r.json()["error"]["code"] == "SERVICE_NOT_FOUND"
    r = await hub.get(f"/api/services/{sid}/metrics", params={"since": "yesterday"}, headers=alice)
    assert r.status_code == 422
    r = await hub.get("/api/admin/alerts", params={"kind": "gpu"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert (await hub.get("/api/admin/alerts", headers=alice)).status_code == 403

    r = await hub.post(f"/api/services/{sid}/stop", headers=alice)
    assert r.status_code == 200, r.text

    async def resolved() -> list[dict[str, Any]]:
        r = await hub.get("/api/admin/alerts", params={"active": "false", "kind": "cpu"})
        return [a for a in r.json() if a["id"] == alert["id"] and a["resolved_at"]]

    await eventually(resolved, 10, "the alert resolved", interval=0.25)
    assert await open_cpu_alert() == []
    text = (await hub.get("/metrics")).text
    assert metric(text, "mmanager_alerts_active", kind="cpu") == [0.0]
    assert metric(text, "mmanager_container_cpu_percent", service=sid) == []


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
async def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    else:
        url = await create_database(request.getfixturevalue("pg_server"), "monitor")
    await asyncio.to_thread(upgrade, url)
    database = Database(url)
    yield database
    await database.dispose()


def _report(cpu: float, at: datetime, *, disk: float = 10.0) -> tuple[ControllerHealth, list[HeartbeatContainer]]:
    health = ControllerHealth(
        status="healthy", server_id="c1", server_type="cpu", version="1", docker=True,
        containers=HealthContainers(running=1, max_allowed=10), load_percentage=10, memory_usage_percent=10,
        resources=HealthResources(cpu_cores=1, memory_total_gb=1, memory_available_gb=1),
        capabilities=HealthCapabilities(gpu_support=False, max_memory_gb=1), disk_usage_percent=disk,
    )
    usage = ContainerUsage(sampled_at=at, cpu_percent=cpu, memory_bytes=1000, memory_percent=10, network_rx_bytes=7)
    return health, [HeartbeatContainer(container_id="k1", name="svc-1", service_id="s1", state="running", usage=usage)]


async def test_history_and_alerts_are_written_once_merged_across_replicas_and_pruned(any_db: Database) -> None:
    """On PostgreSQL and SQLite: repeated samples count once, two replicas' halves of one bucket merge,
    an alert opened on two replicas is stored once, and old rows go."""
    settings = HubSettings(database_url=any_db.url, api_key=KEY, metrics_resolution=1, metrics_retention=60,
                           alert_cpu_percent=50, heartbeat_grace=3)
    one, two = (Monitor(any_db, settings, HubMetrics()) for _ in range(2))
    start = datetime.now(UTC)
    one.observe("c1", *_report(90, start), current={"k1"})
    one.observe("c1", *_report(90, start), current={"k1"})  # the next heartbeat repeats the sample
    two.observe("c1", *_report(30, start + timedelta(milliseconds=1)), current={"k1"})
    two.observe("c1", *_report(70, start + timedelta(milliseconds=2)), current={"k1"})
    await asyncio.sleep(1.1)
    await one.flush()
    await two.flush()
    async with any_db.session() as session:
        session.add(ServiceMetricModel(
            service_id="s1", at=start - timedelta(hours=1), samples=1, cpu_percent_avg=1, cpu_percent_max=1,
            memory_bytes_avg=1, memory_bytes_max=1, memory_percent_max=1, network_rx_bytes=0, network_tx_bytes=0,
            block_read_bytes=0, block_write_bytes=0))
        points = await service_history(session, "s1", start - timedelta(minutes=5), 60)
        alerts = list(await session.scalars(select(AlertModel)))
    assert [(p["samples"], p["cpu_percent_avg"], p["cpu_percent_max"], p["network_rx_bytes"]) for p in points] \
        == [(3, pytest.approx(190 / 3, abs=0.01), 90, 7)]
    assert [(a.kind, a.container_id, a.value, a.resolved_at) for a in alerts] == [("cpu", "k1", 90, None)]

    # Back under the threshold minus the hysteresis: resolved. The hour-old row goes with the next write.
    one.observe("c1", *_report(10, start + timedelta(seconds=2)), current={"k1"})
    await asyncio.sleep(1.1)
    await one.flush()
    async with any_db.session() as session:
        [alert] = await session.scalars(select(AlertModel))
        stored = sorted(r.at for r in await session.scalars(select(ServiceMetricModel)))
    assert alert.resolved_at is not None
    assert len(stored) == 2 and stored[0] > start - timedelta(minutes=1)


async def test_two_replicas_opening_an_alert_at_the_same_instant_store_it_once(
        any_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check for an open alert and the insert are not one step: two replicas can both find none. The
    database's partial unique index (uq_alerts_open) keeps the second insert out."""
    settings = HubSettings(database_url=any_db.url, api_key=KEY, metrics_resolution=1, alert_cpu_percent=50)
    one, two = (Monitor(any_db, settings, HubMetrics()) for _ in range(2))
    start = datetime.now(UTC)
    for monitor in (one, two):
        monitor.observe("c1", *_report(90, start), current={"k1"})

    async def none_open(*_: object, **__: object) -> dict[object, object]:
        return {}  # what each replica saw just before the other's insert

    monkeypatch.setattr(Monitor, "_open_keys", none_open)
    await asyncio.sleep(1.1)
    await one.flush()
    await two.flush()
    async with any_db.session() as session:
        alerts = list(await session.scalars(select(AlertModel)))
    assert [(a.kind, a.container_id, a.resolved_at) for a in alerts] == [("cpu", "k1", None)]
