"""Heartbeat ingestion: what controllers report, coalesced into few writes.

A heartbeat is answered at once (the interval, and which containers the
controller must stop); what it says is kept in memory and written by
``flush()`` for all controllers together, one transaction per flush, so a
thousand controllers beating every two seconds cost a few writes a second,
not a thousand. Only changes are written for containers.

Polled controllers (those that do not push) go through the same path: the
monitor turns ``/health`` and ``/containers`` into the same observation.
Usage (thresholds, alerts, history) is judged and written the same way, by
``hub.services.monitoring``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, delete, func, or_, select, update

from hub.config import HubSettings
from hub.db import Database
from hub.errors import InvalidRequest, NotFound
from hub.metrics import HubMetrics
from hub.models import ContainerRegistryModel, ControllerModel, ServiceModel, utcnow
from hub.scheduler.reconcile import UNSETTLED, FenceResult, RegistryRow, RowUpdate, fence
from hub.services.audit import controller_source, insert_shipped
from hub.services.controller_keys import ControllerKeyAuth
from hub.services.controllers import healthy_fields
from hub.services.monitoring import Monitor
from mmanager.wire import (
    ControllerHealth,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    Heartbeat,
    HeartbeatAnswer,
    HeartbeatContainer,
)

log = logging.getLogger(__name__)

# Seconds a heartbeat may spend on the way, on top of the listing age it reports.
PUSH_LAG = 1.0


@dataclass
class _Observation:
    at: datetime
    health: ControllerHealth
    pushed: bool
    error: str | None = None


class HeartbeatIngest:
    def __init__(self, db: Database, settings: HubSettings, metrics: HubMetrics) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.keys = ControllerKeyAuth(db, settings)
        self.monitor = Monitor(db, settings, metrics)
        self._observations: dict[str, _Observation] = {}
        # Row updates with when they were observed: an observation never overwrites a newer change.
        self._updates: dict[str, tuple[RowUpdate, datetime]] = {}
        self._gone: set[str] = set()
        self._flush_lock = asyncio.Lock()
        self._flushed = asyncio.Event()

    @property
    def orphan_grace(self) -> float:
        return self.settings.orphan_grace or max(2 * self.settings.heartbeat_grace, 10.0)

    # ------------------------------------------------------------- receive

    async def authenticate(self, controller_id: str, token: str) -> None:
        """Whether ``token`` may speak for ``controller_id`` (hub.services.controller_keys)."""
        await self.keys.authenticate(controller_id, token)

    async def receive(self, controller_id: str, heartbeat: Heartbeat) -> HeartbeatAnswer:
        """Answer one pushed heartbeat (already authenticated)."""
        if heartbeat.server_id != controller_id:
            raise InvalidRequest(
                f"heartbeat from {heartbeat.server_id!r} sent to the path of {controller_id!r}",
                code="SERVER_ID_MISMATCH",
            )
        async with self.db.session() as session:
            controller = await session.get(ControllerModel, controller_id)
            if controller is None:
                if not heartbeat.url:
                    raise NotFound(
                        f"controller {controller_id!r} is not registered and sent no url to register it",
                        code="CONTROLLER_NOT_FOUND",
                    )
                # A controller that knows the hub's key joins by beating (like a Nomad client).
                session.add(ControllerModel(id=controller_id, url=heartbeat.url.rstrip("/"),
                                            server_type=heartbeat.server_type, status="unknown"))
                log.info("controller %s registered itself at %s", controller_id, heartbeat.url)
            rows = await self._rows(session, controller_id)
            # What the controller audited itself (at most 1000 a beat, the wire's bound); committed before
            # the answer, which is what lets the controller drop them. Under a savepoint: events the
            # database refuses never fail the heartbeat (hub.services.audit.insert_shipped).
            await insert_shipped(session, heartbeat.audit, controller_source(controller_id))
        listed_at = utcnow() - timedelta(seconds=heartbeat.listing_age + PUSH_LAG)
        result = self.observe(controller_id, heartbeat.health, heartbeat.containers, rows, pushed=True,
                              listed_at=listed_at)
        return HeartbeatAnswer(
            interval=self.settings.heartbeat_interval, grace=self.settings.heartbeat_grace, stop=result.stop
        )

    async def _rows(self, session: Any, controller_id: str) -> list[RegistryRow]:
        found = await session.execute(
            select(
                ContainerRegistryModel.id,
                ContainerRegistryModel.service_id,
                ContainerRegistryModel.epoch,
                ContainerRegistryModel.container_id,
                ContainerRegistryModel.status,
                ContainerRegistryModel.health,
                ContainerRegistryModel.health_restarts,
                ContainerRegistryModel.updated_at,
            ).where(ContainerRegistryModel.controller_id == controller_id)
        )
        return [RegistryRow(*r) for r in found]

    async def rows_for(self, controller_id: str) -> list[RegistryRow]:
        async with self.db.session() as session:
            return await self._rows(session, controller_id)

    def observe(self, controller_id: str, health: ControllerHealth, containers: list[HeartbeatContainer],
                rows: list[RegistryRow], *, pushed: bool, listed_at: datetime | None = None) -> FenceResult:
        """Record one observation; ``listed_at`` is when the container listing was taken, at the latest.

        A pushed heartbeat's listing was taken before it arrived: it is dated by the
        age it reports plus ``PUSH_LAG``, so it never overwrites a change the hub made meanwhile.
        """
        now = utcnow()
        listed_at = listed_at or now - timedelta(seconds=PUSH_LAG)
        if not health.docker:
            # No fresh listing (Docker is down or hung): nothing can be judged missing, gone or orphan.
            self._observations[controller_id] = _Observation(now, health, pushed)
            return FenceResult()
        # A row written after the controller took its listing may name a container the listing
        # could not have shown yet; only older rows can be declared missing.
        settle = timedelta(seconds=2 * self.settings.heartbeat_interval + 2)
        result = fence(rows, containers, self.orphan_grace, missing_before=min(now - settle, listed_at))
        self._observations[controller_id] = _Observation(now, health, pushed)
        self.monitor.observe(controller_id, health, containers,
                             {r.container_id for r in rows if r.container_id and r.status != "stale"})
        for u in result.updates:
            self._updates[u.id] = (u, listed_at)
        self._gone.update(result.gone)
        return result

    def observe_failure(self, controller_id: str, error: str) -> None:
        """A poll that got no answer: say so, but only silence makes a controller lost."""
        previous = self._observations.get(controller_id)
        if previous is None or previous.error is not None or previous.health.status != "healthy":
            self._observations[controller_id] = _Observation(
                utcnow(), previous.health if previous else _no_health(controller_id), False, error
            )

    # --------------------------------------------------------------- flush

    async def flush(self) -> None:
        """Write everything observed since the last flush in one transaction, then what the monitor
        has to write (alerts that opened or resolved, history buckets that are over) in another."""
        await self._flush_observations()
        await self.monitor.flush()

    async def _flush_observations(self) -> None:
        async with self._flush_lock:
            observations, self._observations = self._observations, {}
            updates, self._updates = self._updates, {}
            gone, self._gone = self._gone, set()
            if not (observations or updates or gone):
                return
            try:
                await self._write(observations, updates, gone)
            except BaseException:
                # Keep what was not written; anything newer that arrived meanwhile wins.
                self._observations = {**observations, **self._observations}
                self._updates = {**updates, **self._updates}
                self._gone |= gone
                raise
            for controller_id, obs in observations.items():
                h = obs.health
                up = obs.error is None and h.status == "healthy"
                self.metrics.observe_controller(
                    controller_id, up, h.containers.running, h.load_percentage, h.memory_usage_percent
                )

    async def _write(self, observations: dict[str, _Observation], updates: dict[str, tuple[RowUpdate, datetime]],
                     gone: set[str]) -> None:
        async with self.db.session() as session:
            known = set(
                await session.scalars(select(ControllerModel.id).where(ControllerModel.id.in_(list(observations))))
            ) if observations else set()
            good, bad = [], []
            for controller_id, obs in observations.items():
                if controller_id not in known:
                    continue
                h = obs.health
                if obs.error is None and h.status == "healthy":
                    good.append({"id": controller_id, **healthy_fields(h, obs.at),
                                 **({"last_push_at": obs.at} if obs.pushed else {})})
                else:
                    bad.append({"id": controller_id, "error_message": obs.error or h.error or "unhealthy",
                                **({"last_push_at": obs.at} if obs.pushed else {})})
            # One executemany per shape, however many controllers (rows gone meanwhile are skipped).
            good.sort(key=lambda r: r["id"])
            bad.sort(key=lambda r: r["id"])
            for batch in _same_keys(good) + _same_keys(bad):
                await session.execute(_by_id(ControllerModel, batch[0]), [_bind(r) for r in batch])
            if updates:
                # Locks are taken services first, then registry rows, each in id order: the order every
                # lifecycle transaction uses too, so concurrent writers wait instead of deadlocking.
                ordered = sorted(updates.values(), key=lambda item: item[0].id)
                for u, at in sorted(ordered, key=lambda item: item[0].service_id):
                    await session.execute(_service_update(u, at))
                table = ContainerRegistryModel.__table__
                services = ServiceModel.__table__
                # A row and the service it serves change together: when the service's update was
                # skipped (it changed after the listing, or is mid-move), the row waits too, so the
                # next heartbeat brings both.
                service_newer = (
                    select(services.c.id)
                    .where(services.c.id == table.c.service_id, services.c.container_id == table.c.container_id,
                           # (equalities, not IN: an expanding IN cannot run as executemany)
                           or_(services.c.updated_at > bindparam("b_at"),
                               *(services.c.status == status for status in sorted(UNSETTLED))))
                    .exists()
                )
                stmt = (
                    update(table)
                    .where(table.c.id == bindparam("b_id"), table.c.updated_at < bindparam("b_at"), ~service_newer)
                    .values(status=bindparam("b_status"), health=bindparam("b_health"),
                            health_restarts=bindparam("b_restarts"), updated_at=bindparam("b_at"),
                            container_id=func.coalesce(bindparam("b_container_id"), table.c.container_id))
                )
                await session.execute(stmt, [
                    {"b_id": u.id, "b_at": at, "b_status": u.status, "b_health": u.health,
                     "b_restarts": u.health_restarts, "b_container_id": u.container_id or None}
                    for u, at in ordered
                ])
            if gone:
                await session.execute(
                    delete(ContainerRegistryModel).where(
                        ContainerRegistryModel.id.in_(list(gone)), ContainerRegistryModel.status == "stale"
                    )
                )


def _by_id(model: Any, sample: dict[str, Any]) -> Any:
    table = model.__table__
    return (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values({key: bindparam(f"b_{key}") for key in sample if key != "id"})
    )


def _bind(row: dict[str, Any]) -> dict[str, Any]:
    return {f"b_{key}": value for key, value in row.items()}


def _same_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


def _service_update(u: RowUpdate, observed_at: datetime) -> Any:
    """The service's status and health follow its current container (never an unsettled one)."""
    s = ServiceModel
    # Dated by the observation, not the write: the registry row (updated next, with the same date)
    # then sees no newer change to the service and follows it.
    values: dict[str, Any] = {"health": u.health, "updated_at": observed_at}
    if u.status == "running":
        values["status"] = "unhealthy" if u.health == "unhealthy" else "running"
    elif u.status in ("created", "restarting"):
        values["status"] = "starting"
    elif u.status == "missing":
        # Removed behind our back: the reconciler makes a new one when it should run.
        values["status"] = case((s.desired_state == "running", "lost"), else_="stopped")
        values["endpoint"] = None
    else:
        values["status"] = case((s.desired_state == "running", "failed"), else_="stopped")
    return (
        update(s)
        .where(s.id == u.service_id, s.container_id == u.container_id, s.status.not_in(UNSETTLED),
               s.updated_at < observed_at)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _no_health(controller_id: str) -> ControllerHealth:
    return ControllerHealth(
        status="unhealthy", server_id=controller_id, server_type="cpu", version="", docker=False,
        containers=HealthContainers(running=0, max_allowed=0), resources=HealthResources(
            cpu_cores=0, memory_total_gb=0, memory_available_gb=0),
        load_percentage=0, memory_usage_percent=0,
        capabilities=HealthCapabilities(gpu_support=False, max_memory_gb=0),
    )
