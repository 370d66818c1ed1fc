"""The gateways' API: the routing table they apply (``GET /api/gateway/routes``), their heartbeat
(``PUT /api/gateways/{id}``), the admins' list of them, and private services' keys
(``/api/services/{id}/keys``).

A gateway authenticates with the hub's ``MMANAGER_API_KEY`` (as controllers do), or an admin token.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from hub.deps import AdminUser, CurrentUser, HubDep, SessionDep, key_or_admin
from hub.models import GatewayModel
from hub.schemas import GatewayOut, GatewayReport, ServiceKeyCreate, ServiceKeyCreated, ServiceKeyOut
from hub.services import service_keys
from hub.services.gateway import routing_table

router = APIRouter(prefix="/api", tags=["gateway"])

GATEWAY_ACTOR = "gateway"


async def gateway_caller(request: Request, hub: HubDep) -> str:
    """Who asks: ``gateway`` for the hub's API key, else an admin user's name."""
    return await key_or_admin(request, hub, hub.settings.api_key, GATEWAY_ACTOR,
                              "this needs the hub's API key or an admin token")


GatewayCaller = Annotated[str, Depends(gateway_caller)]


@router.get("/gateway/routes")
async def routes(request: Request, _: GatewayCaller, hub: HubDep) -> Any:
    """The routing table the gateways apply, with its version; ``If-None-Match: "<version>"`` answers 304
    while it is unchanged."""
    current = await hub.gateway.current()
    body: dict[str, Any]
    if current is None:
        # Nothing published yet (a leader is about to): an empty table that any later version replaces.
        version, body = 0, routing_table([], [], [], hub.settings.service_domain)
    else:
        version, body = current
    etag = f'"{version}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse({"version": version, **body}, headers={"ETag": etag})


@router.put("/gateways/{gateway_id}", status_code=204)
async def report(gateway_id: Annotated[str, Path(max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")], report: GatewayReport, _: GatewayCaller, hub: HubDep) -> Response:
    """A gateway's heartbeat: its advertised URL and the routing version it has applied."""
    await hub.gateway.report(gateway_id, report.url, report.version, report.metrics_url, report.traffic)
    return Response(status_code=204)


@router.post("/gateway/wake/{service_id}")
async def wake(service_id: str, caller: GatewayCaller, hub: HubDep) -> Response:
    """A request waits at a gateway for a service with no copy to serve it. An ``idle`` service is started
    (202, in the background; the gateway holds the request up to its own bound); one whose new copy is on
    its way (a failover) answers 202 with ``hold``, the seconds worth waiting for it; anything else 200:
    the gateway answers 503 at once (stopped by its owner, or no copy in sight)."""
    woken = await hub.services.wake(service_id, caller)
    if woken.operation is not None:
        return JSONResponse({"waking": True, "operation_id": woken.operation.id}, status_code=202)
    if woken.replacing:
        return JSONResponse({"waking": False, "replacing": True, "hold": hub.settings.gateway_replace_hold},
                            status_code=202)
    return JSONResponse({"waking": False}, status_code=200)


@router.get("/admin/gateways", response_model=list[GatewayOut], tags=["admin"])
async def list_gateways(_: AdminUser, session: SessionDep) -> list[GatewayModel]:
    return list(await session.scalars(select(GatewayModel).order_by(GatewayModel.created_at, GatewayModel.id)))


@router.post("/services/{service_id}/keys", status_code=201, response_model=ServiceKeyCreated, tags=["services"])
async def create_key(service_id: str, user: CurrentUser, session: SessionDep,
                     body: ServiceKeyCreate | None = None) -> dict[str, Any]:
    """A key for the service's gateway route (needed while it is ``private``): shown once."""
    row, key = await service_keys.create_key(session, user, service_id, body.name if body else None)
    return {**ServiceKeyOut.model_validate(row, from_attributes=True).model_dump(), "key": key}


@router.get("/services/{service_id}/keys", response_model=list[ServiceKeyOut], tags=["services"])
async def list_keys(service_id: str, user: CurrentUser, session: SessionDep) -> Any:
    return await service_keys.list_keys(session, user, service_id)


@router.delete("/services/{service_id}/keys/{key_id}", status_code=204, tags=["services"])
async def delete_key(service_id: str, key_id: str, user: CurrentUser, session: SessionDep) -> Response:
    await service_keys.delete_key(session, user, service_id, key_id)
    return Response(status_code=204)
