"""Polls the controllers that do not push heartbeats, on the leading replica.

Their answers go through the same fencing as pushed heartbeats
(``HeartbeatIngest.observe``), so stale and orphan copies are removed by the
hub itself. A controller that pushes is polled only once its pushes have
stopped for long, and then seldom.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import or_, select

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import HubError
from hub.models import ControllerModel, utcnow
from hub.services.heartbeats import HeartbeatIngest
from mmanager.loops import LoopService
from mmanager.wire import ContainerUsage, HeartbeatContainer, seconds_since

log = logging.getLogger(__name__)

POLL_CONCURRENCY = 64
# A controller that pushed is polled once silent for this many intervals, and at least this many seconds.
PUSH_FALLBACK_INTERVALS = 10
PUSH_FALLBACK_MIN = 60.0


class ControllerPoller(LoopService):
    """Polls controllers that do not push heartbeats (no MMANAGER_HUB_URL), through the same
    fencing as pushed heartbeats: stale and orphan copies are removed by the hub itself."""

    name = "controller-poller"

    def __init__(self, db: Database, settings: HubSettings, client: ControllerClient, ingest: HeartbeatIngest) -> None:
        super().__init__(settings.heartbeat_interval)
        self.db = db
        self.settings = settings
        self.client = client
        self.ingest = ingest
        # When each silent pushing controller was last polled (time.monotonic()).
        self._fallback_polled: dict[str, float] = {}

    async def run_once(self) -> None:
        # A controller that pushes is not polled while it may just be late, or dead (a failover of
        # thousands would poll every late one, slowing the hub, making more beats late): only once its
        # pushes stopped for long after its grace (it was restarted without MMANAGER_HUB_URL, say), and
        # then once per that long (a dead one is asked whether it answers again, not every tick).
        fallback = max(PUSH_FALLBACK_INTERVALS * self.ingest.pace.interval, PUSH_FALLBACK_MIN)
        pushed_after = utcnow() - timedelta(seconds=fallback)
        async with self.db.session() as session:
            found = list(
                await session.execute(
                    select(ControllerModel.id, ControllerModel.url, ControllerModel.last_push_at.is_not(None)).where(
                        or_(ControllerModel.last_push_at.is_(None), ControllerModel.last_push_at < pushed_after)
                    )
                )
            )
        now = time.monotonic()
        controllers: list[tuple[str, str]] = []
        polled: dict[str, float] = {}
        for cid, url, pushed in found:
            if pushed:
                last = self._fallback_polled.get(cid, -math.inf)
                if now - last < fallback:
                    polled[cid] = last
                    continue
                polled[cid] = now
            controllers.append((cid, url))
        self._fallback_polled = polled
        # At most POLL_CONCURRENCY at once: httpx's pool scans its waiting requests for each one it serves,
        # so thousands of calls at once (a burst of controllers that have not pushed yet) stall the loop.
        slots = asyncio.Semaphore(POLL_CONCURRENCY)

        async def bounded(cid: str, url: str) -> None:
            async with slots:
                await self.poll(cid, url)

        await asyncio.gather(*(bounded(cid, url) for cid, url in controllers))

    async def poll(self, controller_id: str, url: str) -> None:
        timeout = min(3.0, self.settings.heartbeat_interval * 1.5)
        listed_at = utcnow()
        try:
            health = await self.client.health(controller_id, url, timeout=timeout)
            if health.server_id != controller_id:
                # Another controller answers at this URL (a typo on registration, a reused address): its
                # containers are not this controller's, and treating them as orphans would remove them.
                self.ingest.observe_failure(
                    controller_id, f"the controller at {url} is {health.server_id!r}, not {controller_id!r}")
                return
            listing = await self.client.list_containers(controller_id, url) if health.status == "healthy" else []
        except HubError as exc:
            self.ingest.observe_failure(controller_id, exc.message)
            return
        except Exception as exc:  # a malformed answer is as bad as none
            self.ingest.observe_failure(controller_id, f"{type(exc).__name__}: {exc}")
            return
        now = utcnow()
        # Heard now, before its rows are read (the main pool may be busy with a mass failover's moves).
        self.ingest.hear(controller_id, health, now)
        containers = [
            HeartbeatContainer(
                container_id=c.id, name=c.name, service_id=c.service_id, epoch=c.epoch, state=c.status,
                health=c.health, health_restarts=c.health_restarts, health_detail=c.health_detail,
                age_seconds=max(seconds_since(c.created, now) or 0.0, 0.0), ports=c.ports,
                usage=_usage(c.resource_usage), job_id=c.job_id, attempt_id=c.attempt_id,
            )
            for c in listing
        ]
        # Through the main pool: up to POLL_CONCURRENCY polls at once must not queue the heartbeats' reads.
        rows = await self.ingest.rows_for(controller_id, self.db)
        attempts = await self.ingest.attempts_of(containers, self.db)
        result = self.ingest.observe(controller_id, health, containers, rows, pushed=False, listed_at=listed_at,
                                     attempts=attempts, url=url)
        for order in result.stop:
            try:
                if order.attempt_id is not None:
                    await self.client.delete_job(controller_id, url, order.attempt_id)
                else:
                    await self.client.action(controller_id, url, order.container_id, "delete", force="true")
                log.info("removed %s container %s on %s", order.reason, order.container_id[:12], controller_id)
            except HubError as exc:
                log.warning("could not remove %s container %s on %s: %s", order.reason, order.container_id[:12],
                            controller_id, exc.message)


def _usage(resource_usage: dict[str, Any] | None) -> ContainerUsage | None:
    """Our controllers list each container's latest stats sample as ``resource_usage``; others
    (a GeoML-Hub mManager) may put something else there, which is no sample."""
    try:
        return ContainerUsage.model_validate(resource_usage) if resource_usage else None
    except ValidationError:
        return None
