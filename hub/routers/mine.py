"""The user-scoped reads the clients need (docs/API.md, Your account and history): who the caller is, the
operations, audit entries and alerts they may see.

Invariant: a user sees only what concerns their own services (their own calls, for the audit log); an
admin sees everything, as through the admin routes. What a user may not see does not exist for them (404).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from sqlalchemy import ColumnElement, Select, or_, select

from hub.deps import CurrentUser, SessionDep
from hub.errors import NotFound
from hub.models import AlertModel, AuditModel, JobModel, OperationModel, ServiceModel, UserModel
from hub.routers.audit import AuditParamsDep
from hub.routers.paging import Limit, Offset
from hub.schemas import AlertOut, AuditOut, MeOut, OperationOut
from hub.services.monitoring import alert_out, alerts_query
from hub.services.operations import operations_query
from hub.services.users import RESERVED_PREFIX, RESERVED_USERNAMES, SYSTEM_ACTOR

router = APIRouter(prefix="/api", tags=["account"])


def _owned(user: UserModel) -> Select[Any]:
    return select(ServiceModel.id).where(ServiceModel.owner_id == user.id)


def visible_operations(query: Select[Any], user: UserModel) -> Select[Any]:
    """``query`` narrowed to the operations ``user`` may see: those of their services and batch jobs, and their
    own calls on services that are gone (a delete, a create that failed)."""
    if user.is_admin:
        return query
    seen: ColumnElement[bool] = or_(OperationModel.service_id.in_(_owned(user)),
                                    OperationModel.job_id.in_(select(JobModel.id).where(JobModel.owner_id == user.id)))
    if user.username != SYSTEM_ACTOR:
        gone = OperationModel.service_id.not_in(select(ServiceModel.id))
        seen = or_(seen, (OperationModel.actor == user.username) & gone)
    return query.where(seen)


@router.get("/me", response_model=MeOut)
async def me(user: CurrentUser) -> Any:
    return MeOut(username=user.username, admin=user.is_admin)


@router.get("/operations", response_model=list[OperationOut])
async def list_operations(user: CurrentUser, session: SessionDep, service_id: str | None = None,
                          controller_id: str | None = None, status: str | None = None,
                          operation: str | None = None, limit: int = Limit, offset: int = Offset) -> Any:
    """Newest first, as ``GET /api/admin/operations``: a user's own."""
    query = visible_operations(operations_query(service_id, controller_id, status, operation), user)
    return [OperationOut.model_validate(r, from_attributes=True)
            for r in await session.scalars(query.limit(limit).offset(offset))]


@router.get("/operations/{operation_id}", response_model=OperationOut)
async def get_operation(operation_id: str, user: CurrentUser, session: SessionDep) -> Any:
    query = visible_operations(select(OperationModel).where(OperationModel.id == operation_id), user)
    row = await session.scalar(query)
    if row is None:
        raise NotFound(f"operation {operation_id!r} not found", code="OPERATION_NOT_FOUND")
    return OperationOut.model_validate(row, from_attributes=True)


@router.get("/audit", response_model=list[AuditOut])
async def list_audit(user: CurrentUser, session: SessionDep, params: AuditParamsDep) -> Any:
    """As ``GET /api/admin/audit``; a user sees the entries of their own calls."""
    query = params.query()
    if not user.is_admin:
        # A user named as an actor that is no user (one created before such names were refused) is not
        # shown the entries of those callers.
        query = query.where(AuditModel.actor == user.username, AuditModel.actor.not_in(RESERVED_USERNAMES),
                            AuditModel.actor.not_like(RESERVED_PREFIX + "%"))
    return [AuditOut.model_validate(row, from_attributes=True)
            for row in await session.scalars(params.page(query))]


@router.get("/alerts", response_model=list[AlertOut])
async def list_alerts(user: CurrentUser, session: SessionDep, active: bool | None = None,
                      kind: Literal["cpu", "memory", "disk"] | None = None, controller_id: str | None = None,
                      limit: int = Limit, offset: int = Offset) -> Any:
    """As ``GET /api/admin/alerts``; a user sees the alerts of their own services."""
    query = alerts_query(active, kind, controller_id)
    if not user.is_admin:
        query = query.where(AlertModel.service_id.in_(_owned(user)))
    return [alert_out(a) for a in await session.scalars(query.limit(limit).offset(offset))]
