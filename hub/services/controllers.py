"""Controllers: registration, run-time changes, deletion, health and drains.

A controller's ``status`` changes only through ``ControllerRegistry.record_health``
(what a poll saw) and the admin actions here, so the metrics and the table
cannot disagree. A change that bears on placement (a drain, a new priority,
weight, cap, type or URL, a deletion) is told to the placement cache at once.

Invariant: a controller that holds something (a service's copy, a job's live
attempt) is never deleted, neither by ``DELETE /api/admin/controllers/{id}`` nor
by a reload of ``MMANAGER_CONTROLLERS`` (``ControllerRegistry.reload``): a reload
disables it instead, and a later start or reload deletes it once it is empty (its
row is marked ``from_file``). A placement locks the controller's row (``FOR KEY
SHARE``) while it inserts what it places there, so a delete either sees it or
makes it fail. A deleted controller leaves a ``deleted_controllers`` row: its own
heartbeats do not register it again.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import ControllerEntry, HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Conflict, HubError, NotFound
from hub.metrics import HubMetrics
from hub.models import (
    ContainerRegistryModel,
    ControllerKeyModel,
    ControllerModel,
    DeletedControllerModel,
    JobAttemptModel,
    OperationModel,
    ServiceModel,
    UserModel,
    utcnow,
)
from hub.scheduler.snapshot import PlacementCache
from hub.schemas import ControllerIn, ControllerOut, ControllerPatch
from hub.services.audit import AuditLog
from hub.services.operations import OperationLog
from hub.services.users import SYSTEM_ACTOR
from mmanager.wire import AuditEvent, ControllerHealth

log = logging.getLogger(__name__)

# What a refused delete lists at most of each kind (the counts are whole).
HOLDINGS_LISTED = 50
# The fields of an entry of MMANAGER_CONTROLLERS that its controller's row holds.
ENTRY_FIELDS = ("url", "server_type", "enabled", "priority", "weight")
# How a reload's events appear in the audit log (method, path): no HTTP call made them.
RELOAD_METHOD = "RELOAD"
RELOAD_PATH = "config:MMANAGER_CONTROLLERS"


def effective_max_containers(c: ControllerModel) -> int:
    """What placement allows there: the controller's own limit, or the admin's cap when smaller."""
    return min(c.max_containers, c.max_containers_cap or c.max_containers)


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
        max_containers=effective_max_containers(c),
        max_containers_cap=c.max_containers_cap,
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


async def holdings(session: AsyncSession, controller_id: str) -> dict[str, Any]:
    """What the controller holds: services with a copy there (or whose primary it is), its registry rows
    other than superseded ones, and jobs' attempts starting or running there. Empty: it may go.

    A ``stale`` row (a copy a move superseded, waiting for its controller to remove it) holds nothing: it
    goes with the controller, and the controller, should it come back, removes that container as an orphan.
    """
    R, S, A = ContainerRegistryModel, ServiceModel, JobAttemptModel
    rows = list((await session.execute(
        select(R.id, R.service_id).where(R.controller_id == controller_id, R.status != "stale").order_by(R.id)
    )).all())
    services = set(await session.scalars(select(S.id).where(S.controller_id == controller_id)))
    services.update(service_id for _, service_id in rows)
    attempts = list(await session.scalars(
        select(A.id).where(A.controller_id == controller_id, or_(A.status == "starting", A.status == "running"))
        .order_by(A.id)))
    if not services and not attempts:
        return {}
    return {"services": sorted(services)[:HOLDINGS_LISTED], "services_count": len(services),
            "containers_count": len(rows), "job_attempts": attempts[:HOLDINGS_LISTED],
            "job_attempts_count": len(attempts)}


async def remove_controller(session: AsyncSession, controller_id: str) -> dict[str, Any]:
    """Delete the controller's row, its keys and its superseded registry rows, if it holds nothing (the
    row locked meanwhile); else return what it holds and change nothing. Operations, alerts and the audit
    log keep their history of it."""
    await session.execute(select(ControllerModel.id).where(ControllerModel.id == controller_id).with_for_update())
    held = await holdings(session, controller_id)
    if held:
        return held
    # Named here rather than left to the keys' ON DELETE CASCADE: what a delete removes is read in one place.
    await session.execute(delete(ControllerKeyModel).where(ControllerKeyModel.controller_id == controller_id))
    await session.execute(delete(ContainerRegistryModel).where(ContainerRegistryModel.controller_id == controller_id,
                                                               ContainerRegistryModel.status == "stale"))
    await session.execute(delete(ControllerModel).where(ControllerModel.id == controller_id))
    # In the same transaction: a heartbeat that finds the row gone finds this too, and does not register it again.
    await session.execute(delete(DeletedControllerModel).where(DeletedControllerModel.id == controller_id))
    session.add(DeletedControllerModel(id=controller_id))
    return {}


async def undelete(session: AsyncSession, controller_id: str) -> None:
    """An admin registers the controller again, or the file lists it: its heartbeats may register it again."""
    await session.execute(delete(DeletedControllerModel).where(DeletedControllerModel.id == controller_id))


def has_services(controller_id: str, held: dict[str, Any]) -> Conflict:
    return Conflict(
        f"controller {controller_id!r} holds {held['services_count']} service(s) and "
        f"{held['job_attempts_count']} running job attempt(s): drain it first (DELETE ...?drain=true drains "
        f"then deletes), and let its jobs end", held, code="CONTROLLER_HAS_SERVICES")


def _entry_values(entry: ControllerEntry) -> dict[str, Any]:
    return {"url": entry.url.rstrip("/"), "server_type": entry.server_type, "enabled": entry.enabled,
            "priority": entry.priority, "weight": entry.weight}


def _key_of(entry: ControllerEntry) -> str | None:
    return entry.api_key.get_secret_value() if entry.api_key else None


class ControllerRegistry:
    def __init__(self, db: Database, client: ControllerClient, settings: HubSettings, metrics: HubMetrics,
                 ops: OperationLog, placement: PlacementCache) -> None:
        self.db = db
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.ops = ops
        self.placement = placement
        self.audit = AuditLog(db)
        # One reload at a time (a SIGHUP during the watcher's reload waits for it).
        self._reload_lock = asyncio.Lock()
        # The file's entries as this replica last applied them, one by one: a reload that fails part-way (the
        # database went away) leaves the rest to the next one, which finds them still different.
        self._listed: dict[str, ControllerEntry] = {e.id: e for e in settings.controller_entries}
        # Entries gone from the file whose controllers were kept, disabled (they hold something): their keys
        # stay in force to reach them, while this replica runs (a restarted one no longer knows them).
        self._kept: dict[str, ControllerEntry] = {}

    async def sync_from_config(self) -> None:
        """Upsert ``MMANAGER_CONTROLLERS``: the configuration wins over the table at start-up. Controllers it
        listed before (``from_file``) and lists no more are removed as a reload removes them: the file may
        have changed while no hub ran. What it changes in the table is audited (actor ``system``); controllers
        it never listed are left alone (they were registered by API or by their own heartbeats)."""
        if not self.settings.controllers.strip():
            return
        entries = self.settings.controller_entries
        shared = [e.id for e in entries if e.api_key is None]
        if len(shared) > 1 and not self.settings.dev_mode:
            # Each of them holds the key that drives all of them: one broken into can drive the others.
            log.warning("%d controllers share MMANAGER_API_KEY (%s): give each entry its own api_key "
                        "(docs/SECURITY.md#controller-credentials)", len(shared), ", ".join(shared[:5]))
        for entry in entries:
            await self._apply_entry(entry, "start", None)
        for controller_id in await self._gone({e.id for e in entries}):
            await self._remove_entry(controller_id, "start")

    async def reload(self, trigger: str) -> bool:
        """Read ``MMANAGER_CONTROLLERS`` again and apply what changed in it since it was last read.

        Entries new in it are registered; in an entry changed in it, the fields it changed are set (the
        others keep what an admin changed through the API); controllers it listed and lists no more are
        deleted when they hold nothing, else disabled and kept (a later start or reload deletes them once
        empty). A file that cannot be read or is not valid (an empty one among them) changes nothing (logged
        and audited). Every change is audited with actor ``system``. Returns whether the file was applied;
        raises when the database fails, what was applied until then staying applied.
        """
        async with self._reload_lock:
            source = str(self.settings.controllers_file or "inline JSON")
            try:
                entries = await asyncio.to_thread(self.settings.read_controller_entries)
            except Exception as exc:  # a file half-written, a bad entry, a weak key: the old set stays
                reason = _unfit_reason(exc)
                log.warning("MMANAGER_CONTROLLERS (%s) not reloaded (%s): %s; the controllers stay as they were",
                            source, trigger, reason)
                await self._audit(None, 422, {"trigger": trigger, "file": source, "message": reason},
                                  error_code="CONTROLLERS_FILE_INVALID")
                return False
            removed = kept = 0
            try:
                for entry in entries:
                    # One kept while gone from the file and back in it is applied whole: the file's ``enabled``
                    # applies again.
                    await self._apply_entry(entry, trigger, self._listed.get(entry.id))
                    self._listed[entry.id] = entry
                    self._kept.pop(entry.id, None)
                    self._put_in_force()
                for controller_id in await self._gone({e.id for e in entries}):
                    old = self._listed.get(controller_id) or self._kept.get(controller_id)
                    if await self._remove_entry(controller_id, trigger):
                        removed += 1
                        self._kept.pop(controller_id, None)
                    else:
                        kept += 1
                        if old is not None:
                            self._kept[controller_id] = old
                    self._listed.pop(controller_id, None)
                    self._put_in_force()
            finally:
                self.placement.stale()
            log.info("MMANAGER_CONTROLLERS (%s) reloaded (%s): %d entries, %d controller(s) deleted, %d kept "
                     "disabled while they hold services", source, trigger, len(entries), removed, kept)
            return True

    def _put_in_force(self) -> None:
        """The keys ``key_for`` presents: the entries applied, and those of the controllers kept."""
        self.settings.use_controller_entries(
            [*self._listed.values(), *(e for cid, e in self._kept.items() if cid not in self._listed)])

    async def _gone(self, listed: set[str]) -> list[str]:
        """The controllers the file listed (as this replica knows, or as their rows say) and lists no more."""
        async with self.db.session() as session:
            marked = set(await session.scalars(select(ControllerModel.id).where(ControllerModel.from_file.is_(True))))
        return sorted((marked | set(self._listed) | set(self._kept)) - listed)

    async def _apply_entry(self, entry: ControllerEntry, trigger: str, previous: ControllerEntry | None) -> None:
        """Set the controller's row to the entry: all of it when ``previous`` is None (the start, an entry new
        in the file), else only the fields the file changed since ``previous``. A row missing is made whole."""
        values = _entry_values(entry)
        wanted = values if previous is None else {
            k: v for k, v in values.items() if _entry_values(previous)[k] != v}
        key_changed = previous is not None and _key_of(previous) != _key_of(entry)
        if previous is not None and not wanted and not key_changed:
            return
        changes: dict[str, Any] = {}
        async with self.db.session() as session:
            row = await session.get(ControllerModel, entry.id, with_for_update=True)
            created = False
            if row is None:
                # Two replicas reloading the same file both find no row: one inserts, the other updates.
                insert = (sqlite_insert if self.db.is_sqlite else pg_insert)(ControllerModel)
                result = await session.execute(insert.values(id=entry.id, from_file=True, **values)
                                               .on_conflict_do_nothing(index_elements=["id"]))
                created = result.rowcount == 1  # type: ignore[attr-defined]  # a CursorResult
                await undelete(session, entry.id)
                if created:
                    changes = {k: {"before": None, "after": v} for k, v in values.items()}
                else:
                    row = await session.get(ControllerModel, entry.id, with_for_update=True, populate_existing=True)
                    wanted = values
            if row is not None:
                row.from_file = True
                if wanted.get("enabled") is True and row.draining:
                    # A drain under way keeps it disabled; enabling it is the admin's (POST .../enable).
                    wanted = {k: v for k, v in wanted.items() if k != "enabled"}
                changes = {k: {"before": getattr(row, k), "after": v} for k, v in wanted.items()
                           if getattr(row, k) != v}
                if "url" in changes:
                    row.status = "unknown"
                    row.error_message = None
                for field in changes:
                    setattr(row, field, values[field])
        if key_changed:
            # Not a column: each replica presents it from its memory (``key_for``). Never its value.
            changes["api_key"] = "changed"
        if created or changes:
            self.placement.stale()
            await self._audit(entry.id, 201 if created else 200,
                              {"trigger": trigger, "action": "registered" if created else "updated",
                               "changes": changes})

    async def _remove_entry(self, controller_id: str, trigger: str) -> bool:
        """A controller gone from the file: delete it if it holds nothing (True), else disable it."""
        async with self.db.session() as session:
            if await session.get(ControllerModel, controller_id) is None:
                return True
            held = await remove_controller(session, controller_id)
            if held:
                row = await session.get(ControllerModel, controller_id)
                assert row is not None
                was_enabled = row.enabled
                row.enabled = False
        if not held:
            self.forget(controller_id)
            log.warning("controller %s deleted: it is no longer in MMANAGER_CONTROLLERS", controller_id)
            await self._audit(controller_id, 204, {"trigger": trigger, "action": "deleted",
                                                   "reason": "removed from MMANAGER_CONTROLLERS"})
            return True
        if was_enabled:
            self.placement.stale()
            log.warning("controller %s is no longer in MMANAGER_CONTROLLERS but holds %d service(s) and %d job "
                        "attempt(s): disabled and kept, deleted by a later start or reload once empty (drain it)",
                        controller_id, held["services_count"], held["job_attempts_count"])
            await self._audit(controller_id, 200, {
                "trigger": trigger, "action": "disabled", "changes": {"enabled": {"before": True, "after": False}},
                "reason": "removed from MMANAGER_CONTROLLERS, but it holds services: kept until it is empty",
                "holds": held})
        return False

    async def _audit(self, target: str | None, status: int, details: dict[str, Any],
                     error_code: str | None = None) -> None:
        await self.audit.record(AuditEvent(at=utcnow(), actor=SYSTEM_ACTOR, method=RELOAD_METHOD, path=RELOAD_PATH,
                                           target=target, status_code=status, error_code=error_code,
                                           details=details))

    def forget(self, controller_id: str) -> None:
        """A controller was deleted: this replica stops counting it (the others within a snapshot's age)."""
        self.placement.stale()
        self.metrics.controller_down(controller_id)

    async def update(self, session: AsyncSession, controller_id: str, patch: ControllerPatch
                     ) -> tuple[ControllerModel, dict[str, dict[str, Any]]]:
        """Apply a PATCH; returns the row and what changed (``{field: {before, after}}``, only real changes).
        A new URL makes the controller's status ``unknown`` until it answers there."""
        row = await session.get(ControllerModel, controller_id, with_for_update=True)
        if row is None:
            raise NotFound(f"controller {controller_id!r} not found", code="CONTROLLER_NOT_FOUND")
        wanted = patch.model_dump(include=patch.model_fields_set)
        if "url" in wanted:
            wanted["url"] = wanted["url"].rstrip("/")
        if "max_containers" in wanted:
            wanted["max_containers_cap"] = wanted.pop("max_containers")
        changes: dict[str, dict[str, Any]] = {}
        for field, value in wanted.items():
            if getattr(row, field) != value:
                changes["max_containers" if field == "max_containers_cap" else field] = {
                    "before": getattr(row, field), "after": value}
                setattr(row, field, value)
        if "url" in changes:
            row.status = "unknown"
            row.error_message = None
        await session.flush()
        return row, changes

    async def delete(self, session: AsyncSession, controller_id: str) -> None:
        """Delete a controller that holds nothing; ``CONTROLLER_HAS_SERVICES`` (409) lists what it holds."""
        await get_controller(session, controller_id)
        held = await remove_controller(session, controller_id)
        if held:
            raise has_services(controller_id, held)

    async def register(self, session: AsyncSession, data: ControllerIn) -> ControllerModel:
        if await session.get(ControllerModel, data.id) is not None:
            raise Conflict(f"controller {data.id!r} is already registered", code="CONTROLLER_EXISTS")
        row = ControllerModel(**data.model_dump())
        row.url = row.url.rstrip("/")
        await undelete(session, data.id)
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
        """Ask the controller, with no lock held meanwhile, and record what it said unless its URL changed."""
        url = row.url
        health, error = await self.check(row)
        await session.refresh(row, with_for_update=True)
        if row.url == url:
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


def _unfit_reason(exc: BaseException) -> str:
    """Why a reload was refused, in one line, without the file's content (it may hold keys)."""
    if isinstance(exc, OSError):
        return f"cannot read it: {exc.strerror or type(exc).__name__}"
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors(include_input=False)
        if found:
            first = found[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return f"invalid entry{' ' + where if where else ''}: {first.get('msg')} ({len(found)} problem(s))"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
