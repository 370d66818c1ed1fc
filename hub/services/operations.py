"""The operation history (``container_operations``) and the one protocol every operation follows.

Every lifecycle call is recorded here: a row is committed as ``running`` before the controller is touched
and finished as ``succeeded`` or ``failed`` afterwards, so a crash leaves a visible trace instead of nothing.
An operation this process runs is in ``OperationLog.active`` from its beginning until its end is committed
(``running``); one ``running`` in the table but not there lost its end and is recovered (``recover_own``).
A running operation's progress is written by one place (``progress``, ``advance``, ``pulling``), key by key
under the operation's own lock, so concurrent writers never drop each other's keys nor set ``done`` back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

from sqlalchemy import Select, Update, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.db import Database, Tx, any_of, insert_row
from hub.errors import HubError
from hub.metrics import HubMetrics
from hub.models import OperationModel, new_id, utcnow

log = logging.getLogger(__name__)

_OPERATIONS = OperationModel.__table__
# An operation's statuses while it is in progress.
ACTIVE = ("pending", "running")
# What an operation's end writes.
_FINISHED = ("status", "error", "finished_at", "details", "controller_id", "container_id", "service_id")
_FINISH = (
    update(_OPERATIONS)
    .where(_OPERATIONS.c.id == bindparam("op_id"))
    .values({key: bindparam(key, type_=_OPERATIONS.c[key].type) for key in _FINISHED})
)


# A running operation's progress (``OperationLog.progress``).
_PROGRESS = (
    update(_OPERATIONS)
    .where(_OPERATIONS.c.id == bindparam("op_id"), _OPERATIONS.c.status == "running")
    .values(details=bindparam("details", type_=_OPERATIONS.c.details.type))
)


@functools.cache
def _recover_own(sqlite: bool) -> Update:
    """``OperationLog.recover_own``'s statement, built once (it runs every second on every replica)."""
    o = _OPERATIONS.c
    return update(_OPERATIONS).where(
        o.hub_replica == bindparam("replica"),
        any_of(o.status, "active", sqlite=sqlite),
        o.operation != "drain",  # finished by the reconciler, not by this process
        o.created_at < bindparam("before"),
        ~any_of(o.id, "here", sqlite=sqlite),
    ).values(status="failed", finished_at=bindparam("now"),
             error="interrupted: its end could not be recorded (database outage); the reconciler finishes its work")


