"""``GET /audit`` (the controller's key): the audit events the hub has not acknowledged yet."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from controller.audit import PER_BEAT, AuditTrail
from mmanager.wire import AuditEvent


class AuditQueue(BaseModel):
    source: str
    queued: int
    dropped: int
    events: list[AuditEvent]


router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditQueue)
async def queued_events(request: Request, limit: int = Query(PER_BEAT, ge=1, le=10_000)) -> AuditQueue:
    """What this controller audited and the hub has not acknowledged yet, oldest first."""
    trail: AuditTrail = request.app.state.audit
    return AuditQueue(source=trail.source, queued=len(trail), dropped=trail.dropped, events=trail.batch(limit))
