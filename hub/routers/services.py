"""The services API (docs/API.md, Services), at the seed's paths."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from hub.deps import AdminUser, CurrentUser, Hub, HubDep, SessionDep, admit, admit_remembered
from hub.errors import HubError, NotFound
from hub.models import ContainerRegistryModel, DeploymentHistoryModel, OperationModel, ServiceModel, UserModel, utcnow
from hub.routers.hot import HotRoute, send_json
from hub.routers.paging import Limit, Offset
from hub.schemas import (
    DeploymentOut,
    MigrateRequest,
    OperationOut,
    RollbackRequest,
    ServiceCreate,
    ServiceMetricsOut,
    ServiceOut,
    ServicePatch,
)
from hub.services.monitoring import service_history as metrics_history
from hub.services.traffic import service_traffic
from mmanager.streams import ClosingStreamingResponse

router = APIRouter(prefix="/api", tags=["services"])

Wait = Query(True, description="wait for the operation to finish; false answers 202 with the operation")
Watch = Query(False, description="with wait=false: the caller follows the operation to its end, so the create "
                                 "runs as one that waits would (a failure removes the service; a probe's verdict "
                                 "ends it), only the answer does not wait")


async def _answer(hub: HubDep, result: ServiceModel | OperationModel, created: bool = False) -> Any:
    if isinstance(result, OperationModel):
        return JSONResponse(OperationOut.model_validate(result, from_attributes=True).model_dump(mode="json"),
                            status_code=202)
    body = (await hub.services.out(result)).model_dump(mode="json")
    return JSONResponse(body, status_code=201 if created else 200)


@router.post("/{username}/{repo}/services", status_code=201, response_model=ServiceOut)
async def create_service(username: str, repo: str, spec: ServiceCreate, user: CurrentUser, hub: HubDep,
                         wait: bool = Wait, watch: bool = Watch) -> Any:
    return await _answer(hub, await hub.services.create(user, username, repo, spec, wait=wait, watch=watch),
                         created=True)


@router.get("/services", response_model=list[ServiceOut])
async def list_services(user: CurrentUser, hub: HubDep, session: SessionDep,
                        limit: int = Limit, offset: int = Offset,
                        name: str | None = Query(None, max_length=63, description="only the services of this name"),
                        owner: str | None = Query(None, max_length=64, description="only this user's services"),
                        order: Literal["oldest", "newest"] = Query("oldest", description="by creation time")
                        ) -> list[ServiceOut]:
    ordering = (ServiceModel.created_at, ServiceModel.id) if order == "oldest" else (
        ServiceModel.created_at.desc(), ServiceModel.id.desc())
    query = select(ServiceModel).order_by(*ordering).limit(limit).offset(offset)
    if not user.is_admin:
        query = query.where(ServiceModel.owner_id == user.id)
    if name is not None:
        query = query.where(ServiceModel.name == name)
    if owner is not None:
        query = query.where(ServiceModel.owner_id == select(UserModel.id).where(UserModel.username == owner)
                            .scalar_subquery())
    return [await hub.services.out(s) for s in await session.scalars(query)]


async def read_service(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /api/services/{service_id}``, the status read every client polls (a ``HotRoute``, bound to
    ``hub``): one statement shared with the reads made at the same time, the answer rendered again only when
    the service changed (``ServiceManager.read_json``)."""
    user = admit_remembered(hub, scope)
    if user is None:
        user = await admit(hub, scope)
    service_id = scope["path_params"]["service_id"]
    try:
        body = await hub.services.read_json(user, service_id)
    except HubError:
        raise
    except Exception:
        # A connection the database dropped (a restart) fails the first statement sent on it, and the pool
        # then replaces its connections (hub.db_direct): read once more, so that a poll does not see the restart.
        body = await hub.services.read_json(user, service_id)
    await send_json(send, body)


# The status read's declaration, for the OpenAPI document (no docstring: it would become the operation's
# description). Never called: a HotRoute hands every call it takes to ``read_service``.
async def get_service(service_id: str) -> None:
    raise NotImplementedError("HotRoute answers through read_service")


def status_read(hub: Hub) -> HotRoute:
    """The status read's route, answered for ``hub`` (the application's, ``app.state.hub``: bound once rather
    than looked up through ``State`` on every call)."""
    return HotRoute("/api/services/{service_id}", get_service, partial(read_service, hub), methods=["GET"],
                    response_model=ServiceOut, tags=["services"], name="get_service")


@router.patch("/services/{service_id}", response_model=ServiceOut)
async def update_service(service_id: str, patch: ServicePatch, user: CurrentUser, hub: HubDep,
                         wait: bool = Wait) -> Any:
    return await _answer(hub, await hub.services.update(user, service_id, patch, wait=wait))


@router.post("/services/{service_id}/start", response_model=ServiceOut)
async def start_service(service_id: str, user: CurrentUser, hub: HubDep, wait: bool = Wait) -> Any:
    return await _answer(hub, await hub.services.lifecycle(user, service_id, "start", wait=wait))


@router.post("/services/{service_id}/stop", response_model=ServiceOut)
async def stop_service(service_id: str, user: CurrentUser, hub: HubDep, wait: bool = Wait) -> Any:
    return await _answer(hub, await hub.services.lifecycle(user, service_id, "stop", wait=wait))


