"""The hub application: ``create_app()`` builds it, its lifespan wires the
parts together and runs the background loops."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from hub.background.alertmanager import AlertPusher
from hub.background.controllers_file import ControllersFileWatch
from hub.background.fallback import GpuReturn
from hub.background.flusher import HeartbeatFlusher
from hub.background.gateway import GatewayPublisher, GatewayWatch, IdleWatch
from hub.background.jobs import JobDispatcher, JobWatcher
from hub.background.leader import Supervisor
from hub.background.poller import ControllerPoller
from hub.background.prefetch import Prefetcher
from hub.background.reconciler import Reconciler
from hub.background.traffic_history import TrafficRecorder
from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.deps import Hub
from hub.errors import error_response
from hub.metrics import HubMetrics
from hub.models import new_id
from hub.outage import DATABASE_ERRORS, DatabaseOutage, caused_by, database_failed
from hub.ratelimit import RateLimiter
from hub.routers import (
    admin,
    audit,
    controllers,
    gateway,
    images,
    jobs,
    model_files,
    models,
    prometheus,
    services,
    system,
)
from hub.routers.hot import HotApp
from hub.routers.mine import router as mine_router
from hub.routers.pipelines import router as pipelines_router
from hub.routers.users import router as users_router
from hub.scheduler.snapshot import PlacementCache
from hub.services.alertmanager import Alertmanagers
from hub.services.audit import CLIENT_CLOSED, HEARTBEAT_PATH, PRESENCE_PATH, AuditLog, skip_routine
from hub.services.controllers import ControllerRegistry
from hub.services.gateway import GatewayDirectory, GatewayTable
from hub.services.heartbeats import HeartbeatIngest
from hub.services.jobs.artifacts import LocalArtifactStore
from hub.services.jobs.core import JobService
from hub.services.jobs.queue import Dispatcher
from hub.services.jobs.watch import Watcher
from hub.services.lifecycle import ServiceManager
from hub.services.locality import ImageSets
from hub.services.operations import OperationLog
from hub.services.presence import PresenceWatch
from hub.services.users import UserAuth
from hub.ui import PATH as CONSOLE_PATH
from hub.ui import console
from mmanager import __version__
from mmanager.audit import AuditMiddleware, Coalescer
from mmanager.errors import install_error_handlers
from mmanager.limits import BodyLimit
from mmanager.logs import install_request_ids

log = logging.getLogger(__name__)

# A presence stream's body is read and dropped as it comes (hub.services.presence), and it lasts as long as its
# controller runs: no limit that a long-lived controller's keepalives could reach.
PRESENCE_BYTES = 2**62


def build_hub(settings: HubSettings, db: Database | None = None,
              transport: httpx.AsyncBaseTransport | None = None) -> Hub:
    db = db or Database(settings.database_url)
    replica_id = new_id()
    metrics = HubMetrics()
    client = ControllerClient(settings, transport=transport, metrics=metrics)
    ops = OperationLog(db, metrics, replica_id)
    images = ImageSets()
    placement = PlacementCache(db, avoid_for=settings.heartbeat_grace, images=images)
    images.on_change = placement.images_changed
    controllers = ControllerRegistry(db, client, settings, metrics, ops, placement)
    gateway = GatewayTable(db, settings)
    gateways = GatewayDirectory(gateway, settings.gateway_url)
    outage = DatabaseOutage(db)
    manager = ServiceManager(db, client, ops, settings, metrics, placement, gateways, outage=outage)
    ingest = HeartbeatIngest(heartbeat_database(db), settings, metrics, images, outage=outage)
    poller = ControllerPoller(db, settings, client, ingest)
    limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None
    users = UserAuth(db, settings.auth_cache_seconds)
    presence = PresenceWatch(db, client, ingest, metrics)
    store = LocalArtifactStore(settings.artifact_store)
    job_service = JobService(db, settings, ops, store)
    return Hub(settings, db, client, metrics, ops, controllers, manager, ingest, poller, replica_id, users,
               gateway, gateways, presence, outage, limiter=limiter, jobs=job_service,
               dispatcher=Dispatcher(db, client, ops, placement, replica_id),
               watcher=Watcher(db, client, ops, store, wait=settings.job_watch_wait,
                               # A start is tried at most three times, each within the create timeout.
                               missing_grace=3 * settings.controller_create_timeout + 10,
                               artifact_max_bytes=settings.artifact_max_bytes,
                               artifacts_per_user_bytes=settings.artifacts_per_user_bytes, outage=outage))


# The heartbeats' own connections (their batches' reads, the flush, the keys' snapshot, the monitor): at most
# this many, plus as many again in a burst.
HEARTBEAT_POOL = 4


def heartbeat_database(db: Database) -> Database:
    """A pool of the heartbeats' own on PostgreSQL (a bulkhead): a mass failover's moves can hold every
    connection of the main pool at once, and a beat that waited behind them for a connection (its key's
    snapshot reloaded, its batch read, its controller's row written) came late enough to get a live
    controller declared lost. SQLite (``mmanager dev``) has one writer anyway: the same database."""
    if db.is_sqlite:
        return db
    return Database(db.url, pool_size=HEARTBEAT_POOL, max_overflow=HEARTBEAT_POOL)


def _dump_tasks_on_sigusr1() -> None:
    """``kill -USR1 <hub pid>`` logs what every asyncio task is waiting on (like Go's SIGQUIT)."""

    def dump() -> None:
        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(file=out)
            log.warning("task %s:\n%s", task.get_name(), out.getvalue())

    # An optional diagnostic: signal handlers exist only in the main thread of a Unix event loop
    # (NotImplementedError elsewhere; RuntimeError or ValueError in another thread, e.g. dev mode's
    # or a test's embedded server). Without one the hub runs the same, minus the dump.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


def _database_conflict(exc: BaseException) -> bool:
    """A unique or foreign key constraint refused a write: two calls changed the same thing at once."""
    return caused_by(exc, (IntegrityError, asyncpg.exceptions.IntegrityConstraintViolationError))


def _database_refused_value(exc: BaseException) -> bool:
    """PostgreSQL refused a value (class 22: a NUL character, a number out of range): bad input
    that got past validation, not an outage."""
    return caused_by(exc, (asyncpg.exceptions.DataError,))


def _install_error_handlers(app: FastAPI) -> None:
    internal = "an unexpected error occurred; see the hub's log"

    async def client_gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # Nobody to answer, nothing done: no traceback (an overloaded hub whose callers give up would
        # otherwise spend its time writing them, each twice, and fall further behind).
        log.debug("%s %s: the caller went away before its request was read", request.method, request.url.path)
        return error_response(CLIENT_CLOSED, "CLIENT_DISCONNECTED", "the caller went away before its request was read")

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        if _database_conflict(exc):
            log.warning("a write lost a race: %s", type(exc).__name__)
            return error_response(409, "CONCURRENT_CHANGE", "another call changed the same thing meanwhile; retry")
        if _database_refused_value(exc):
            log.warning("the database refused a value: %s", type(exc).__name__)
            return error_response(422, "INVALID_VALUE", "the request holds a value that cannot be stored "
                          "(e.g. a NUL character or a number out of range)")
        if not request.app.state.hub.outage.failed("an API call", exc):
            log.warning("database error: %s", exc)
        return error_response(503, "DATABASE_UNAVAILABLE", "the database is unavailable; retry shortly")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if _database_refused_value(exc) or _database_conflict(exc):
            return await database_error(request, exc)
        if database_failed(exc):
            if not request.app.state.hub.outage.failed("an API call", exc):
                log.warning("database unreachable: %s: %s", type(exc).__name__, exc)
            return error_response(503, "DATABASE_UNAVAILABLE", "the database is unavailable; retry shortly")
        log.exception("unexpected error")
        return error_response(500, "INTERNAL_ERROR", internal)

    install_error_handlers(
        app, log=log, internal_message=internal,
        http_codes={404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "UNAUTHORIZED", 403: "FORBIDDEN"},
        # The hub's answers, kept as they were: no headers from Starlette's HTTP errors, a generic message
        # for an invalid request, and 400 for a body that is not JSON.
        http_headers=False, invalid_message=lambda _: "the request is invalid", malformed_json=True,
        extra={ClientDisconnect: client_gone, **dict.fromkeys(DATABASE_ERRORS, database_error), Exception: unexpected},
    )


def create_app(settings: HubSettings | None = None, hub: Hub | None = None, run_loops: bool = True) -> FastAPI:
    settings = settings or HubSettings()
    hub = hub or build_hub(settings)

    publisher = GatewayPublisher(hub.gateway, settings.gateway_publish_interval)
    watch = GatewayWatch(hub.gateways)
    idle = IdleWatch(hub.db, hub.services, settings)
    gpu_return = GpuReturn(hub.db, hub.services, settings)
    traffic = TrafficRecorder(hub.db, settings)
    assert hub.dispatcher is not None and hub.watcher is not None and hub.jobs is not None
    dispatcher = JobDispatcher(hub.dispatcher, settings.job_poll_interval)
    watcher = JobWatcher(hub.watcher)
    hub.jobs.changed = dispatcher.wake
    placement = hub.dispatcher.placement

    def attempt_ended() -> None:
        # What it held is free now: the next pass places on a fresh snapshot, not one that still counts it
        # (a pipeline's next step goes where its inputs were made only if that controller has room).
        placement.stale()
        dispatcher.wake()

    hub.watcher.changed = attempt_ended
    prefetcher = (Prefetcher(hub.db, settings, hub.client, hub.services.placement, hub.ingest.images,
                             hub.metrics, outage=hub.outage)
                  if settings.prefetch_interval > 0 else None)
    alert_push = (AlertPusher(hub.db, Alertmanagers(settings.alertmanager_urls), settings.alertmanager_interval)
                  if settings.alertmanager_urls else None)

    # A loop failing because the database is away tells the hub's one account of the outage, not its own traceback.
    for loop in (publisher, watch, idle, gpu_return, traffic, dispatcher, watcher, hub.poller, prefetcher, alert_push):
        if loop is not None:
            loop.quiet = hub.outage.failed

    async def on_lead(since: datetime) -> None:
        publisher.start()
        idle.start()
        hub.reconciler = Reconciler(hub.db, settings, hub.services, hub.metrics, hub.replica_id, since,
                                    ingest=hub.ingest)
        hub.reconciler.quiet = hub.outage.failed
        hub.reconciler.start()
        hub.poller.start()
        gpu_return.start()
        traffic.start()
        watcher.start()
        if prefetcher is not None:
            prefetcher.start()
        if alert_push is not None:
            alert_push.start()

    async def on_follow() -> None:
        if alert_push is not None:
            await alert_push.stop()
        await watcher.stop()
        await traffic.stop()
        await gpu_return.stop()
        if prefetcher is not None:
            await prefetcher.stop()
        await idle.stop()
        await publisher.stop()
        await hub.poller.stop()
        if hub.reconciler is not None:
            await hub.reconciler.stop()
            hub.reconciler = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert hub.jobs is not None
        _dump_tasks_on_sigusr1()
        # Uploads a killed replica left half-written; younger ones may be another replica's, under way.
        await asyncio.to_thread(hub.services.model_store.sweep, settings.model_upload_grace)
        await asyncio.to_thread(hub.jobs.store.sweep, settings.model_upload_grace)
        await hub.controllers.sync_from_config()
        controllers_file = settings.controllers_file
        # Every replica watches: each holds the entries' keys in its own memory (hub.background.controllers_file).
        file_watch = (ControllersFileWatch(hub.controllers, controllers_file, settings.controllers_watch_interval)
                      if controllers_file is not None else None)
        # The pace first: the first answers and the first judgement of silence are for this fleet's size.
        await hub.ingest.count_controllers()
        flusher = HeartbeatFlusher(hub.ingest, min(0.5, settings.heartbeat_interval / 4), hub.users)
        supervisor = Supervisor(hub.db, hub.replica_id, min(1.0, settings.heartbeat_grace / 3), on_lead, on_follow,
                                on_beat=hub.ops.recover_own)
        for loop in (flusher, supervisor, file_watch):
            if loop is not None:
                loop.quiet = hub.outage.failed
        if run_loops:
            # One poll first, so controllers that are up are placeable as soon as the API answers.
            await hub.refresh_controllers()
            flusher.start()
            supervisor.start()
            watch.start()
            dispatcher.start()
        if file_watch is not None:
            file_watch.install_sighup()
            if run_loops and settings.controllers_watch_interval > 0:
                file_watch.start()
        try:
            yield
        finally:
            if file_watch is not None:
                file_watch.remove_sighup()
                await file_watch.stop()
            if run_loops:
                await dispatcher.stop()
                await watcher.stop()
                await watch.stop()
                await supervisor.stop()
                await publisher.stop()
                await idle.stop()
                await gpu_return.stop()
                await traffic.stop()
                if prefetcher is not None:
                    await prefetcher.stop()
                if alert_push is not None:
                    await alert_push.stop()
                await flusher.stop()
            if alert_push is not None:
                await alert_push.alertmanagers.aclose()
            await hub.ingest.close()
            await hub.outage.close()
            await hub.services.shutdown()
            await hub.client.aclose()
            try:
                await hub.db.dispose()
            finally:
                if hub.ingest.db is not hub.db:
                    await hub.ingest.db.dispose()

    # FastAPI's OpenTelemetry off: the hub exports none (its metrics are Prometheus', at /metrics), and with it on
    # FastAPI looks for a configured provider on every call, the status reads and heartbeats included.
    app = HotApp(title="mManager hub", version=__version__, lifespan=lifespan,
                 telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.hub = hub
    app.state.prefetcher = prefetcher
    # The two calls made all the time, dispatched ahead of FastAPI's layers (hub.routers.hot); first among the
    # routes too, so the router finds them at once when it must (a wrong method's 405).
    app.router.routes[:0] = [services.status_read(hub), controllers.heartbeat_route(hub)]
    _install_error_handlers(app)
    # The audit, added last, is the outer one: it sees the body limit's 413s too. The hot routes run a copy of
    # each (hub.routers.hot.HotDispatch, built from these same arguments): state a middleware keeps across calls
    # must be passed in, shared, as the audit's coalescer is.
    app.add_middleware(BodyLimit, limit_for=lambda scope: settings.max_heartbeat_bytes
                       if HEARTBEAT_PATH.match(scope["path"]) else PRESENCE_BYTES
                       if PRESENCE_PATH.match(scope["path"]) else settings.model_file_max_bytes
                       if scope["path"] == model_files.UPLOAD_PATH else settings.artifact_max_bytes
                       if scope["path"] == jobs.UPLOAD_PATH else settings.max_request_bytes)
    # One coalescer for both copies of the audit middleware.
    app.add_middleware(AuditMiddleware, record=AuditLog(hub.db).record, skip=skip_routine, coalescer=Coalescer())
    app.include_router(controllers.router)
    app.include_router(system.router)
    app.include_router(services.router)
    app.include_router(admin.router)
    app.include_router(images.router)
    app.include_router(prometheus.router)
    app.include_router(gateway.router)
    app.include_router(audit.router)
    app.include_router(models.router)
    app.include_router(model_files.router)
    app.include_router(jobs.router)
    app.include_router(mine_router)
    app.include_router(users_router)
    app.include_router(pipelines_router)
    install_request_ids(app)
    app.mount(CONSOLE_PATH, console(app))
    return app
