"""Heartbeat ingestion: what controllers report, coalesced into few writes.

Heartbeats are taken in batches (group commit): ``receive`` queues a beat and
waits; one task takes every beat queued meanwhile and, in one transaction,
registers the controllers that are new, stores the audit events they carry and
reads their registry rows, then answers them all (the interval, and which
containers each controller must stop). However many controllers beat, the
heartbeat path costs a few round trips per batch, not per beat, and a beat is
answered only once what must be durable before its answer (its audit events,
its registration) is committed. Past ``MMANAGER_HEARTBEAT_BACKLOG`` beats
waiting, new ones are answered 503 with Retry-After at once: shed, not queued
past the controllers' timeouts.

What a beat says (health, container states) is kept in memory and written by
``flush()`` for all controllers together, one transaction per flush, so a
thousand controllers beating every two seconds cost a few writes a second,
not a thousand. Only changes are written for containers.

The images a beat lists (only when its controller's set changed) replace what
``hub.services.locality.ImageSets`` holds for it, in memory; a beat without a list
whose version is not the one held drops it.

Polled controllers (those that do not push) go through the same path: the
monitor turns ``/health`` and ``/containers`` into the same observation.
Usage (thresholds, alerts, history) is judged and written the same way, by
``hub.services.monitoring``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hub.config import HubSettings
from hub.db import Database, any_of
from hub.errors import HubError, InvalidRequest, NotFound, Overloaded
from hub.metrics import HubMetrics
from hub.models import (
    ContainerRegistryModel,
    ControllerModel,
    DeletedControllerModel,
    JobAttemptModel,
    JobModel,
    ServiceModel,
    utcnow,
)
from hub.outage import DatabaseOutage
from hub.scheduler.reconcile import UNSETTLED, AttemptState, FenceResult, RegistryRow, RowUpdate, fence
from hub.services.audit import controller_source, insert_shipped
from hub.services.controller_keys import ControllerKeyAuth
from hub.services.controllers import healthy_fields
from hub.services.locality import ImageSets
from hub.services.monitoring import Monitor
from hub.services.pace import HeartbeatPace
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


# Beats recorded in one transaction at most (the rest wait for the next one).
MAX_BATCH = 2000
# Seconds between counts of the controllers, for the pace (a registration counts at once).
PACE_EVERY = 5.0
# Seconds past MMANAGER_GATEWAY_DRAIN_TIMEOUT after which a copy still draining is fenced as stale.
DRAIN_SLACK = 60.0
# How long this replica remembers when it last heard a controller (far longer than any grace).
HEARD_KEPT = timedelta(hours=1)
# How long what a controller said before its process was found gone is dropped (far longer than a flush).
GONE_KEPT = timedelta(minutes=1)
_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass
class _Beat:
    controller_id: str
    heartbeat: Heartbeat
    arrived: datetime
    answer: asyncio.Future[HeartbeatAnswer]


@dataclass
class _Observation:
    at: datetime
    health: ControllerHealth
    pushed: bool
    error: str | None = None
    # The URL a poll asked (None: pushed): written only while it is still the row's URL, so a poll of an old
    # URL that answers after a PATCH moved the controller does not make the new URL healthy.
    url: str | None = None


class HeartbeatIngest:
    def __init__(self, db: Database, settings: HubSettings, metrics: HubMetrics,
                 images: ImageSets | None = None, outage: DatabaseOutage | None = None) -> None:
        self.db = db
        # Where a batch lost to the database being away is told (once per outage); None: each one is logged.
        self.outage = outage
        self.settings = settings
        self.metrics = metrics
        self.keys = ControllerKeyAuth(db, settings)
        self.pace = HeartbeatPace(settings)
        self.monitor = Monitor(db, settings, metrics, self.pace)
        # The images each controller holds, as its beats last listed them (hub.services.locality).
        self.images = images if images is not None else ImageSets()
        self._paced_at = -math.inf
        self._observations: dict[str, _Observation] = {}
        # Row updates with when they were observed: an observation never overwrites a newer change.
        self._updates: dict[str, tuple[RowUpdate, datetime]] = {}
        self._gone: set[str] = set()
        self._flush_lock = asyncio.Lock()
        self._flushed = asyncio.Event()
        # Beats received and not yet recorded (hub.services.heartbeats: group commit).
        self._inbox: list[_Beat] = []
        self._waiting = 0
        self._arrived = asyncio.Event()
        self._taker: asyncio.Task[None] | None = None
        # When each controller was last heard by this replica: a beat's arrival, before its batch or the flush
        # records it (the reconciler counts silence from here too: hub.scheduler.reconcile.Snapshot.heard).
        self.heard: dict[str, datetime] = {}
        # Controllers whose process was found gone (hub.services.presence), and when.
        self._gone_at: dict[str, datetime] = {}
        # The statements of the steady state, built once (hub.db_direct: compiled once, sent straight to the driver).
        sqlite = db.is_sqlite
        C = ControllerModel.__table__
        self._known = select(C.c.id).where(any_of(C.c.id, "ids", sqlite=sqlite))
        D = DeletedControllerModel.__table__
        self._deleted = select(D.c.id).where(any_of(D.c.id, "ids", sqlite=sqlite))
        self._registry_rows = _rows_query(any_of(ContainerRegistryModel.__table__.c.controller_id, "ids", sqlite=sqlite))
        self._controller_updates: dict[tuple[str, ...], Any] = {}
        A, J = JobAttemptModel.__table__, JobModel.__table__
        self._attempts = (select(A.c.id, A.c.number, A.c.status, J.c.epoch).join(J, J.c.id == A.c.job_id)
                          .where(any_of(A.c.id, "ids", sqlite=sqlite)))

    @property
    def orphan_grace(self) -> float:
        return self.settings.orphan_grace or max(2 * self.pace.grace, 10.0)

    # ------------------------------------------------------------- receive

    async def authenticate(self, controller_id: str, token: str) -> None:
        """Whether ``token`` may speak for ``controller_id`` (hub.services.controller_keys)."""
        await self.keys.authenticate(controller_id, token)

    def hear(self, controller_id: str, health: ControllerHealth, at: datetime) -> None:
        """The controller answered or beat at ``at`` (authenticated, its identity checked), before anything is
        read or written for it. One that says it is unhealthy is not heard: its silence still counts, as its
        ``last_heartbeat_at`` stays."""
        if health.status == "healthy" and at > self.heard.get(controller_id, _NEVER):
            self.heard[controller_id] = at

    def gone(self, controller_id: str, at: datetime) -> None:
        """The controller's process was found gone at ``at``: what it said before and is not written yet is
        dropped, so that a beat it sent just before it died cannot mark it healthy again after it is marked
        lost. A beat that arrives later (it was restarted) is written as any."""
        self._gone_at[controller_id] = at

    async def receive(self, controller_id: str, heartbeat: Heartbeat) -> HeartbeatAnswer:
        """Answer one pushed heartbeat (already authenticated), once its batch is committed."""
        if heartbeat.server_id != controller_id:
            raise InvalidRequest(
                f"heartbeat from {heartbeat.server_id!r} sent to the path of {controller_id!r}",
                code="SERVER_ID_MISMATCH",
            )
        arrived = utcnow()
        # Heard even when shed: the controller lives, only this hub is behind.
        self.hear(controller_id, heartbeat.health, arrived)
        if self._waiting >= self.settings.heartbeat_backlog:
            # Shed, not queued past the controllers' timeouts: they beat again after the Retry-After.
            self.metrics.heartbeats_shed.inc()
            raise Overloaded(f"the hub has {self._waiting} heartbeats waiting; beat again later",
                             retry_after=max(1, round(self.pace.interval)))
        beat = _Beat(controller_id, heartbeat, arrived, asyncio.get_running_loop().create_future())
        self._inbox.append(beat)
        self._waiting += 1
        if self._taker is None or self._taker.done():
            self._taker = asyncio.create_task(self._take(), name="heartbeat-batches")
        self._arrived.set()
        try:
            return await beat.answer
        finally:
            self._waiting -= 1

    async def close(self) -> None:
        if self._taker is not None:
            self._taker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._taker
            self._taker = None

    async def _take(self) -> None:
        """Take what queued while the previous batch was written: one batch at a time, as big as the
        load makes it (one beat when idle, thousands under load)."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._inbox:
                batch, self._inbox = self._inbox[:MAX_BATCH], self._inbox[MAX_BATCH:]
                batch = [b for b in batch if not b.answer.done()]
                try:
                    await self._record(batch)
                except Exception as exc:
                    if self.outage is None or not self.outage.failed("heartbeats", exc):
                        log.warning("%d heartbeat(s) not recorded: %s: %s", len(batch), type(exc).__name__,
                                    str(exc).splitlines()[0] if str(exc) else "")
                    for b in batch:
                        if not b.answer.done():
                            b.answer.set_exception(Overloaded(
                                "the heartbeat could not be recorded (the database is unavailable); beat again",
                                retry_after=1, code="DATABASE_UNAVAILABLE"))

    async def _record(self, batch: list[_Beat]) -> None:
        self.metrics.heartbeat_batch.observe(len(batch))
        ids = sorted({b.controller_id for b in batch})
        rows: dict[str, list[RegistryRow]] = {cid: [] for cid in ids}
        refused: dict[str, HubError] = {}
        # The steady state (known controllers, nothing to store) is two reads straight through the driver
        # (hub.db_direct), however many beats: no ORM session, no transaction.
        known = {r["id"] for r in await self.db.all(self._known, {"ids": ids})}
        for r in await self.db.all(self._registry_rows, {"ids": ids}):
            rows[r["controller_id"]].append(RegistryRow(
                r["id"], r["service_id"], r["epoch"], r["container_id"], r["status"], r["health"],
                r["health_restarts"], r["updated_at"]))
        attempts = await self.attempts_of([c for b in batch for c in b.heartbeat.containers])
        new: dict[str, Heartbeat] = {}
        for b in batch:
            if b.controller_id in known or b.controller_id in new:
                continue
            if not b.heartbeat.url:
                refused[b.controller_id] = NotFound(
                    f"controller {b.controller_id!r} is not registered and sent no url to register it",
                    code="CONTROLLER_NOT_FOUND",
                )
            else:
                new[b.controller_id] = b.heartbeat
        if new:
            # Read after ``known``: a delete commits its row's removal and this mark together, so a beat that
            # missed the row finds the mark.
            for r in await self.db.all(self._deleted, {"ids": sorted(new)}):
                del new[r["id"]]
                refused[r["id"]] = NotFound(
                    f"controller {r['id']!r} was deleted; an admin registers it again (POST "
                    f"/api/admin/controllers) or lists it in MMANAGER_CONTROLLERS", code="CONTROLLER_DELETED")
        shipping = [b for b in batch if b.heartbeat.audit and b.controller_id not in refused]
        if new or shipping:
            await self._store(new, {b.controller_id: b.arrived for b in batch}, shipping)
        # A set counts while its controller beats here within the grace (hub.services.locality).
        self.images.grace = self.pace.detection_grace
        for b in batch:
            if b.answer.done():
                continue
            if b.controller_id in refused:
                b.answer.set_exception(refused[b.controller_id])
                continue
            hb = b.heartbeat
            listed_at = b.arrived - timedelta(seconds=hb.listing_age + PUSH_LAG)
            result = self.observe(b.controller_id, hb.health, hb.containers, rows[b.controller_id], pushed=True,
                                  listed_at=listed_at, at=b.arrived, attempts=attempts)
            self.images.beat(b.controller_id, hb.images_version, hb.images)
            if hb.images is not None:
                self.metrics.controllers.set((b.controller_id,), images=len(hb.images))
            b.answer.set_result(HeartbeatAnswer(
                interval=self.pace.interval, grace=self.pace.grace, stop=result.stop,
                images_version=self.images.version(b.controller_id) if hb.images_version is not None else None))

    async def _store(self, new: dict[str, Heartbeat], arrived: dict[str, datetime], shipping: list[_Beat]) -> None:
        """In one transaction, committed before the beats are answered: register the controllers that are new,
        and store what the controllers audited themselves (at most 1000 events a beat, the wire's bound), which
        is what lets them drop those events. Under a savepoint each: events the database refuses never fail a
        heartbeat (hub.services.audit.insert_shipped)."""
        async with self.db.session() as session:
            if new:
                # A controller that knows the hub's key joins by beating (like a Nomad client); two replicas
                # registering it at once both succeed.
                await session.execute(
                    self._insert_ignoring_conflicts(ControllerModel),
                    [{"id": cid, "url": hb.url.rstrip("/"), "server_type": hb.server_type, "status": "unknown",
                      # It pushes: the poller leaves it alone from the start.
                      "last_push_at": arrived[cid]}
                     for cid, hb in new.items() if hb.url],
                )
                for cid, hb in new.items():
                    log.info("controller %s registered itself at %s", cid, hb.url)
                self._set_pace(self.pace.controllers + len(new))
            for b in shipping:
                await insert_shipped(session, b.heartbeat.audit, controller_source(b.controller_id))

    def _controller_update(self, sample: dict[str, Any]) -> Any:
        """The UPDATE of controller rows by id that sets the columns of ``sample``: one per shape, built once.
        A ``url`` in it is a condition (the row still has that URL), not a column set."""
        shape = tuple(sorted(sample))
        statement = self._controller_updates.get(shape)
        if statement is None:
            table = ControllerModel.__table__
            where = [table.c.id == bindparam("b_id")]
            if "url" in shape:
                where.append(table.c.url == bindparam("b_url"))
            statement = self._controller_updates[shape] = (
                update(table)
                .where(*where)
                .values({key: bindparam(f"b_{key}", type_=table.c[key].type) for key in shape
                         if key not in ("id", "url")})
            )
        return statement

    def _insert_ignoring_conflicts(self, model: Any) -> Any:
        dialect_insert = sqlite_insert if self.db.is_sqlite else pg_insert
        return dialect_insert(model).on_conflict_do_nothing(index_elements=["id"])

    async def _rows(self, session: Any, controller_id: str) -> list[RegistryRow]:
        found = await session.execute(_rows_query(ContainerRegistryModel.controller_id == controller_id))
        return [RegistryRow(*r[1:]) for r in found]

    async def rows_for(self, controller_id: str, db: Database) -> list[RegistryRow]:
        """The controller's registry rows, read through ``db`` (the poller's: not the heartbeats' own pool)."""
        async with db.session() as session:
            return await self._rows(session, controller_id)

    async def attempts_of(self, containers: list[HeartbeatContainer], db: Database | None = None,
                          ) -> dict[str, AttemptState] | None:
        """The attempts the batch jobs' containers among ``containers`` name, for the fence: one read, and
        none (None) when no container is a job's."""
        ids = sorted({c.attempt_id for c in containers if c.attempt_id})
        if not ids:
            return None
        return {r["id"]: AttemptState(r["number"], r["status"], r["epoch"])
                for r in await (db or self.db).all(self._attempts, {"ids": ids})}

    def observe(self, controller_id: str, health: ControllerHealth, containers: list[HeartbeatContainer],
                rows: list[RegistryRow], *, pushed: bool, listed_at: datetime | None = None,
                at: datetime | None = None, attempts: dict[str, AttemptState] | None = None,
                url: str | None = None) -> FenceResult:
        """Record one observation; ``listed_at`` is when the container listing was taken, at the latest.

        A pushed heartbeat's listing was taken before it arrived: it is dated by the
        age it reports plus ``PUSH_LAG``, so it never overwrites a change the hub made meanwhile; ``at`` is
        when it arrived. The caller has called ``hear`` already (as soon as the beat arrived, or the poll answered).
        """
        now = at or utcnow()
        listed_at = listed_at or now - timedelta(seconds=PUSH_LAG)
        if not health.docker:
            # No fresh listing (Docker is down or hung): nothing can be judged missing, gone or orphan.
            self._observations[controller_id] = _Observation(now, health, pushed, url=url)
            return FenceResult()
        # A row written after the controller took its listing may name a container the listing
        # could not have shown yet; only older rows can be declared missing.
        settle = timedelta(seconds=2 * self.pace.interval + 2)
        # A copy left draining by a move whose hub died is fenced once the move could no longer be waiting.
        drained_before = now - timedelta(seconds=self.settings.gateway_drain_timeout + DRAIN_SLACK)
        result = fence(rows, containers, self.orphan_grace, missing_before=min(now - settle, listed_at),
                       drained_before=drained_before, attempts=attempts)
        self._observations[controller_id] = _Observation(now, health, pushed, url=url)
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
        await self.keys.flush()
        await self.monitor.flush()
        if time.monotonic() - self._paced_at > PACE_EVERY:
            await self.count_controllers()

    async def count_controllers(self) -> None:
        """Count the registered controllers and set the pace for them (``hub.services.pace``)."""
        async with self.db.session() as session:
            count = await session.scalar(select(func.count()).select_from(ControllerModel)) or 0
        self._paced_at = time.monotonic()
        self._set_pace(count)
        # Controllers not heard for an hour (deleted, or long gone) are forgotten.
        forgotten = utcnow() - HEARD_KEPT
        self.heard = {cid: at for cid, at in self.heard.items() if at > forgotten}

    def _set_pace(self, controllers: int) -> None:
        before = self.pace.interval
        self.pace.update(controllers)
        self.metrics.heartbeat_interval.set(self.pace.interval)
        if self.pace.interval != before:
            log.info("heartbeat interval now %gs, grace %gs (%d controllers, MMANAGER_HEARTBEAT_MAX_RATE=%g)",
                     self.pace.interval, self.pace.grace, controllers, self.settings.heartbeat_max_rate)

    async def _flush_observations(self) -> None:
        async with self._flush_lock:
            observations, self._observations = self._observations, {}
            updates, self._updates = self._updates, {}
            gone, self._gone = self._gone, set()
            if self._gone_at:
                observations = self._without_gone(observations)
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

    def _without_gone(self, observations: dict[str, _Observation]) -> dict[str, _Observation]:
        kept = utcnow() - GONE_KEPT
        self._gone_at = {cid: at for cid, at in self._gone_at.items() if at > kept}
        return {cid: obs for cid, obs in observations.items()
                if cid not in self._gone_at or obs.at > self._gone_at[cid]}

    async def _write(self, observations: dict[str, _Observation], updates: dict[str, tuple[RowUpdate, datetime]],
                     gone: set[str]) -> None:
        good: list[dict[str, Any]] = []
        bad: list[dict[str, Any]] = []
        now = utcnow()
        for controller_id, obs in observations.items():
            h = obs.health
            if obs.error is None and h.status == "healthy":
                row = {"id": controller_id, **healthy_fields(h, obs.at)}
            else:
                row = {"id": controller_id, "error_message": obs.error or h.error or "unhealthy"}
            if obs.pushed:
                row["last_push_at"] = obs.at
            if obs.url is not None:
                row["url"] = obs.url
            row["updated_at"] = now
            (good if obs.error is None and h.status == "healthy" else bad).append(row)
        if good or bad:
            # One executemany per shape, however many controllers (rows gone meanwhile are skipped), in id order
            # (the order of the locks); straight through the driver (hub.db_direct).
            good.sort(key=lambda r: r["id"])
            bad.sort(key=lambda r: r["id"])
            async with self.db.transaction() as tx:
                for batch in _same_keys(good) + _same_keys(bad):
                    await tx.executemany(self._controller_update(batch[0]), [_bind(r) for r in batch])
        if not (updates or gone):
            return
        async with self.db.session() as session:
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
                            health_restarts=bindparam("b_restarts"), health_detail=bindparam("b_detail"),
                            updated_at=bindparam("b_at"),
                            container_id=func.coalesce(bindparam("b_container_id"), table.c.container_id))
                )
                await session.execute(stmt, [
                    {"b_id": u.id, "b_at": at, "b_status": u.status, "b_health": u.health,
                     "b_restarts": u.health_restarts, "b_detail": u.health_detail,
                     "b_container_id": u.container_id or None}
                    for u, at in ordered
                ])
            if gone:
                await session.execute(
                    delete(ContainerRegistryModel).where(
                        ContainerRegistryModel.id.in_(list(gone)),
                        or_(ContainerRegistryModel.status == "stale", ContainerRegistryModel.status == "draining"),
                    )
                )


def _rows_query(where: Any) -> Any:
    R = ContainerRegistryModel
    return select(R.controller_id, R.id, R.service_id, R.epoch, R.container_id, R.status, R.health,
                  R.health_restarts, R.updated_at).where(where)




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
    values: dict[str, Any] = {"health": u.health, "health_detail": u.health_detail, "updated_at": observed_at}
    if u.status == "running":
        values["status"] = "unhealthy" if u.health == "unhealthy" else "running"
    elif u.status in ("created", "restarting"):
        values["status"] = "starting"
    elif u.status == "missing":
        # Removed behind our back: the reconciler makes a new one when it should run.
        values["status"] = case((s.desired_state == "running", "lost"), (s.status == "idle", "idle"), else_="stopped")
        values["endpoint"] = None
    else:
        # An idle service (stopped for want of traffic) stays idle: the next request wakes it.
        values["status"] = case((s.desired_state == "running", "failed"), (s.status == "idle", "idle"),
                                else_="stopped")
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
