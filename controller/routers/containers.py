"""``/containers``: the lifecycle goes through ContainerService; reads go straight to the runtime
(with the prober's health and the latest stats sample added)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from controller.deps import ContainersDep, ProberDep, RuntimeDep, StatsDep
from controller.schemas import (
    ContainerCreateRequest,
    ContainerLogs,
    ContainerStats,
    CopyResult,
    DirectoryCopy,
    FileCopy,
)
from mmanager.streams import ClosingStreamingResponse
from mmanager.wire import ActionResult, ContainerCreated, ContainerInfo, ContainerList

router = APIRouter(prefix="/containers", tags=["containers"])

Epoch = Annotated[int | None, Query(ge=0, description="refused with 409 when older than the service's current epoch")]
Timeout = Annotated[int, Query(ge=0, le=3600, description="seconds to wait before killing")]


@router.post("", response_model=ContainerCreated, status_code=201)
async def create(body: ContainerCreateRequest, containers: ContainersDep, response: Response) -> ContainerCreated:
    created = await containers.create(body)
    if not created.created:
        response.status_code = 200
    return created


@router.get("", response_model=ContainerList)
async def list_containers(runtime: RuntimeDep, prober: ProberDep, stats: StatsDep, all: bool = False) -> ContainerList:
    listed = await runtime.list_containers(all=all)
    return ContainerList(containers=[stats.decorate(prober.decorate(info)) for info in listed])


@router.get("/{container_id}", response_model=ContainerInfo)
async def inspect(container_id: str, runtime: RuntimeDep, prober: ProberDep, stats: StatsDep) -> ContainerInfo:
    return stats.decorate(prober.decorate(await runtime.get_container(container_id)))


@router.post("/{container_id}/start", response_model=ActionResult)
async def start(container_id: str, containers: ContainersDep, prober: ProberDep, epoch: Epoch = None) -> ActionResult:
    result = await containers.start(container_id, epoch)
    prober.started(result.container_id)
    return result


@router.post("/{container_id}/stop", response_model=ActionResult)
async def stop(
    container_id: str, containers: ContainersDep, timeout: Timeout = 10, epoch: Epoch = None
) -> ActionResult:
    return await containers.stop(container_id, timeout, epoch)


@router.post("/{container_id}/restart", response_model=ActionResult)
async def restart(
    container_id: str, containers: ContainersDep, prober: ProberDep, timeout: Timeout = 10, epoch: Epoch = None
) -> ActionResult:
    result = await containers.restart(container_id, timeout, epoch)
    prober.started(result.container_id)
    return result


@router.delete("/{container_id}", response_model=ActionResult)
async def remove(container_id: str, containers: ContainersDep, force: bool = True, epoch: Epoch = None) -> ActionResult:
    return await containers.remove(container_id, force, epoch)


@router.get("/{container_id}/stats", response_model=ContainerStats)
async def stats(container_id: str, runtime: RuntimeDep) -> ContainerStats:
    return await runtime.stats(container_id)


@router.get("/{container_id}/logs", response_model=ContainerLogs)
async def logs(
    container_id: str,
    runtime: RuntimeDep,
    lines: Annotated[int, Query(ge=0, le=100_000)] = 100,
    follow: bool = False,
) -> ContainerLogs | ClosingStreamingResponse:
    if follow:
        # Closing: the stream's Docker connection, thread and slot are given back however the response ends.
        stream = await runtime.follow_logs(container_id, lines)
        return ClosingStreamingResponse(stream, media_type="text/plain; charset=utf-8")
    text = await runtime.logs(container_id, lines)
    return ContainerLogs(container_id=container_id, logs=text, lines=len(text.splitlines()))


@router.post("/{container_id}/files", response_model=CopyResult)
async def copy_file(container_id: str, body: FileCopy, containers: ContainersDep) -> CopyResult:
    return await containers.copy_file(container_id, body)


@router.post("/{container_id}/directories", response_model=CopyResult)
async def copy_directory(container_id: str, body: DirectoryCopy, containers: ContainersDep) -> CopyResult:
    return await containers.copy_directory(container_id, body)
