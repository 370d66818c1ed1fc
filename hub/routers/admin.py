"""The admin API (docs/API.md, Admin): controllers, the container registry,
operations, resource usage and usage alerts (users: ``hub.routers.users``)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, update

from hub.deps import AdminUser, HubDep, SessionDep
from hub.errors import HubError, NotFound
from hub.models import ContainerRegistryModel, ControllerModel, OperationModel, ServiceModel, utcnow
from hub.routers.paging import Limit, Offset
from hub.scheduler.snapshot import load_views
from hub.schemas import (
    AlertOut,
    ControllerIn,
    ControllerKeyCreated,
    ControllerKeyOut,
    ControllerOut,
    ControllerPatch,
    MigrateRequest,
    OperationOut,
    RegistryOut,
    ServiceOut,
)
from hub.services.controller_keys import create_key, list_keys, revoke_key
from hub.services.controllers import controller_out, effective_max_containers, get_controller, holdings
from hub.services.monitoring import alert_out, alerts_query
from hub.services.operations import operations_query
from mmanager.audit import describe_call

router = APIRouter(prefix="/api/admin", tags=["admin"])



@router.get("/controllers", response_model=list[ControllerOut])
async def list_controllers(_: AdminUser, session: SessionDep, limit: int = Limit, offset: int = Offset) -> Any:
    rows = await session.scalars(select(ControllerModel).order_by(ControllerModel.id).limit(limit).offset(offset))
    return [controller_out(c) for c in rows]


@router.post("/controllers", status_code=201, response_model=ControllerOut)
async def register_controller(body: ControllerIn, _: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    row = await hub.controllers.register(session, body)
    await hub.controllers.poll_one(session, row)
    return controller_out(row)


async def _live_health(hub: HubDep, controller: ControllerModel) -> dict[str, Any]:
    health, error = await hub.controllers.check(controller)
    return {
        "id": controller.id,
        "url": controller.url,
        "status": "healthy" if health is not None and health.status == "healthy" else "unhealthy",
        "error": error,
        "health": health.model_dump(mode="json") if health else None,
    }


@router.get("/controllers/health")
async def controllers_health(_: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    controllers = list(await session.scalars(select(ControllerModel).order_by(ControllerModel.id)))
    return list(await asyncio.gather(*(_live_health(hub, c) for c in controllers)))


@router.get("/controllers/{controller_id}", response_model=ControllerOut)
async def get_controller_route(controller_id: str, _: AdminUser, session: SessionDep) -> Any:
    return controller_out(await get_controller(session, controller_id))


@router.get("/controllers/{controller_id}/health")
async def controller_health(controller_id: str, _: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    return await _live_health(hub, await get_controller(session, controller_id))


async def _set_enabled(hub: HubDep, admin: AdminUser, controller_id: str, enabled: bool) -> ControllerOut:
    operation = "enable" if enabled else "disable"
    async with hub.db.session() as session:
        await get_controller(session, controller_id)
    op = await hub.ops.begin(operation, admin.username, controller_id=controller_id)
    async with hub.ops.running(op):
        async with hub.db.session() as session:
            controller = await get_controller(session, controller_id)
            controller.enabled = enabled
            if enabled and controller.draining:
                controller.draining = False
                # Enabling cancels a drain in progress; what already moved stays where it went.
                await session.execute(
                    update(OperationModel)
                    .where(OperationModel.operation == "drain", OperationModel.controller_id == controller_id,
                           OperationModel.status == "running")
                    .values(status="failed", error="cancelled: the controller was enabled again",
                            finished_at=utcnow())
                )
        hub.services.placement.stale()
        await hub.ops.finish(op)
    return controller_out(controller)


@router.post("/controllers/{controller_id}/enable", response_model=ControllerOut)
async def enable_controller(controller_id: str, admin: AdminUser, hub: HubDep) -> Any:
    return await _set_enabled(hub, admin, controller_id, True)


@router.post("/controllers/{controller_id}/disable", response_model=ControllerOut)
async def disable_controller(controller_id: str, admin: AdminUser, hub: HubDep) -> Any:
    return await _set_enabled(hub, admin, controller_id, False)


@router.post("/controllers/{controller_id}/drain", response_model=ControllerOut)
async def drain_controller(controller_id: str, admin: AdminUser, hub: HubDep, wait: bool = True) -> Any:
    result = await hub.controllers.drain(admin, controller_id, wait=wait)
    if isinstance(result, ControllerModel):
        return controller_out(result)
    return JSONResponse(OperationOut.model_validate(result, from_attributes=True).model_dump(mode="json"),
                        status_code=202)


# ---- controllers at run time: change, delete (issue 28) ---------------------------------------------------


@router.patch("/controllers/{controller_id}", response_model=ControllerOut)
async def update_controller(controller_id: str, body: ControllerPatch, request: Request, _: AdminUser,
                            hub: HubDep, session: SessionDep) -> Any:
    """Change priority, weight, the containers cap, server type or URL; the next placement uses them."""
    row, changes = await hub.controllers.update(session, controller_id, body)
    describe_call(request, changes=changes)
    # Committed before anything is asked of the controller: its row's lock is not held across a network call.
    await session.commit()
    if changes:
        hub.services.placement.stale()
    if "url" in changes:
        # Asked at its new address at once, as a registration is: placeable again as soon as it answers there.
        async with hub.db.session() as polled:
            row = await get_controller(polled, controller_id)
            await hub.controllers.poll_one(polled, row)
    return controller_out(row)


@router.delete("/controllers/{controller_id}", status_code=204)
async def delete_controller(controller_id: str, request: Request, admin: AdminUser, hub: HubDep,
                            drain: bool = False) -> Response:
    """Delete a controller that holds nothing (409 ``CONTROLLER_HAS_SERVICES`` lists what it holds);
    ``drain=true`` drains it first (waiting up to MMANAGER_DRAIN_TIMEOUT)."""
    async with hub.db.session() as session:
        row = await get_controller(session, controller_id)
        before = controller_out(row).model_dump(mode="json", include={"url", "server_type", "priority", "weight"})
        held = await holdings(session, controller_id)
    if held and drain:
        result = await hub.controllers.drain(admin, controller_id, wait=True)
        if not isinstance(result, ControllerModel):
            async with hub.db.session() as session:
                held = await holdings(session, controller_id)
            raise HubError(f"controller {controller_id!r} is still draining (operation {result.id}); DELETE it "
                           f"again once the drain has finished", {"operation": result.id, **held},
                           code="CONTROLLER_DRAINING", status_code=409)
    describe_call(request, controller=before, drained=bool(held and drain))
    async with hub.db.session() as session:
        await hub.controllers.delete(session, controller_id)
    hub.controllers.forget(controller_id)
    hub.ingest.keys.forget()
    await hub.ingest.count_controllers()
    return Response(status_code=204)


@router.get("/controllers/{controller_id}/keys", response_model=list[ControllerKeyOut])
async def list_controller_keys(controller_id: str, _: AdminUser, session: SessionDep) -> Any:
    return [ControllerKeyOut.model_validate(k, from_attributes=True) for k in await list_keys(session, controller_id)]


@router.post("/controllers/{controller_id}/keys", status_code=201, response_model=ControllerKeyCreated)
async def create_controller_key(controller_id: str, admin: AdminUser, session: SessionDep, hub: HubDep) -> Any:
    row, key = await create_key(session, controller_id, created_by=admin.username)
    await session.commit()
    # From now on the shared key no longer speaks for this controller, on this replica at once.
    hub.ingest.keys.forget()
    return ControllerKeyCreated(id=row.id, controller_id=controller_id, prefix=row.prefix, key=key,
                                created_at=row.created_at)


@router.delete("/controllers/{controller_id}/keys/{key_id}", status_code=204)
async def revoke_controller_key(controller_id: str, key_id: str, _: AdminUser, session: SessionDep,
                                hub: HubDep) -> Response:
    # Committed before the answer goes out: once the 204 arrives, this replica refuses the key, and every
    # other replica within MMANAGER_AUTH_CACHE_SECONDS (hub.services.controller_keys).
    await revoke_key(session, controller_id, key_id)
    await session.commit()
    hub.ingest.keys.forget()
    return Response(status_code=204)


@router.get("/containers", response_model=list[RegistryOut])
async def list_containers(_: AdminUser, session: SessionDep, limit: int = Limit, offset: int = Offset,
                          controller_id: str | None = None, service_id: str | None = None) -> Any:
    query = select(ContainerRegistryModel).order_by(ContainerRegistryModel.created_at, ContainerRegistryModel.id)
    if controller_id:
        query = query.where(ContainerRegistryModel.controller_id == controller_id)
    if service_id:
        query = query.where(ContainerRegistryModel.service_id == service_id)
    rows = await session.scalars(query.limit(limit).offset(offset))
    return [RegistryOut.model_validate(r, from_attributes=True) for r in rows]


@router.post("/containers/{entry_id}/migrate", response_model=ServiceOut)
async def migrate_container(entry_id: str, admin: AdminUser, hub: HubDep, body: MigrateRequest | None = None,
                            wait: bool = True) -> Any:
    async with hub.db.session() as session:
        entry = await session.get(ContainerRegistryModel, entry_id)
        if entry is None:
            raise NotFound(f"registry entry {entry_id!r} not found", code="CONTAINER_NOT_FOUND")
    target = body.target_controller if body else None
    result = await hub.services.redeploy(
        admin, entry.service_id, "migrate", exclude_current=target is None, target=target, replacing=entry.id,
        leave_volumes=body.leave_volumes if body else False, wait=wait)
    if isinstance(result, ServiceModel):
        return await hub.services.out(result)
    return JSONResponse(OperationOut.model_validate(result, from_attributes=True).model_dump(mode="json"),
                        status_code=202)


@router.get("/containers/{entry_id}/migrate", include_in_schema=False)
async def migrate_with_get(entry_id: str, _: AdminUser) -> Any:
    raise HubError(
        "migrate changes state, so it is a POST: POST /api/admin/containers/{id}/migrate",
        code="METHOD_NOT_ALLOWED",
        status_code=405,
    )


@router.get("/operations", response_model=list[OperationOut])
async def list_operations(_: AdminUser, session: SessionDep, service_id: str | None = None,
                          controller_id: str | None = None, status: str | None = None,
                          operation: str | None = None, limit: int = Limit, offset: int = Offset) -> Any:
    query = operations_query(service_id, controller_id, status, operation).limit(limit).offset(offset)
    return [OperationOut.model_validate(r, from_attributes=True) for r in await session.scalars(query)]


@router.get("/resources/usage")
async def resources_usage(_: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    views = {v.id: v for v in (await load_views(hub.db))[0]}
    rows = list(await session.scalars(select(ControllerModel).order_by(ControllerModel.id)))
    per_status = dict(
        (await session.execute(select(ServiceModel.status, func.count()).group_by(ServiceModel.status))).all()
    )
    controllers = []
    for c in rows:
        v = views[c.id]
        controllers.append(
            {
                "id": c.id,
                "server_type": c.server_type,
                "status": controller_out(c).status,
                "containers": v.containers,
                "max_containers": effective_max_containers(c),
                "load_percentage": c.load_percentage,
                "memory_usage_percent": c.memory_usage_percent,
                "cpu_cores": c.cpu_cores,
                "cpu_reserved": v.cpu_reserved,
                "memory_total_bytes": v.memory_total,
                "memory_reserved_bytes": v.memory_reserved,
                "gpus_total": len(v.gpus),
                "gpus_used": len(v.gpus_used),
                # Each GPU's latest NVML sample, from the controller's last healthy report (empty: none).
                "gpu_usage": (c.health_data or {}).get("gpu_usage", []),
            }
        )
    return {
        "controllers": controllers,
        "totals": {
            "controllers": len(rows),
            "healthy": sum(1 for c in rows if c.status == "healthy"),
            "containers": sum(c["containers"] for c in controllers),
            "max_containers": sum(c["max_containers"] for c in controllers),
            "gpus_total": sum(c["gpus_total"] for c in controllers),
            "gpus_used": sum(c["gpus_used"] for c in controllers),
        },
        "services": per_status,
    }


@router.get("/alerts", response_model=list[AlertOut])
async def list_alerts(_: AdminUser, session: SessionDep, active: bool | None = None,
                      kind: Literal["cpu", "memory", "disk"] | None = None, controller_id: str | None = None,
                      limit: int = Limit, offset: int = Offset) -> Any:
    """Usage alerts, newest first; ``active=true`` only the open ones, ``false`` only the resolved."""
    rows = await session.scalars(alerts_query(active, kind, controller_id).limit(limit).offset(offset))
    return [alert_out(a) for a in rows]
