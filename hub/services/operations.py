"""The operation history (``container_operations``).

Every lifecycle call is recorded here: a row is committed as ``running``
before the controller is touched and finished as ``succeeded`` or ``failed``
afterwards, so a crash leaves a visible trace instead of nothing.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.db import Database
from hub.metrics import HubMetrics
from hub.models import OperationModel, new_id, utcnow

log = logging.getLogger(__name__)


class OperationLog:
    def __init__(self, db: Database, metrics: HubMetrics, replica_id: str | None = None) -> None:
        self.db = db
        self.metrics = metrics
        # Recorded on each operation, so one left running by a replica that died can be recovered.
        self.replica_id = replica_id
        # Operations this process is running right now. One of ours that is "running" in the table
        # but not here lost its ending to a database outage: it is recovered like a dead replica's.
        self.active: set[str] = set()

    def add(self, session: AsyncSession, operation: str, actor: str, **fields: Any) -> OperationModel:
        """Begin an operation inside the caller's transaction (it is durable when that commits)."""
        op = OperationModel(id=new_id(), operation=operation, status="running", actor=actor,
                            hub_replica=self.replica_id, **{"details": {}, **fields})
        self.active.add(op.id)
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
        )
        self.active.add(op.id)
        try:
            async with self.db.session() as session:
                session.add(op)
        except BaseException:
            self.active.discard(op.id)
            raise
        return op

    async def recover_own(self) -> int:
        """Fail this replica's operations that are "running" in the table but no longer here: their
        ending was lost to a database outage. Each replica runs this for itself, leader or not."""
        before = utcnow() - timedelta(seconds=1)  # anything begun since is too young to judge
        active = set(self.active)
        async with self.db.session() as session:
            result = await session.execute(
                update(OperationModel)
                .where(
                    OperationModel.hub_replica == self.replica_id,
                    OperationModel.status.in_(("pending", "running")),
                    OperationModel.operation != "drain",  # finished by the reconciler, not by this process
                    OperationModel.created_at < before,
                    OperationModel.id.not_in(active or {""}),
                )
                .values(status="failed", finished_at=utcnow(),
                        error="interrupted: its end could not be recorded (database outage); the reconciler "
                              "finishes its work")
                .execution_options(synchronize_session=False)
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def finish(
        self,
        op: OperationModel,
        error: str | None = None,
        **changes: Any,
    ) -> OperationModel:
        op.status = "failed" if error else "succeeded"
        op.error = error
        op.finished_at = utcnow()
        for key, value in changes.items():
            if key == "details":
                if value:
                    op.details = {**op.details, **value}
            else:
                setattr(op, key, value)
        try:
            async with self.db.session() as session:
                await session.merge(op)
        finally:
            self.active.discard(op.id)
        duration = (op.finished_at - op.created_at).total_seconds()
        self.metrics.operations.labels(op.operation, op.status).inc()
        self.metrics.operation_duration.labels(op.operation).observe(duration)
        log.log(logging.WARNING if error else logging.INFO, "operation %s %s of service %s on %s by %s %s in %.2fs%s",
                op.operation, op.id, op.service_id, op.controller_id, op.actor, op.status, duration,
                f": {error}" if error else "")
        return op


def operations_query(
    service_id: str | None = None,
    controller_id: str | None = None,
    status: str | None = None,
    operation: str | None = None,
) -> Select[tuple[OperationModel]]:
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
