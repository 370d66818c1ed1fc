"""Controllers: registration, run-time changes, deletion, health and drains.

A controller's ``status`` changes only through ``ControllerRegistry.record_health``
(what a poll saw) and the admin actions here, so the metrics and the table
cannot disagree. A change that bears on placement (a drain, a new priority,
weight, cap, type or URL, a deletion) is told to the placement cache at once.

Invariant: a controller that holds something (a service's copy, a job's live
attempt) is never deleted, neither by ``DELETE /api/admin/controllers/{id}`` nor
by a reload of ``MMANAGER_CONTROLLERS`` (``ControllerRegistry.reload``): a reload
disables it instead, and a later reload deletes it once it is empty.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select
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
    return {}


def has_services(controller_id: str, held: dict[str, Any]) -> Conflict:
    return Conflict(
        f"controller {controller_id!r} holds {held['services_count']} service(s) and "
        f"{held['job_attempts_count']} running job attempt(s): drain it first (DELETE ...?drain=true drains "
        f"then deletes), and let its jobs end", held, code="CONTROLLER_HAS_SERVICES")


def _entry_values(entry: ControllerEntry) -> dict[str, Any]:
    return {"url": entry.url.rstrip("/"), "server_type": entry.server_type, "enabled": entry.enabled,
            "priority": entry.priority, "weight": entry.weight}


def _same_entry(a: ControllerEntry, b: ControllerEntry) -> bool:
    key = (lambda e: e.api_key.get_secret_value() if e.api_key else None)
    return _entry_values(a) == _entry_values(b) and key(a) == key(b)


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
        # Entries gone from the file whose controllers a reload disabled and kept (they held services).
        self._kept: set[str] = set()

    async def sync_from_config(self) -> None:
        """Upsert ``MMANAGER_CONTROLLERS``: the configuration wins over the table at start-up. What it
        changes in the table is audited (actor ``system``); entries the table holds and the configuration
        does not name are left alone (they were registered by API or by their own heartbeats)."""
        entries = self.settings.controller_entries
        if not entries:
            return
        shared = [e.id for e in entries if e.api_key is None]
        if len(shared) > 1 and not self.settings.dev_mode:
            # Each of them holds the key that drives all of them: one broken into can drive the others.
            log.warning("%d controllers share MMANAGER_API_KEY (%s): give each entry its own api_key "
                        "(docs/SECURITY.md#controller-credentials)", len(shared), ", ".join(shared[:5]))
        for entry in entries:
            await self._apply_entry(entry, "start")

    async def reload(self, trigger: str) -> bool:
        """Read ``MMANAGER_CONTROLLERS`` again and apply what changed in it since it was last read.

        Entries new in it are registered, entries changed in it are updated (the configuration wins for
        them, as at the start), and entries gone from it are deleted when they hold nothing, else disabled
        and kept (a later reload deletes them once empty). Entries unchanged in it are left as they are:
        what an admin changed through the API since stands until the file changes that entry. A file that
        cannot be read or is not valid changes nothing (logged and audited). Every change is audited with
        actor ``system``. Returns whether the file was applied.
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
            before = {e.id: e for e in self.settings.controller_entries}
            after = {e.id: e for e in entries}
            gone = [before[cid] for cid in before if cid not in after]
            # The old entries of those gone stay in force while they are removed: the hub keeps their keys to
            # reach them (and keeps those it must disable but cannot delete).
            self.settings.use_controller_entries(entries + gone)
            for entry in entries:
                # One a reload disabled and kept, back in the file: the file's ``enabled`` applies again.
                if (entry.id not in before or entry.id in self._kept
                        or not _same_entry(before[entry.id], entry)):
                    await self._apply_entry(entry, trigger)
            kept = [entry for entry in gone if not await self._remove_entry(entry, trigger)]
            self._kept = {entry.id for entry in kept}
            self.settings.use_controller_entries(entries + kept)
            self.placement.stale()
            log.info("MMANAGER_CONTROLLERS (%s) reloaded (%s): %d entries, %d removed from it, %d of them kept "
                     "disabled while they hold services", source, trigger, len(entries), len(gone), len(kept))
            return True

    async def _apply_entry(self, entry: ControllerEntry, trigger: str) -> None:
        values = _entry_values(entry)
        async with self.db.session() as session:
            row = await session.get(ControllerModel, entry.id, with_for_update=True)
            created = row is None
            if row is None:
                row = ControllerModel(id=entry.id, **values)
                session.add(row)
                changes = {k: {"before": None, "after": v} for k, v in values.items()}
            else:
                changes = {k: {"before": getattr(row, k), "after": v} for k, v in values.items()
                           if getattr(row, k) != v}
                if "url" in changes:
                    row.status = "unknown"
                for field in changes:
                    setattr(row, field, values[field])
        if created or changes:
            self.placement.stale()
            await self._audit(entry.id, 201 if created else 200,
                              {"trigger": trigger, "action": "registered" if created else "updated",
                               "changes": changes})

    async def _remove_entry(self, entry: ControllerEntry, trigger: str) -> bool:
        """An entry gone from the file: delete its controller if it holds nothing (True), else disable it."""
        async with self.db.session() as session:
            if await session.get(ControllerModel, entry.id) is None:
                return True
            held = await remove_controller(session, entry.id)
            if held:
                row = await session.get(ControllerModel, entry.id)
                assert row is not None
                was_enabled = row.enabled
                row.enabled = False
        if not held:
            self.forget(entry.id)
            log.warning("controller %s deleted: it is no longer in MMANAGER_CONTROLLERS", entry.id)
            await self._audit(entry.id, 204, {"trigger": trigger, "action": "deleted",
                                              "reason": "removed from MMANAGER_CONTROLLERS"})
            return True
        if was_enabled:
            self.placement.stale()
            log.warning("controller %s is no longer in MMANAGER_CONTROLLERS but holds %d service(s) and %d job "
                        "attempt(s): disabled and kept, deleted by a later reload once empty (drain it)",
                        entry.id, held["services_count"], held["job_attempts_count"])
            await self._audit(entry.id, 200, {
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
