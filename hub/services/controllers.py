"""Controllers: registration, health and drains.

A controller's ``status`` changes only through ``ControllerRegistry.record_health``
(what a poll saw) and the admin actions here, so the metrics and the table
cannot disagree. A change that takes a controller out of placement (a drain) is
told to the placement cache at once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Conflict, HubError, NotFound
from hub.metrics import HubMetrics
from hub.models import ControllerModel, OperationModel, ServiceModel, UserModel, utcnow
from hub.scheduler.snapshot import PlacementCache
from hub.schemas import ControllerIn, ControllerOut
from hub.services.operations import OperationLog
from mmanager.wire import ControllerHealth

log = logging.getLogger(__name__)


def controller_out(c: ControllerModel) -> ControllerOut:
    return ControllerOut(
        id=c.id,
        url=c.url,
        server_type=c.server_type,
        enabled=c.enabled,
        priority=c.priority,
        weight=c.weight,
        status="draining" if c.draining else c.status,  # type: ignore[arg-type]  # the column holds the Literal's values
        last_heartbeat_at=c.last_heartbeat_at,
        max_containers=c.max_containers,
        containers_running=c.containers_running,
        load_percentage=c.load_percentage,
        memory_usage_percent=c.memory_usage_percent,
        gpus=c.gpus,
        error=c.error_message,
    )


def healthy_fields(health: ControllerHealth, heard_at: datetime) -> dict[str, Any]:
    """The controller row's columns after a healthy report (a poll or a pushed heartbeat)."""
    return {
        "status": "healthy",
        "error_message": None,
        "last_heartbeat_at": heard_at,
        "containers_running": health.containers.running,
        "max_containers": health.containers.max_allowed,
        "load_percentage": health.load_percentage,
        "memory_usage_percent": health.memory_usage_percent,
        "cpu_cores": health.resources.cpu_cores,
        "memory_total_gb": health.resources.memory_total_gb,
        "memory_available_gb": health.resources.memory_available_gb,
        "gpus": [g.model_dump() for g in health.capabilities.gpus],
        "health_data": health.model_dump(mode="json"),
    }


async def get_controller(session: AsyncSession, controller_id: str) -> ControllerModel:
    controller = await session.get(ControllerModel, controller_id)
    if controller is None:
        raise NotFound(f"controller {controller_id!r} not found", code="CONTROLLER_NOT_FOUND")
    return controller


class ControllerRegistry:
    def __init__(self, db: Database, client: ControllerClient, settings: HubSettings, metrics: HubMetrics,
                 ops: OperationLog, placement: PlacementCache) -> None:
        self.db = db
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.ops = ops
        self.placement = placement

    async def sync_from_config(self) -> None:
        """Upsert ``MMANAGER_CONTROLLERS``: the configuration wins over the table at start-up."""
        entries = self.settings.controller_entries
        if not entries:
            return
        shared = [e.id for e in entries if e.api_key is None]
        if len(shared) > 1 and not self.settings.dev_mode:
            # Each of them holds the key that drives all of them: one broken into can drive the others.
            log.warning("%d controllers share MMANAGER_API_KEY (%s): give each entry its own api_key "
                        "(docs/SECURITY.md#controller-credentials)", len(shared), ", ".join(shared[:5]))
        async with self.db.session() as session:
            for entry in entries:
                row = await session.get(ControllerModel, entry.id)
                if row is None:
                    row = ControllerModel(id=entry.id)
                    session.add(row)
                if row.url != entry.url:
                    row.status = "unknown"
                row.url = entry.url
                row.server_type = entry.server_type
                row.enabled = entry.enabled
                row.priority = entry.priority
                row.weight = entry.weight

    async def register(self, session: AsyncSession, data: ControllerIn) -> ControllerModel:
        if await session.get(ControllerModel, data.id) is not None:
            raise Conflict(f"controller {data.id!r} is already registered", code="CONTROLLER_EXISTS")
        row = ControllerModel(**data.model_dump())
        row.url = row.url.rstrip("/")
        session.add(row)
        await session.flush()
        return row

    async def check(self, controller: ControllerModel) -> tuple[ControllerHealth | None, str | None]:
        """Ask a controller for its health; never raises."""
        try:
            return await self.client.health(controller.id, controller.url), None
        except HubError as exc:
            return None, exc.message
        except Exception as exc:  # a malformed answer is as bad as none
            return None, f"{type(exc).__name__}: {exc}"

    async def poll_one(self, session: AsyncSession, row: ControllerModel) -> ControllerHealth | None:
        health, error = await self.check(row)
        self.record_health(row, health, error)
        return health

    def record_health(self, row: ControllerModel, health: ControllerHealth | None, error: str | None) -> None:
        now = utcnow()
        if health is not None and health.status == "healthy":
            for field, value in healthy_fields(health, now).items():
                setattr(row, field, value)
        else:
            row.error_message = error or (health.error if health else None) or "unhealthy"
            grace = timedelta(seconds=self.settings.heartbeat_grace)
            if row.last_heartbeat_at is None or now - row.last_heartbeat_at > grace:
                row.status = "unhealthy"
        self.metrics.observe_controller(
            row.id, row.status == "healthy", row.containers_running, row.load_percentage, row.memory_usage_percent
        )

    async def drain(self, user: UserModel, controller_id: str, wait: bool = True) -> ControllerModel | OperationModel:
        """Disable the controller and have the reconciler move everything off it.

        The reconciler (on whichever replica runs the loops) does the moves and
        finishes this operation, so a drain survives a hub restart half-way.
        The call waits up to ``drain_timeout`` and then answers with the
        operation still running (202) rather than failing.
        """
        async with self.db.session() as session:
            controller = await get_controller(session, controller_id)
            controller.draining = True
            controller.enabled = False
            count = await session.scalar(
                select(func.count()).where(ServiceModel.controller_id == controller_id)
            ) or 0
            # With the flag, so the reconciler never finishes a drain whose operation is not there yet.
            op = self.ops.add(session, "drain", user.username, controller_id=controller_id,
                              details={"services": count})
        self.placement.stale()
        if not wait:
            return op
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        while asyncio.get_running_loop().time() < deadline:
            async with self.db.session() as session:
                fresh = await get_controller(session, controller_id)
                if not fresh.draining:
                    return fresh
            await asyncio.sleep(0.2)
        return op
