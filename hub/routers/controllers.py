"""Controller-facing endpoints: heartbeats, authenticated with the controller's key."""

from __future__ import annotations

from fastapi import APIRouter

from hub.deps import ControllerAuth, ControllerRoute, HubDep
from mmanager.wire import Heartbeat, HeartbeatAnswer

router = APIRouter(prefix="/api/controllers", tags=["controllers"], route_class=ControllerRoute)


@router.post("/{controller_id}/heartbeat", response_model=HeartbeatAnswer)
async def heartbeat(controller_id: ControllerAuth, body: Heartbeat, hub: HubDep) -> HeartbeatAnswer:
    return await hub.ingest.receive(controller_id, body)
