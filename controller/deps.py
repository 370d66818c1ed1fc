"""Request dependencies: the app's settings, runtime and services, and the key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from controller.config import ControllerSettings
from controller.containers import ContainerService
from controller.credentials import accepts_hub_key
from controller.errors import Unauthorized
from controller.health import ControllerMetrics
from controller.probes import Prober
from controller.runtime import Runtime
from controller.stats import StatsSampler
from mmanager.audit import identify


def get_settings(request: Request) -> ControllerSettings:
    return request.app.state.settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_containers(request: Request) -> ContainerService:
    return request.app.state.containers


def get_metrics(request: Request) -> ControllerMetrics:
    return request.app.state.metrics


def get_prober(request: Request) -> Prober:
    return request.app.state.prober


def get_stats(request: Request) -> StatsSampler:
    return request.app.state.stats


SettingsDep = Annotated[ControllerSettings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ContainersDep = Annotated[ContainerService, Depends(get_containers)]
MetricsDep = Annotated[ControllerMetrics, Depends(get_metrics)]
ProberDep = Annotated[Prober, Depends(get_prober)]
StatsDep = Annotated[StatsSampler, Depends(get_stats)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Constant-time: how much of the key matched must not show in the time taken.
    if scheme.lower() != "bearer" or not accepts_hub_key(settings, token.strip()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <MMANAGER_API_KEY>'")
    # Whoever holds the controller's API key: the hub (or a GeoML-Hub backend).
    identify(request, "hub")
