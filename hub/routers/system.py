"""Unauthenticated endpoints: liveness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, literal, or_, select

from hub.deps import HubDep
from hub.errors import HubError
from hub.metrics import exposition
from hub.models import ControllerModel, ServiceModel
from mmanager import __version__

router = APIRouter(tags=["system"])
# What /health asks the database (load balancers and probes call it often: the cheapest read there is).
_PING = select(literal(1))


@router.get("/health")
async def health(hub: HubDep) -> Any:
    try:
        await hub.db.first(_PING, {})
    except Exception as exc:
        raise HubError("database unreachable", code="DATABASE_UNAVAILABLE", status_code=503) from exc
    # Which replica answered, and whether it is the one running failure detection and failover.
    return {"status": "healthy", "version": __version__, "database": True, "replica": hub.replica_id,
            "leader": hub.reconciler is not None}


# What /metrics reads (each replica exports the same values, from the tables).
_COUNTS = select(ServiceModel.status, func.count().label("n")).group_by(ServiceModel.status)
_HEALTH = select(ServiceModel.id, ServiceModel.health).where(
    or_(ServiceModel.health == "healthy", ServiceModel.health == "unhealthy"))
_CONTROLLER_STATUS = select(ControllerModel.id, ControllerModel.status)


@router.get("/metrics")
async def metrics(hub: HubDep) -> Response:
    db = hub.db
    counts = {r["status"]: r["n"] for r in await db.all(_COUNTS, {})}
    health = {r["id"]: r["health"] for r in await db.all(_HEALTH, {})}
    # From the table, not from what this replica heard: every replica then exports the same value, also
    # for a controller whose heartbeats go to another replica (no stale 0 keeps ControllerDown firing).
    for r in await db.all(_CONTROLLER_STATUS, {}):
        hub.metrics.controllers.set((r["id"],), up=1 if r["status"] == "healthy" else 0)
    hub.metrics.set_service_counts(counts)
    hub.metrics.set_service_health(health)
    # Written in a thread: with thousands of controllers it takes a second or so (bench/metrics_scrape.py),
    # in which the event loop goes on answering heartbeats and the API between the thread's turns.
    return Response(await asyncio.to_thread(exposition, hub.metrics), media_type=CONTENT_TYPE_LATEST)