class OperationLog:
    def __init__(self, db: Database, metrics: HubMetrics, replica_id: str | None = None) -> None:
        self.db = db
        self.metrics = metrics
        # Recorded on each operation, so one left running by a replica that died can be recovered.
        self.replica_id = replica_id
        # Operations this process is running right now. One of ours that is "running" in the table
        # but not here lost its ending to a database outage: it is recovered like a dead replica's.
        self.active: set[str] = set()
        # What the progress writes of each running operation showed so far (``progress``).
        self._shown: dict[str, _Shown] = {}

    def new(self, operation: str, actor: str, **fields: Any) -> OperationModel:
        """A running operation, every column set, for the caller to insert in its transaction (and to run,
        ``running``, once that committed)."""
        values: dict[str, Any] = {"service_id": None, "controller_id": None, "container_id": None, "error": None,
                                  "details": {}, "finished_at": None, **fields}
        return OperationModel(id=new_id(), operation=operation, status="running", actor=actor,
                              hub_replica=self.replica_id, created_at=utcnow(), **values)

    def add(self, session: AsyncSession, operation: str, actor: str, **fields: Any) -> OperationModel:
        """Begin an operation inside the caller's ORM transaction (it is durable when that commits), for
        whoever finishes it (a drain's, the reconciler)."""
        op = self.new(operation, actor, **fields)
        session.add(op)
        return op

    async def begin(
        self,
        operation: str,
        actor: str,
        service_id: str | None = None,
        controller_id: str | None = None,
        container_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> OperationModel:
        op = OperationModel(
            id=new_id(),
            operation=operation,
            status="running",
            actor=actor,
            service_id=service_id,
            controller_id=controller_id,
            container_id=container_id,
            details=details or {},
            hub_replica=self.replica_id,
            created_at=utcnow(),
        )
        self.active.add(op.id)
        try:
            async with self.db.session() as session:
                session.add(op)
        except BaseException:
            self.active.discard(op.id)
            raise
        return op

    def _shown_of(self, op: OperationModel) -> _Shown:
        if op.id not in self.active:
            return _Shown()  # ended: a late write changes nothing (it needs the row still running)
        return self._shown.setdefault(op.id, _Shown())

    async def _show(self, op: OperationModel, shown: _Shown) -> bool:
        async with self.db.transaction() as tx:
            return await tx.execute(_PROGRESS, {"op_id": op.id, "details": {**op.details, **shown.details}}) == 1

    async def progress(self, op: OperationModel, **details: Any) -> bool:
        """Show how far a running ``op`` got: its details as they are plus every key any progress write gave
        it so far, ``details`` last, written while it is still running (never over its end). Writes of one
        operation take turns (its lock), so the table gets them in the order they were merged. ``op.details``
        itself is left alone, so its end writes what it began with and its own outcome, and the progress goes
        with it. Whether it was written."""
        shown = self._shown_of(op)
        async with shown.lock:
            shown.details.update(details)
            return await self._show(op, shown)

    def expect_steps(self, op: OperationModel) -> None:
        """``op`` counts steps (replicas, services) from now on: its ``details.progress`` is theirs, and an
        image pull shows only under ``image_pull``. Written by nothing (the next write shows it)."""
        self._shown_of(op).steps = True

    async def advance(self, op: OperationModel, done: int, total: int, unit: str, step: str) -> None:
        """Show how far a long ``op`` got as its ``details.progress`` (``progress_of``), written while it runs;
        ``done`` never goes back (writers running side by side may report out of order). A courtesy: a write
        that fails is only logged, and the operation goes on."""
        shown = self._shown_of(op)
        try:
            async with shown.lock:
                shown.steps = True
                before = shown.details.get("progress")
                if (isinstance(before, dict) and before.get("unit") == unit and before.get("total") == total
                        and before.get("done", 0) >= done):
                    return
                shown.details["progress"] = progress_of(done, total, unit, step)
                await self._show(op, shown)
        except Exception as exc:
            log.debug("no progress written for operation %s: %s", op.id, exc)

    async def pulling(self, op: OperationModel, controller_id: str, pull: dict[str, Any], step: str) -> None:
        """Show a controller's image pull for ``op``: under ``details.image_pull`` (a list when several
        controllers pull), and as its ``progress`` in bytes only while ``op`` counts no steps (a single copy's
        create). Raises what the write raised."""
        shown = self._shown_of(op)
        async with shown.lock:
            shown.pulls[controller_id] = {**pull, "controller_id": controller_id}
            pulls = list(shown.pulls.values())
            shown.details["image_pull"] = pulls[0] if len(pulls) == 1 else pulls
            if not shown.steps:
                shown.details["progress"] = progress_of(int(pull.get("bytes_done") or 0),
                                                        int(pull.get("bytes_total") or 0), "bytes", step)
            await self._show(op, shown)

    def running(self, op: OperationModel) -> Running:
        """Run ``op`` here: it counts as active from this call on, and its context (``async with``) ends it
        as failed if the body raises before its end was committed."""
        return Running(self, op)

    async def recover_own(self) -> int:
        """Fail this replica's operations that are "running" in the table but no longer here: their
        ending was lost to a database outage. Each replica runs this for itself, leader or not."""
        now = utcnow()
        async with self.db.transaction() as tx:
            # Anything begun in the last second is too young to judge.
            return await tx.execute(_recover_own(self.db.is_sqlite), {
                "replica": self.replica_id, "active": list(ACTIVE), "before": now - timedelta(seconds=1),
                "here": sorted(self.active), "now": now})

    async def finish(
        self,
        op: OperationModel,
        error: str | None = None,
        **changes: Any,
    ) -> OperationModel:
        try:
            # Each statement committed by itself: the UPDATE, or (its beginning rolled back) the INSERT.
            await self.finish_in(self.db, op, error, **changes)
        finally:
            self.active.discard(op.id)
            self._shown.pop(op.id, None)
        return self.finished(op)

    async def finish_in(self, tx: Tx, op: OperationModel, error: str | None = None,
                        **changes: Any) -> None:
        """End ``op`` inside the caller's transaction; call ``finished(op)`` once that committed.

        Until then the end is pending: ``op`` stays active, and if that transaction does not commit,
        ``running`` records the failure that ended it. One UPDATE by id; an operation whose row is not there
        (its beginning was rolled back) is inserted as it ends.
        """
        op.status = "failed" if error else "succeeded"
        op.error = error
        op.finished_at = utcnow()
        for key, value in changes.items():
            if key == "details":
                if value:
                    op.details = {**op.details, **value}
            else:
                setattr(op, key, value)
        if await tx.execute(_FINISH, {"op_id": op.id, **{key: getattr(op, key) for key in _FINISHED}}) != 1:
            await insert_row(tx, op)

    def finished(self, op: OperationModel) -> OperationModel:
        """After ``finish_in``'s transaction committed: metrics and the log line."""
        self.active.discard(op.id)
        self._shown.pop(op.id, None)
        duration = (op.finished_at - op.created_at).total_seconds() if op.finished_at and op.created_at else 0.0
        self.metrics.operations.labels(op.operation, op.status).inc()
        self.metrics.operation_duration.labels(op.operation).observe(duration)
        log.log(logging.WARNING if op.error else logging.INFO,
                "operation %s %s of service %s on %s by %s %s in %.2fs%s",
                op.operation, op.id, op.service_id, op.controller_id, op.actor, op.status, duration,
                f": {op.error}" if op.error else "")
        return op


@dataclass
class _Shown:
    """What a running operation's progress writes showed so far (``OperationLog.progress``): the keys
    written, each controller's pull, and whether it counts steps; ``lock`` makes its writes take turns."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    details: dict[str, Any] = field(default_factory=dict)
    pulls: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: bool = False


class Running:
    """An operation run by this process (``OperationLog.running``): active until its end is committed, by
    ``finish`` or by ``finish_in`` and then ``finished``; an error that escapes the body before then ends
    it as failed with ``CODE: message`` (a ``HubError``) or ``INTERNAL_ERROR: Type: message``."""

    __slots__ = ("log", "op")

    def __init__(self, log: OperationLog, op: OperationModel) -> None:
        self.log = log
        self.op = op
        log.active.add(op.id)

    async def __aenter__(self) -> OperationModel:
        return self.op

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None or self.op.id not in self.log.active:
            return
        # Whatever escaped (a database outage, a bug) still ends the operation, or at least lets it be
        # recovered (``recover_own``) once the database is back.
        error = (f"{exc.code}: {exc.message}" if isinstance(exc, HubError)
                 else f"INTERNAL_ERROR: {type(exc).__name__}: {exc}")
        try:
            await self.log.finish(self.op, error[:2000])
        except Exception:
            log.warning("could not record the end of operation %s; it will be recovered", self.op.id)


def progress_of(done: int, total: int, unit: str, step: str) -> dict[str, Any]:
    """A long operation's ``details.progress`` (docs/API.md): ``done`` of ``total`` ``unit`` (``bytes``,
    ``replicas`` or ``services``), and the step it is at, in words."""
    return {"done": done, "total": total, "unit": unit, "step": step}


def operations_query(
    service_id: str | None = None,
    controller_id: str | None = None,
    status: str | None = None,
    operation: str | None = None,
) -> Select[OperationModel]:
    query = select(OperationModel).order_by(OperationModel.created_at.desc(), OperationModel.id)
    if service_id:
        query = query.where(OperationModel.service_id == service_id)
    if controller_id:
        query = query.where(OperationModel.controller_id == controller_id)
    if status:
        query = query.where(OperationModel.status == status)
    if operation:
        query = query.where(OperationModel.operation == operation)
    return query
