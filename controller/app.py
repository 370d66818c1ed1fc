"""Build the controller's FastAPI app, and serve it.

``create_app(settings, runtime=None)`` wires settings, the Docker runtime,
the container service, the health prober, the heartbeat agent (with
MMANAGER_HUB_URL) and the metrics into ``app.state`` at build time, so the
app also answers where no lifespan runs; the lifespan seeds the epoch memory,
then starts the prober and the heartbeats, stops them on the way out and
closes what the app opened. Without a lifespan nothing is probed and no
heartbeat goes out, so with a hub URL new work stays refused (controller.sync).
``run(settings, host, port)`` serves it the way ``mmanager controller serve``
should: logging set up from LOG_LEVEL and LOG_FILE first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from controller.audit import AuditTrail
from controller.config import ControllerSettings
from controller.containers import ContainerService
from controller.deps import require_api_key
from controller.errors import DockerUnavailable
from controller.gpu import detect_gpus
from controller.gpu_monitor import GpuMonitor
from controller.health import ControllerMetrics
from controller.heartbeat import HeartbeatAgent
from controller.jobs import JobRunner
from controller.model_cache import ModelCache
from controller.probes import Prober
from controller.routers import audit as audit_routes
from controller.routers import containers as container_routes
from controller.routers import images as image_routes
from controller.routers import jobs as job_routes
from controller.routers import models as model_routes
from controller.routers import system as system_routes
from controller.runtime import DockerRuntime, Runtime
from controller.stats import StatsSampler
from controller.sync import SyncGuard
from controller.vram import VramWatch
from mmanager import __version__
from mmanager.audit import AuditMiddleware
from mmanager.errors import install_error_handlers
from mmanager.limits import BodyLimit
from mmanager.logs import install_request_ids, setup_logging
from mmanager.serving import serve

log = logging.getLogger(__name__)

_HTTP_CODES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def create_app(
    settings: ControllerSettings,
    runtime: Runtime | None = None,
    *,
    hub_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The controller app.

    Pass ``runtime`` to drive something other than the local Docker, and
    ``hub_transport`` to carry heartbeats (and model-file downloads) some other way than the network
    (an in-process hub), as tests do.
    """
    owns_runtime = runtime is None
    runtime = runtime or DockerRuntime(settings)
    sync = SyncGuard(required=settings.hub_url is not None)
    models = ModelCache(settings, runtime, transport=hub_transport)
    service = ContainerService(settings, runtime, detect_gpus(settings.gpu_devices), sync, models)
    prober = Prober(settings, runtime, service)
    jobs = JobRunner(settings, service)
    metrics = ControllerMetrics(settings.server_id)
    gpu_monitor = GpuMonitor(settings.stats_interval, metrics)
    sampler = StatsSampler(settings, runtime, metrics, gpus=gpu_monitor)
    audit = AuditTrail(settings.server_id, settings.audit_buffer)
    def restart_if_running(container_id: str, timeout: int) -> Awaitable[Any]:
        return service.heal(container_id, timeout, if_running=True)

    vram_watch = VramWatch(settings.stats_interval, runtime, restart_if_running, gpu_monitor,
                           strikes=settings.gpu_memory_strikes, audit=audit, metrics=metrics)
    heartbeat = (
        HeartbeatAgent(settings, runtime, service, prober, transport=hub_transport, metrics=metrics, audit=audit,
                       sampler=sampler, gpu_monitor=gpu_monitor, jobs=jobs)
        if settings.hub_url
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(models.start)
        try:
            await service.seed_epochs()
        except DockerUnavailable as exc:
            log.warning("Docker is unreachable at start-up (%s); epochs will be read on first use", exc.message)
        jobs.start()
        prober.start()
        sampler.start()
        gpu_monitor.start()
        vram_watch.start()
        if heartbeat is not None:
            heartbeat.start()
        log.info(
            "controller %s (%s) ready: at most %d containers, %d GPU(s), hub %s",
            settings.server_id,
            settings.server_type,
            settings.max_containers,
            len(service.gpus),
            settings.hub_url or "polls only",
        )
        try:
            yield
        finally:
            if heartbeat is not None:
                await heartbeat.stop()
            await sampler.stop()
            await vram_watch.stop()
            await gpu_monitor.stop()
            await prober.stop()
            await jobs.stop()
            await models.aclose()
            if owns_runtime:
                await runtime.close()

    # No slash redirects: StripTrailingSlash makes both spellings reach the same route instead.
    app = FastAPI(title="mManager controller", version=__version__, lifespan=lifespan, redirect_slashes=False)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.containers = service
    app.state.prober = prober
    app.state.jobs = jobs
    app.state.stats = sampler
    app.state.gpu_monitor = gpu_monitor
    app.state.heartbeat = heartbeat
    app.state.metrics = metrics
    app.state.audit = audit
    # Inside StripTrailingSlash (added last, so outermost): the audit sees the routed path and its
    # parameters, and the 413s of the body limit.
    app.add_middleware(BodyLimit, limit_for=lambda _: settings.max_request_bytes)
    app.add_middleware(AuditMiddleware, record=audit.record)
    app.add_middleware(StripTrailingSlash)
    install_request_ids(app)
    install_error_handlers(app, log=log, internal_message="internal error; the controller's log has the details",
                           http_codes=_HTTP_CODES)
    app.include_router(system_routes.router)
    app.include_router(container_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(image_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(model_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(job_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(audit_routes.router, dependencies=[Depends(require_api_key)])
    return app


class StripTrailingSlash:
    """Route ``/containers/`` like ``/containers``.

    GeoML-Hub calls some paths with the slash and some without; a 307 redirect
    would make clients re-send bodies (and some drop them), so the path is
    normalised before routing instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            scope = dict(scope, path=scope["path"].rstrip("/") or "/")
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


def run(settings: ControllerSettings, host: str = "0.0.0.0", port: int | None = None) -> None:
    """Serve a controller until interrupted; logging follows LOG_LEVEL, LOG_FILE and LOG_FORMAT
    (``mmanager.logs``; a LOG_FILE that cannot be opened raises ``LogFileError`` before anything starts)."""
    setup_logging(settings)
    app = create_app(settings)
    # No log_config and no log_level: uvicorn's loggers propagate to the handler just installed.
    serve(app, app.state.jobs.closing, host=host, port=port or settings.port, log_config=None,
          **settings.tls.server_options())
