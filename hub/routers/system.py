"""Unauthenticated endpoints: liveness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, literal, select

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


@router.get("/metrics")
async def metrics(hub: HubDep) -> Response:
    async with hub.db.session() as session:
        counts = dict((await session.execute(select(ServiceModel.status, func.count()).group_by(ServiceModel.status))).all())
        health = dict((await session.execute(
            select(ServiceModel.id, ServiceModel.health).where(ServiceModel.health.in_(("healthy", "unhealthy")))
        )).all())
        # From the table, not from what this replica heard: every replica then exports the same value, also
        # for a controller whose heartbeats go to another replica (no stale 0 keeps ControllerDown firing).
        controllers = dict((await session.execute(select(ControllerModel.id, ControllerModel.status))).all())
    for controller_id, status in controllers.items():
        hub.metrics.controllers.set((controller_id,), up=1 if status == "healthy" else 0)
    hub.metrics.set_service_counts(counts)
    hub.metrics.set_service_health(health)
    return Response(exposition(hub.metrics), media_type=CONTENT_TYPE_LATEST)
