"""``GET /api/admin/audit``: the audit log, for admins (hub.services.audit)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query

from hub.deps import AdminUser, SessionDep
from hub.routers.paging import Limit, Offset
from hub.schemas import AuditOut
from hub.services.audit import audit_query

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/audit", response_model=list[AuditOut])
async def list_audit(
    _: AdminUser,
    session: SessionDep,
    actor: str | None = Query(None, max_length=160, description="a username, controller:<id> or anonymous"),
    result: Literal["ok", "refused", "error"] | None = None,
    source: str | None = Query(None, max_length=160, description="hub or controller:<id>"),
    method: str | None = Query(None, max_length=8),
    since: datetime | None = Query(None, description="events at or after this time (ISO 8601)"),
    target: str | None = Query(None, max_length=160, description="a service, controller or container id"),
    limit: int = Limit,
    offset: int = Offset,
) -> Any:
    query = audit_query(actor=actor, result=result, source=source, method=method, since=since, target=target)
    return [AuditOut.model_validate(row, from_attributes=True) for row in await session.scalars(
        query.limit(limit).offset(offset))]
