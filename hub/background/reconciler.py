"""The reconciler, which only the leading replica runs: failure detection and
failover, drains, and recovery of interrupted operations.

Each reconciler tick reads one snapshot (only the controllers and services a
rule could act on: a few indexed reads whatever the fleet's size), asks the
pure ``compute()`` what to do, and applies it: lost controllers are marked in
one statement, services are moved in parallel (bounded), drains are finished. A move that fails is retried with a
growing delay; one that is running is never started twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.sql.base import Executable

from hub.background.backpressure import AdaptiveLimit, LoopLag
from hub.config import HubSettings
from hub.db import CoreTx, Database, any_of
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
    UNSETTLED,
    ControllerState,
    FinishDrain,
    MarkLost,
    Move,
    ServiceState,
    Snapshot,
    at_risk,
    compute,
)
from hub.services.heartbeats import HeartbeatIngest
from hub.services.lifecycle import ServiceManager
from hub.services.operations import ACTIVE, progress_of
from hub.services.pace import HeartbeatPace
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

# Controllers marked lost per statement (bound parameters stay far below PostgreSQL's 32,767).
LOST_CHUNK = 5000
# Lost controllers logged one by one in a tick; beyond, one line says how many more.
LOST_LOGGED = 20


# How often a tick also deletes the rows of replicas gone for an hour.
REPLICA_SWEEP = timedelta(minutes=1)
# How often a tick also counts every running service's copies (a scan of them all: not twice a second).
RECOUNT_EVERY = timedelta(seconds=5)


@dataclass(frozen=True)
class _TickStatements:
    """A tick's statements, built once (compiled once, sent straight through asyncpg on PostgreSQL): a tick
    runs twice a second on a quiet hub, so it must cost next to nothing."""

    replicas: Executable
    old_replicas: Executable
    recover: Executable
    controllers: Executable
    controllers_led_briefly: Executable
    unsettled: Executable
    on_at_risk: Executable
    failing: Executable
    replicas_at_risk: Executable
    recount: Executable
    hosting: Executable
    busy: Executable


@functools.cache
def _tick_statements(sqlite: bool) -> _TickStatements:
    c, s, current = ControllerModel.__table__.c, ServiceModel.__table__.c, ContainerRegistryModel.__table__.c
    ops, replicas = OperationModel.__table__, HubReplicaModel.__table__
    o = ops.c
    # A superset of the lost ones (compute() also counts the grace from leader_since), and the draining.
    watched = or_(c.status != "healthy", c.draining.is_(True), c.last_heartbeat_at.is_(None),
                  c.last_heartbeat_at < bindparam("cutoff"))
    columns = (s.id, s.desired_state, s.status, s.controller_id, current.health, current.health_restarts)
    controller_columns = (c.id, c.status, c.last_heartbeat_at, c.enabled, c.draining)
    on_current = and_(current.service_id == s.id, current.container_id == s.container_id)
    services, registry = ServiceModel.__table__, ContainerRegistryModel.__table__
    # A service's replicas other than its primary copy (whose rules are the service's own).
    # (Inequalities, not NOT IN: these statements go straight through the driver, which takes no expanding list.)
    other = and_(current.service_id == s.id, current.serving.is_(True), current.status != "stale",
                 current.status != "draining", or_(s.container_id.is_(None), current.container_id != s.container_id))
    # A copy's rule: the service, and the copy (its controller, health, row, and whether it is the primary).
    copy_columns = (s.id, s.desired_state, s.status, current.controller_id, current.health, current.health_restarts,
                    current.id.label("row_id"), (current.container_id == s.container_id).label("primary"))
    counted = (select(func.count()).where(current.service_id == s.id, current.serving.is_(True),
                                          *(current.status != status for status in ("stale", "draining", "missing")))
               .correlate(services).scalar_subquery())
    active = any_of(o.status, "active", sqlite=sqlite)
    return _TickStatements(
        replicas=select(replicas.c.id).where(replicas.c.last_seen_at >= bindparam("cutoff")),
        old_replicas=delete(replicas).where(replicas.c.last_seen_at < bindparam("before")),
        recover=update(ops).where(
            active, o.operation != "drain",
            or_(o.hub_replica.is_(None), ~any_of(o.hub_replica, "live", sqlite=sqlite)),
        ).values(status="failed", finished_at=bindparam("now"),
                 error="interrupted: the hub replica running it stopped; the reconciler finishes its work"),
        controllers=select(*controller_columns).where(watched),
        # Before this replica has led for a grace, no silence counts (compute() counts it from leader_since):
        # of the watched, only those not healthy, or draining: a hub restarted under a big fleet would
        # otherwise read every controller twice a second until their first beats were written.
        controllers_led_briefly=select(*controller_columns).where(or_(c.status != "healthy", c.draining.is_(True))),
        # Unsettled: a create, migrate or failover that did not finish.
        unsettled=select(*columns).select_from(services.outerjoin(registry, on_current)).where(
            s.desired_state == "running", or_(any_of(s.status, "unsettled", sqlite=sqlite), s.controller_id.is_(None))),
        # On a controller that is lost, or draining (hub.scheduler.reconcile.at_risk, of the watched ones).
        on_at_risk=select(*columns).select_from(services.outerjoin(registry, on_current)).where(
            any_of(s.controller_id, "at_risk", sqlite=sqlite)),
        # A copy (the primary or another replica) failing its health check after the restarts its controller
        # was allowed.
        failing=select(*copy_columns).select_from(services.join(registry, or_(on_current, other))).where(
            s.desired_state == "running", current.health == "unhealthy",
            current.health_restarts >= bindparam("restarts")),
        # A replica other than the primary on a controller at risk (the primary's is ``on_at_risk``).
        replicas_at_risk=select(*copy_columns).select_from(services.join(registry, other)).where(
            any_of(current.controller_id, "at_risk", sqlite=sqlite)),
        # Not the replicas it should have: a copy found gone, a create or scale that could not finish (a
        # single copy's loss shows in its status, which the rules above act on).
        recount=select(s.id, s.desired_state, s.status, s.controller_id).where(
            s.desired_state == "running", *(s.status != status for status in sorted(UNSETTLED)),
            s.replicas != counted),
        hosting=select(current.controller_id).distinct().where(
            current.status != "stale", any_of(current.controller_id, "draining", sqlite=sqlite)),
        busy=select(o.service_id).where(active, any_of(o.hub_replica, "live", sqlite=sqlite),
                                        o.service_id.is_not(None)),
    )


class Reconciler(LoopService):
    name = "reconciler"

    def __init__(self, db: Database, settings: HubSettings, services: ServiceManager, metrics: HubMetrics,
                 replica_id: str, leader_since: datetime, ingest: HeartbeatIngest | None = None) -> None:
        # Detection latency is the grace plus up to one tick: tick often (a tick is two cheap reads).
        super().__init__(min(0.5, settings.heartbeat_interval / 4), jitter=0.05)
        self.db = db
        self.settings = settings
        self.services = services
        self.metrics = metrics
        self.replica_id = replica_id
        self.leader_since = leader_since
        # The grace controllers were told (stretched for a big fleet: hub.services.pace).
        self.pace = ingest.pace if ingest is not None else HeartbeatPace(settings)
        # This replica's heartbeats: when it last heard each controller, written or not.
        self.ingest = ingest
        self._moving: dict[str, asyncio.Task[Any]] = {}
        self._moving_from: dict[str, str | None] = {}
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, datetime] = {}
        # Moves at once: at most MMANAGER_RECONCILE_CONCURRENCY, fewer while the hub is saturated
        # (hub.background.backpressure: a mass failover must not make heartbeats late).
        self.move_slots = AdaptiveLimit(settings.reconcile_concurrency)
        self._lag = LoopLag(self.move_slots)
        self._last_ok: datetime | None = None
        self._reads = _tick_statements(db.is_sqlite)
        # When the rows of long-gone replicas were last deleted, and services' copies last counted.
        self._swept: datetime | None = None
        self._recounted: datetime | None = None

    async def run_once(self) -> None:
        now = utcnow()
        grace = timedelta(seconds=self.pace.detection_grace)
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
        losing = [action for action in actions if isinstance(action, MarkLost)]
        reprieved = {a.controller_id for a in losing} - await self._mark_lost(losing, now) if losing else set()
        for action in actions:
            if isinstance(action, Move) and not (action.reason == "controller_lost" and
                                                 action.from_controller in reprieved):
                self._start_move(action, now)
            elif isinstance(action, FinishDrain):
                await self._finish_drain(action.controller_id)
        self._last_ok = utcnow()

    def start(self) -> None:
        super().start()
        self._lag.start()

    async def stop(self) -> None:
        await super().stop()
        await self._lag.stop()
        if self._moving:
            await asyncio.wait(set(self._moving.values()), timeout=30)

    # ---------------------------------------------------------------- reads

    async def _live_replicas(self, now: datetime) -> set[str]:
        cutoff = now - timedelta(seconds=self.settings.heartbeat_grace)
        live = {row["id"] for row in await self.db.all(self._reads.replicas, {"cutoff": cutoff})}
        if self._swept is None or now - self._swept > REPLICA_SWEEP:
            # Rows of replicas gone for an hour are only clutter.
            async with self.db.transaction() as tx:
                await tx.execute(self._reads.old_replicas, {"before": now - timedelta(hours=1)})
            self._swept = now
        return live | {self.replica_id}

    async def _snapshot(self, now: datetime, live: set[str]) -> Snapshot:
        """What ``compute()`` needs, and no more: the controllers that may be lost or are draining, and
        the services some rule could act on. A tick costs a few indexed reads, not a read of every
        controller and service (the whole tables every half second would not keep up with a large fleet): a service on a healthy controller, settled and not failing its
        health check, yields no action, so leaving it out of the snapshot changes no decision.
        """
        grace = self.pace.detection_grace
        reads, db = self._reads, self.db
        params: dict[str, Any] = {"cutoff": now - timedelta(seconds=grace), "unsettled": sorted(UNSETTLED),
                  "restarts": self.settings.max_health_restarts}
        heard = self.ingest.heard if self.ingest is not None else {}
        # The database's watched controllers are silent only there when this replica heard them since (a
        # fleet's first beats, not yet written: all of them when a hub starts) or since it became leader:
        # those yield no action, and neither they nor their services are taken into the snapshot.
        cutoff = params["cutoff"]
        may_be_silent = self.leader_since <= cutoff
        controllers = [
            ControllerState(**row)
            for row in await db.all(reads.controllers if may_be_silent else reads.controllers_led_briefly, params)
            if row["status"] != "healthy" or row["draining"] or (may_be_silent and heard.get(row["id"], cutoff) <= cutoff)
        ]
        lost, draining_ids, _ = at_risk(controllers, now, grace, self.leader_since, heard)
        queries = [(reads.unsettled, params)]
        copy_queries = [(reads.failing, params)]
        if lost or draining_ids:
            queries.append((reads.on_at_risk, {"at_risk": sorted(lost | draining_ids)}))
            copy_queries.append((reads.replicas_at_risk, {"at_risk": sorted(lost | draining_ids)}))
        # Keyed by service, and for a replica other than the primary copy by its controller too.
        rows: dict[tuple[str, str], Any] = {}
        for query, values in queries:
            for row in await db.all(query, values):
                rows[(row["id"], "")] = row
        for query, values in copy_queries:
            for row in await db.all(query, values):
                if row["primary"]:
                    rows[(row["id"], "")] = row
                else:
                    rows.setdefault((row["id"], row["controller_id"]), row)
        recount: dict[str, Any] = {}
        if self._recounted is None or now - self._recounted >= RECOUNT_EVERY:
            recount = {row["id"]: row for row in await db.all(reads.recount, {})}
            self._recounted = now
        draining = sorted(draining_ids)
        hosting = frozenset(row["controller_id"] for row in await db.all(reads.hosting, {"draining": draining})
                            ) if draining else frozenset()
        busy = {row["service_id"] for row in await db.all(reads.busy, {"active": list(ACTIVE), "live": sorted(live)})}
        busy |= set(self._moving)
        services = [
            ServiceState(sid, r["desired_state"], r["status"], r["controller_id"], r["health"] or "unknown",
                         r["health_restarts"] or 0, sid in busy, replica=r["row_id"] if on else None)
            for (sid, on), r in sorted(rows.items())
        ] + [ServiceState(sid, r["desired_state"], r["status"], r["controller_id"], busy=sid in busy, recount=True)
             for sid, r in sorted(recount.items())]
        return Snapshot(controllers, services, self.leader_since, grace,
                        self.settings.max_health_restarts,
                        frozenset(c for c in self._moving_from.values() if c is not None), hosting, heard)

    # -------------------------------------------------------------- actions

    async def _recover_operations(self, now: datetime, live: set[str]) -> None:
        """Operations a dead replica left running are failed; the reconciler finishes their work.
        (Each live replica recovers its own: ``OperationLog.recover_own``.)

        Drains are not failed: they are finished by whoever completes them.
        """
        async with self.db.transaction() as tx:
            recovered = await tx.execute(self._reads.recover, {"active": list(ACTIVE), "live": sorted(live), "now": now})
        if recovered:
            log.warning("recovered %d operation(s) left running by a stopped hub replica", recovered)

    async def _mark_lost(self, actions: list[MarkLost], now: datetime) -> set[str]:
        """Mark the controllers unhealthy, all in one statement per chunk, except those whose heartbeat
        arrived meanwhile; returns the ones that are lost."""
        grace = self.pace.detection_grace
        cutoff = now - timedelta(seconds=grace)
        silent = {a.controller_id: a.silent_for for a in actions}
        ids = sorted(silent)
        lost: set[str] = set()
        async with self.db.session() as session:
            for i in range(0, len(ids), LOST_CHUNK):
                lost.update(await session.scalars(
                    update(ControllerModel)
                    .where(
                        ControllerModel.id.in_(ids[i:i + LOST_CHUNK]),
                        or_(ControllerModel.last_heartbeat_at.is_(None), ControllerModel.last_heartbeat_at < cutoff),
                    )
                    .values(status="unhealthy",
                            error_message=f"no heartbeat for over {grace:g}s")
                    .returning(ControllerModel.id)
                    .execution_options(synchronize_session=False)
                ))
        for controller_id in sorted(lost)[:LOST_LOGGED]:
            log.warning("controller %s is lost: no heartbeat for %.1fs", controller_id, silent[controller_id])
        if len(lost) > LOST_LOGGED:
            log.warning("%d more controllers are lost (%d in all)", len(lost) - LOST_LOGGED, len(lost))
        for controller_id in lost:
            self.metrics.controller_down(controller_id)
        return lost

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
        async with self.move_slots.slot():
            try:
                result = await self.services.move(sid, action.reason, action.exclude,
                                                  expected_controller=action.from_controller, replica=action.replica)
            except HubError as exc:
                failures = self._failures.get(sid, 0) + 1
                self._failures[sid] = failures
                delay = min(2 ** (failures - 1), 30)
                self._not_before[sid] = utcnow() + timedelta(seconds=delay)
                log.warning("could not move service %s (%s): %s; retrying in %ss", sid, action.reason, exc.message, delay)
                return
            except Exception as exc:
                if not self.expected(exc):
                    log.exception("moving service %s crashed", sid)
                self._not_before[sid] = utcnow() + timedelta(seconds=5)
                return
        self._failures.pop(sid, None)
        self._not_before.pop(sid, None)
        if result is not None:
            log.info("service %s moved (%s) to %s", sid, action.reason, result.controller_id)
        if action.reason == "drain" and action.from_controller is not None:
            await self._drain_progress(action.from_controller)

    async def _drain_progress(self, controller_id: str) -> None:
        """After one of a drain's moves: its operations show how many of the services it began with have left
        (``details.progress``). A courtesy: a read or write that fails is only logged."""
        try:
            async with self.db.session() as session:
                drains = list(await session.scalars(select(OperationModel).where(
                    OperationModel.operation == "drain", OperationModel.controller_id == controller_id,
                    OperationModel.status == "running")))
                left = await session.scalar(select(func.count()).where(ServiceModel.controller_id == controller_id))
            for op in drains:
                total = int(op.details.get("services", 0))
                done = min(max(total - (left or 0), 0), total)
                await self.services.ctx.ops.advance(op, done, total, "services",
                                                    f"{done} of {total} services moved off {controller_id}")
        except Exception as exc:
            log.debug("no drain progress for %s: %s", controller_id, exc)

    async def _finish_drain(self, controller_id: str) -> None:
        """The controller is empty: it stops draining and its drain operations end, in one transaction
        (whichever replica began them)."""
        ops = self.services.ctx.ops
        async with self.db.session() as session:
            await session.execute(
                update(ControllerModel).where(ControllerModel.id == controller_id, ControllerModel.draining.is_(True))
                .values(draining=False, enabled=False)
            )
            drains = list(
                await session.scalars(
                    select(OperationModel).where(
                        OperationModel.operation == "drain",
                        OperationModel.controller_id == controller_id,
                        OperationModel.status == "running",
                    )
                )
            )
            for op in drains:
                total = int(op.details.get("services", 0))
                await ops.finish_in(CoreTx(session), op, details={"progress": progress_of(
                    total, total, "services", f"{controller_id} drained")})
        for op in drains:
            ops.finished(op)
        log.info("controller %s is drained", controller_id)
