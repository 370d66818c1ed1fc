"""Unauthenticated: ``/health`` (the hub's polls, load balancers) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from controller.deps import ContainersDep, MetricsDep, RuntimeDep, SettingsDep
from controller.gpu_monitor import with_gpu_usage
from controller.health import collect_health
from mmanager.wire import ControllerHealth

router = APIRouter(tags=["system"])


@router.get("/health", response_model=ControllerHealth)
async def health(
    settings: SettingsDep, runtime: RuntimeDep, containers: ContainersDep, response: Response, request: Request
) -> ControllerHealth:
    result = with_gpu_usage(await collect_health(settings, runtime, containers.gpus),
                            getattr(request.app.state, "gpu_monitor", None))
    if result.status != "healthy":
        response.status_code = 503
    return result


@router.get("/metrics")
async def metrics(
    settings: SettingsDep, runtime: RuntimeDep, containers: ContainersDep, metrics: MetricsDep
) -> Response:
    result = await collect_health(settings, runtime, containers.gpus)
    return Response(metrics.render(result), media_type=metrics.content_type)
