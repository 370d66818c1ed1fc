"""The gateway's loops: the leader publishes the routing table (``GatewayPublisher``) and stops the services
that had no gateway traffic for their idle timeout (``IdleWatch``); every replica keeps the live gateway's
URL for services' ``url`` (``GatewayWatch``)."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime

from sqlalchemy import bindparam, func, select

from hub.config import HubSettings
from hub.db import Database
from hub.models import GatewayModel, OperationModel, ServiceModel, utcnow
from hub.services.gateway import GATEWAY_LIVE, GatewayDirectory, GatewayTable
from hub.services.lifecycle import ServiceManager
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

# How often a replica looks up the live gateway's URL (it changes when a gateway comes or goes).
WATCH_INTERVAL = 2.0
# How often the leader looks for idle services (an idle timeout is minutes by default).
IDLE_INTERVAL = 1.0

_TRAFFIC = select(GatewayModel.traffic).where(GatewayModel.last_seen_at >= bindparam("since"))
# A lifecycle operation counts as activity: without it, a service woken (or started) between two rounds
# would be judged by the traffic count it had before it stopped, and stopped again at once.
_LAST_OPERATION = (select(func.max(func.coalesce(OperationModel.finished_at, OperationModel.created_at)))
                   .where(OperationModel.service_id == ServiceModel.id).scalar_subquery())
_RUNNING = select(ServiceModel.id, ServiceModel.spec, _LAST_OPERATION.label("last_operation")).where(
    ServiceModel.status == "running", ServiceModel.desired_state == "running")


# A publish of a large table (tens of thousands of replicas) holds the event loop for a while: the next one
# waits this many times as long, so publishing takes at most about a fifth of the leader's time.
PUBLISH_PAUSE = 4.0


class GatewayPublisher(LoopService):
    """The leader's: a new version of the routing table whenever the services or their keys changed."""

    name = "gateway-publisher"

    def __init__(self, table: GatewayTable, interval: float) -> None:
        super().__init__(interval, jitter=0.0)
        self.table = table

    async def run_once(self) -> None:
        await self.table.publish()

    def next_delay(self, took: float) -> float:
        return max(self.interval - took, PUBLISH_PAUSE * took)


class GatewayWatch(LoopService):
    """Every replica's: which gateway URL services' ``url`` start with."""

    name = "gateway-watch"

    def __init__(self, directory: GatewayDirectory) -> None:
        super().__init__(WATCH_INTERVAL)
        self.directory = directory

    async def run_once(self) -> None:
        await self.directory.refresh()


class IdleWatch(LoopService):
    """The leader's: a running service whose requests through the live gateways have not changed, and that had
    no lifecycle operation, for its idle timeout (``idle_timeout``, else ``MMANAGER_SERVICE_IDLE_TIMEOUT``
    minutes) is stopped as ``idle``.

    What it has seen is kept in memory, so a new leader (or a restarted hub) gives every service a full
    timeout again; with no live gateway there is no traffic to judge by, and nothing is stopped.
    """

    name = "idle-watch"

    def __init__(self, db: Database, services: ServiceManager, settings: HubSettings,
                 interval: float = IDLE_INTERVAL) -> None:
        super().__init__(interval)
        self.db = db
        self.services = services
        self.default_timeout = settings.service_idle_timeout * 60
        # Service id -> (its requests through the gateways, when that count last changed or was first seen).
        self._seen: dict[str, tuple[int, datetime]] = {}
        self._stopping: set[str] = set()

    async def run_once(self) -> None:
        reports = await self.db.all(_TRAFFIC, {"since": utcnow() - GATEWAY_LIVE})
        if not reports:
            self._seen.clear()
            return
        totals: dict[str, int] = defaultdict(int)
        for report in reports:
            for service_id, requests in (report["traffic"] or {}).items():
                totals[service_id] += requests
        now = utcnow()
        seen: dict[str, tuple[int, datetime]] = {}
        for row in await self.db.all(_RUNNING, {}):
            service_id, timeout = row["id"], row["spec"].get("idle_timeout")
            timeout = self.default_timeout if timeout is None else timeout
            if timeout <= 0:
                continue
            requests = totals.get(service_id, 0)
            last = self._seen.get(service_id)
            if last is None or last[0] != requests:
                seen[service_id] = (requests, now)
                continue
            seen[service_id] = last
            active = max(last[1], row["last_operation"] or last[1])
            idle_for = (now - active).total_seconds()
            if idle_for >= timeout and service_id not in self._stopping:
                self._stop(service_id, idle_for)
        self._seen = seen

    def _stop(self, service_id: str, idle_for: float) -> None:
        self._stopping.add(service_id)

        async def stop() -> None:
            try:
                if await self.services.idle_stop(service_id, idle_for) is not None:
                    log.info("service %s stopped: no requests through the gateways for %.0fs", service_id, idle_for)
            finally:
                self._stopping.discard(service_id)

        self.services.spawn(stop())
