"""The loops only the leading replica runs: failure detection and failover,
drains, recovery of interrupted operations, and polling of controllers that do
not push heartbeats.

Each reconciler tick reads one snapshot, asks the pure ``compute()`` what to
do, and applies it: lost controllers are marked, services are moved in
parallel (bounded), drains are finished. A move that fails is retried with a
growing delay; one that is running is never started twice.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, delete, or_, select, update

from hub.background.base import LoopService
from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import HubError
from hub.metrics import HubMetrics
from hub.models import (
    ContainerRegistryModel,
    ControllerModel,
    HubReplicaModel,
    OperationModel,
    ServiceModel,
    utcnow,
)
from hub.scheduler.reconcile import (
    ControllerState,
    FinishDrain,
    MarkLost,
    Move,
    ServiceState,
    Snapshot,
    compute,
)
from hub.services.heartbeats import HeartbeatIngest
from hub.services.lifecycle import ServiceManager
from mmanager.wire import ContainerUsage, HeartbeatContainer, seconds_since

log = logging.getLogger(__name__)


class Reconciler(LoopService):
    name = "reconciler"

    def __init__(self, db: Database, settings: HubSettings, services: ServiceManager, metrics: HubMetrics,
                 replica_id: str, leader_since: datetime) -> None:
        # Detection latency is the grace plus up to one tick: tick often (a tick is two cheap reads).
        super().__init__(min(0.5, settings.heartbeat_interval / 4), jitter=0.05)
        self.db = db
        self.settings = settings
        self.services = services
        self.metrics = metrics
        self.replica_id = replica_id
        self.leader_since = leader_since
        self._moving: dict[str, asyncio.Task[Any]] = {}
        self._moving_from: dict[str, str | None] = {}
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, datetime] = {}
        self._slots = asyncio.Semaphore(settings.reconcile_concurrency)
        self._last_ok: datetime | None = None

    async def run_once(self) -> None:
        now = utcnow()
        grace = timedelta(seconds=self.settings.heartbeat_grace)
        if self._last_ok is not None and now - self._last_ok > grace:
            # This loop could not look for longer than the grace (database outage, stalled process):
            # heartbeats were not recorded meanwhile either, so every controller gets a fresh grace.
            log.warning("reconciler was blind for %.1fs; giving every controller a fresh grace",
                        (now - self._last_ok).total_seconds())
            self.leader_since = now
        live = await self._live_replicas(now)
        await self._recover_operations(now, live)
        snapshot = await self._snapshot(now, live)
        actions = compute(snapshot, now)
        # A controller whose lost-mark found a fresh heartbeat (written since the snapshot) is not lost.
        reprieved = set()
        for action in actions:
            if isinstance(action, MarkLost) and not await self._mark_lost(action, now):
                reprieved.add(action.controller_id)
        for action in actions:
            if isinstance(action, Move) and not (action.reason == "controller_lost" and
                                                 action.from_controller in reprieved):
                self._start_move(action, now)
            elif isinstance(action, FinishDrain):
                await self._finish_drain(action.controller_id)
        self._last_ok = utcnow()

    async def stop(self) -> None:
        await super().stop()
        if self._moving:
            await asyncio.wait(set(self._moving.values()), timeout=30)

    # ---------------------------------------------------------------- reads

    async def _live_replicas(self, now: datetime) -> set[str]:
        cutoff = now - timedelta(seconds=self.settings.heartbeat_grace)
        async with self.db.session() as session:
            live = set(await session.scalars(select(HubReplicaModel.id).where(HubReplicaModel.last_seen_at >= cutoff)))
            # Rows of replicas gone for an hour are only clutter.
            await session.execute(
                delete(HubReplicaModel).where(HubReplicaModel.last_seen_at < now - timedelta(hours=1))
            )
        return live | {self.replica_id}

    async def _snapshot(self, now: datetime, live: set[str]) -> Snapshot:
        async with self.db.session() as session:
            controllers = [
                ControllerState(c.id, c.status, c.last_heartbeat_at, c.enabled, c.draining)
                for c in await session.scalars(select(ControllerModel))
            ]
            current = ContainerRegistryModel
            rows = await session.execute(
                select(
                    ServiceModel.id, ServiceModel.desired_state, ServiceModel.status, ServiceModel.controller_id,
                    current.health, current.health_restarts,
                ).join(
                    current,
                    and_(current.service_id == ServiceModel.id, current.container_id == ServiceModel.container_id),
                    isouter=True,
                )
            )
            hosting = frozenset(
                await session.scalars(
                    select(ContainerRegistryModel.controller_id).where(ContainerRegistryModel.status != "stale").distinct()
                )
            )
            busy = set(
                await session.scalars(
                    select(OperationModel.service_id).where(
                        OperationModel.status.in_(("pending", "running")),
                        OperationModel.hub_replica.in_(live),
                        OperationModel.service_id.is_not(None),
                    )
                )
            )
        busy |= set(self._moving)
        services = [
            ServiceState(sid, desired, status, controller_id, health or "unknown", restarts or 0, sid in busy)
            for sid, desired, status, controller_id, health, restarts in rows
        ]
        return Snapshot(controllers, services, self.leader_since, self.settings.heartbeat_grace,
                        self.settings.max_health_restarts,
                        frozenset(c for c in self._moving_from.values() if c is not None), hosting)

    # -------------------------------------------------------------- actions

    async def _recover_operations(self, now: datetime, live: set[str]) -> None:
        """Operations a dead replica left running are failed; the reconciler finishes their work.
        (Each live replica recovers its own: ``OperationLog.recover_own``.)

        Drains are not failed: they are finished by whoever completes them.
        """
        async with self.db.session() as session:
            result = await session.execute(
                update(OperationModel)
                .where(
                    OperationModel.status.in_(("pending", "running")),
                    OperationModel.operation != "drain",
                    or_(OperationModel.hub_replica.is_(None), OperationModel.hub_replica.not_in(live)),
                )
                .values(status="failed", finished_at=now,
                        error="interrupted: the hub replica running it stopped; the reconciler finishes its work")
                .execution_options(synchronize_session=False)
            )
        if result.rowcount:  # type: ignore[attr-defined]
            log.warning("recovered %d operation(s) left running by a stopped hub replica", result.rowcount)  # type: ignore[attr-defined]

    async def _mark_lost(self, action: MarkLost, now: datetime) -> bool:
        """Mark the controller unhealthy unless a heartbeat arrived meanwhile; True if it is lost."""
        cutoff = now - timedelta(seconds=self.settings.heartbeat_grace)
        async with self.db.session() as session:
            result = await session.execute(
                update(ControllerModel)
                .where(
                    ControllerModel.id == action.controller_id,
                    or_(ControllerModel.last_heartbeat_at.is_(None), ControllerModel.last_heartbeat_at < cutoff),
                )
                .values(status="unhealthy", error_message=f"no heartbeat for {action.silent_for:.1f}s")
                .execution_options(synchronize_session=False)
            )
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        log.warning("controller %s is lost: no heartbeat for %.1fs", action.controller_id, action.silent_for)
        self.metrics.controller_up.labels(action.controller_id).set(0)
        return True

    def _start_move(self, action: Move, now: datetime) -> None:
        sid = action.service_id
        if sid in self._moving or self._not_before.get(sid, now) > now:
            return
        task = asyncio.create_task(self._move(action), name=f"move-{sid}")
        self._moving[sid] = task
        self._moving_from[sid] = action.from_controller

        def done(_: object) -> None:
            self._moving.pop(sid, None)
            self._moving_from.pop(sid, None)

        task.add_done_callback(done)

    async def _move(self, action: Move) -> None:
        sid = action.service_id
        async with self._slots:
            try:
                result = await self.services.move(sid, action.reason, action.exclude,
                                                  expected_controller=action.from_controller)
            except HubError as exc:
                failures = self._failures.get(sid, 0) + 1
                self._failures[sid] = failures
                delay = min(2 ** (failures - 1), 30)
                self._not_before[sid] = utcnow() + timedelta(seconds=delay)
                log.warning("could not move service %s (%s): %s; retrying in %ss", sid, action.reason, exc.message, delay)
                return
            except Exception:
                log.exception("moving service %s crashed", sid)
                self._not_before[sid] = utcnow() + timedelta(seconds=5)
                return
        self._failures.pop(sid, None)
        self._not_before.pop(sid, None)
        if result is not None:
            log.info("service %s moved (%s) to %s", sid, action.reason, result.controller_id)

    async def _finish_drain(self, controller_id: str) -> None:
        now = utcnow()
        async with self.db.session() as session:
            await session.execute(
                update(ControllerModel).where(ControllerModel.id == controller_id, ControllerModel.draining.is_(True))
                .values(draining=False, enabled=False)
            )
            ops = list(
                await session.scalars(
                    select(OperationModel).where(
                        OperationModel.operation == "drain",
                        OperationModel.controller_id == controller_id,
                        OperationModel.status == "running",
                    )
                )
            )
            for op in ops:
                op.status, op.finished_at = "succeeded", now
        for op in ops:
            self.metrics.operations.labels("drain", "succeeded").inc()
            self.metrics.operation_duration.labels("drain").observe((now - op.created_at).total_seconds())
        log.info("controller %s is drained", controller_id)


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

    async def run_once(self) -> None:
        pushed_after = utcnow() - timedelta(seconds=3 * self.settings.heartbeat_interval)
        async with self.db.session() as session:
            controllers = list(
                await session.execute(
                    select(ControllerModel.id, ControllerModel.url).where(
                        or_(ControllerModel.last_push_at.is_(None), ControllerModel.last_push_at < pushed_after)
                    )
                )
            )
        await asyncio.gather(*(self.poll(cid, url) for cid, url in controllers))

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
        containers = [
            HeartbeatContainer(
                container_id=c.id, name=c.name, service_id=c.service_id, epoch=c.epoch, state=c.status,
                health=c.health, health_restarts=c.health_restarts,
                age_seconds=max(seconds_since(c.created, now) or 0.0, 0.0), ports=c.ports,
                usage=_usage(c.resource_usage),
            )
            for c in listing
        ]
        rows = await self.ingest.rows_for(controller_id)
        result = self.ingest.observe(controller_id, health, containers, rows, pushed=False, listed_at=listed_at)
        for order in result.stop:
            try:
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


class HeartbeatFlusher(LoopService):
    """Writes what heartbeats said, on every replica, a few times per heartbeat interval."""

    name = "heartbeat-flusher"

    def __init__(self, ingest: HeartbeatIngest, interval: float) -> None:
        super().__init__(interval, jitter=0.0)
        self.ingest = ingest

    async def run_once(self) -> None:
        await self.ingest.flush()

    async def stop(self) -> None:
        await super().stop()
        try:
            await self.ingest.flush()
        except Exception as exc:
            log.warning("could not write the last heartbeats: %s", exc)
