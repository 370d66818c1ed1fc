"""``GET /api/admin/audit``: the audit log, for admins (hub.services.audit), and its query parameters
(``AuditParams``), which ``GET /api/audit`` (hub.routers.mine) takes too."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from sqlalchemy import Select

from hub.deps import AdminUser, SessionDep
from hub.routers.paging import Limit, Offset
from hub.schemas import AuditOut
from hub.services.audit import audit_query

router = APIRouter(prefix="/api/admin", tags=["admin"])


@dataclass
class AuditParams:
    """The audit log's filters and paging, as query parameters: one declaration for the admin route and the
    user's (``GET /api/audit``), so the two take the same parameters."""

    actor: str | None = Query(None, max_length=160, description="a username, controller:<id> or anonymous")
    result: Literal["ok", "refused", "error"] | None = None
    source: str | None = Query(None, max_length=160, description="hub or controller:<id>")
    method: str | None = Query(None, max_length=8)
    since: datetime | None = Query(None, description="events at or after this time (ISO 8601)")
    target: str | None = Query(None, max_length=160, description="a service, controller or container id")
    limit: int = Limit
    offset: int = Offset

    def query(self) -> Select[Any]:
        """The filtered entries, newest first, before paging (``page``)."""
        return audit_query(actor=self.actor, result=self.result, source=self.source, method=self.method,
                           since=self.since, target=self.target)

    def page(self, query: Select[Any]) -> Select[Any]:
        return query.limit(self.limit).offset(self.offset)


AuditParamsDep = Annotated[AuditParams, Depends()]


@router.get("/audit", response_model=list[AuditOut])
async def list_audit(_: AdminUser, session: SessionDep, params: AuditParamsDep) -> Any:
    return [AuditOut.model_validate(row, from_attributes=True)
            for row in await session.scalars(params.page(params.query()))]