@router.post("/services/{service_id}/restart", response_model=ServiceOut)
async def restart_service(service_id: str, user: CurrentUser, hub: HubDep, wait: bool = Wait) -> Any:
    return await _answer(hub, await hub.services.lifecycle(user, service_id, "restart", wait=wait))


@router.get("/services/{service_id}/status", response_model=ServiceOut)
async def service_status(service_id: str, user: CurrentUser, hub: HubDep) -> ServiceOut:
    return await hub.services.out(await hub.services.refresh(user, service_id))


@router.get("/services/{service_id}/logs", response_class=PlainTextResponse)
async def service_logs(service_id: str, user: CurrentUser, hub: HubDep,
                       tail: int = Query(100, ge=0, le=100_000), follow: bool = False,
                       replica: str | None = Query(None, max_length=128,
                                                   description="a replica's id (its container); default the primary")
                       ) -> Response:
    result = await hub.services.logs(user, service_id, tail, follow, replica)
    if isinstance(result, str):
        return PlainTextResponse(result)
    # Closing: the caller's stream slot and the controller connection are given back however it ends.
    return ClosingStreamingResponse(result, media_type="text/plain; charset=utf-8")


@router.delete("/services/{service_id}", status_code=204)
async def delete_service(service_id: str, user: CurrentUser, hub: HubDep) -> Response:
    await hub.services.delete(user, service_id)
    return Response(status_code=204)


@router.get("/services/{service_id}/history", response_model=list[DeploymentOut])
async def service_history(service_id: str, user: CurrentUser, hub: HubDep, session: SessionDep) -> list[DeploymentOut]:
    service = await hub.services.get_for(session, user, service_id)
    rows = await session.scalars(
        select(DeploymentHistoryModel)
        .where(DeploymentHistoryModel.service_id == service.id)
        .order_by(DeploymentHistoryModel.version)
    )
    return [
        DeploymentOut(version=r.version, spec=r.spec, image=r.image, reason=r.reason, actor=r.actor,
                      created_at=r.created_at, current=r.version == service.version)
        for r in rows
    ]


@router.get("/services/{service_id}/metrics", response_model=ServiceMetricsOut)
async def service_metrics(
    service_id: str, user: CurrentUser, hub: HubDep, session: SessionDep,
    since: datetime | None = Query(None, description="from this time on (ISO 8601; UTC when no zone); "
                                                     "default: an hour ago"),
    resolution: int = Query(60, ge=1, le=86400, description="seconds per point; rounded up to a multiple "
                                                             "of MMANAGER_METRICS_RESOLUTION"),
) -> ServiceMetricsOut:
    """The service's downsampled history for trends (CPU, memory, network and block I/O, GPU, and the
    requests, 5xx and latency quantiles the gateways counted per point), and its traffic through the
    gateways since each started (requests, responses by status class, latency quantiles), per replica."""
    service = await hub.services.get_for(session, user, service_id)
    traffic = await service_traffic(hub.db, service.owner.username, service.name)
    stored = hub.settings.metrics_resolution
    step = int(math.ceil(max(resolution, stored) / stored) * stored)
    if since is None:
        since = utcnow() - timedelta(hours=1)
    elif since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    points = await metrics_history(session, service.id, since, step)
    # The points are the service's plain dicts: validated into MetricPoints here.
    return ServiceMetricsOut.model_validate({"service_id": service.id, "since": since, "resolution": step,
                                             "points": points, "traffic": traffic})


@router.post("/services/{service_id}/rollback", response_model=ServiceOut)
async def rollback_service(service_id: str, body: RollbackRequest, user: CurrentUser, hub: HubDep,
                           wait: bool = Wait) -> Any:
    return await _answer(hub, await hub.services.redeploy(user, service_id, "rollback", rollback_to=body.version, wait=wait))


@router.post("/services/{service_id}/migrate", response_model=ServiceOut)
async def migrate_service(service_id: str, admin: AdminUser, hub: HubDep, body: MigrateRequest | None = None,
                          wait: bool = Wait) -> Any:
    """Move one replica (``replica``, an id from the status's ``replicas``; default the primary copy) to
    ``target_controller`` or wherever the scheduler places it, as ``POST /api/admin/containers/{id}/migrate``."""
    body = body or MigrateRequest()
    replacing: str | None = None
    if body.replica is not None:
        async with hub.db.session() as session:
            await hub.services.get_for(session, admin, service_id)
            replacing = await session.scalar(
                select(ContainerRegistryModel.id).where(
                    ContainerRegistryModel.service_id == service_id,
                    (ContainerRegistryModel.container_id == body.replica) | (ContainerRegistryModel.id == body.replica)))
        if replacing is None:
            raise NotFound(f"service {service_id!r} has no replica {body.replica!r}", code="REPLICA_NOT_FOUND")
    return await _answer(hub, await hub.services.redeploy(
        admin, service_id, "migrate", exclude_current=body.target_controller is None, target=body.target_controller,
        replacing=replacing, leave_volumes=body.leave_volumes, wait=wait))
