"""Service lifecycle: create, start, stop, restart, delete, update, rollback,
migrate and drain.

Invariants:
- a service's ``status``, ``controller_id``, ``container_id`` and ``epoch``
  change only here, and each change is recorded in ``container_operations``;
- a ``container_registry`` row exists, marked ``creating``, from the moment a
  controller is chosen, so concurrent placements count it; it is removed if the
  create fails, so a failed create leaves neither container nor row behind;
- an owner never has more than ``max_services_per_user`` services, whatever the
  concurrency and however many replicas: creates count and insert under the
  owner's ``users`` row lock; a create that fails removes its service, so it
  holds no quota (except an acknowledged ``?wait=false`` create that only
  lacked a controller: it stays, ``lost``, for the reconciler to finish);
- placements are decided one at a time against this process's in-memory view
  (``PlacementCache``: a snapshot of the database at most ``PLACEMENT_MAX_AGE``
  seconds old, plus every reservation this process made since), each decision
  and its reservation in one synchronous step, so two concurrent creates never
  both take the last slot of a controller; the database stays the authority: a
  registry row is only inserted while its controller is healthy, enabled and not
  draining, and a placement that finds nothing looks again at a fresh snapshot.
  Calls on one service are serialised by that service's lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import ValidationError
from sqlalchemy import Select, Text, bindparam, case, cast, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database, Tx, any_of, insert_row
from hub.errors import (
    Conflict,
    ControllerRejected,
    ControllerUnavailable,
    HubError,
    InvalidRequest,
    NoFeasibleController,
    NotFound,
    QuotaExceeded,
    SpecForbidden,
)
from hub.logstreams import LogStreamSlots
from hub.metrics import HubMetrics
from hub.models import (
    ContainerRegistryModel,
    ControllerModel,
    DeploymentHistoryModel,
    OperationModel,
    ServiceModel,
    UserModel,
    new_id,
    utcnow,
)
from hub.scheduler import CandidateIndex, ControllerView, Placement, PlacementRequest, place
from hub.scheduler.placement import GIB
from hub.scheduler.reconcile import UNSETTLED
from hub.schemas import Endpoint, ServiceOut, ServicePatch, ServiceSpec
from hub.services.controllers import ControllerRegistry, get_controller
from hub.services.lifecycle.reads import Gathered, Rendered
from hub.services.operations import OperationLog
from hub.services.users import Identity
from mmanager.logs import bind_request_id
from mmanager.policy import PolicyViolation, check_spec
from mmanager.streams import ClosingStream
from mmanager.wire import ContainerCreate, HealthCheck

log = logging.getLogger(__name__)
T = TypeVar("T")

# Docker's container states, as the service status a user sees.
_DOCKER_TO_STATUS = {"running": "running", "created": "starting", "restarting": "starting", "paused": "stopped"}
CREATE_ATTEMPTS = 3
# Seconds a failover's new copy is watched for its first passing probe after the move is recorded
# (outside the move's slot, so slow probes never slow a mass failover), by at most HEALTH_FOLLOWERS
# at once; beyond, its controller's heartbeats report its health.
FAILOVER_HEALTH_WAIT = 15.0
HEALTH_FOLLOWERS = 64
# Placement reads the controllers from a snapshot at most this old (plus this process's own reservations
# since); older, a placement waits for a fresh one. In between, one is taken in the background.
PLACEMENT_MAX_AGE = 1.0
PLACEMENT_REFRESH_AFTER = 0.5
# The status reads' answers kept for rendering again only when their service changed (``read_json``): a
# few MiB at most.
RENDERED_READS = 4096


def docker_status(state: str, desired: str) -> str:
    if state in _DOCKER_TO_STATUS:
        return _DOCKER_TO_STATUS[state]
    return "failed" if desired == "running" else "stopped"


def container_name(service: ServiceModel, epoch: int, controller_id: str) -> str:
    """Unique per Docker engine even when several controllers share one (tests, a dev box)."""
    where = re.sub(r"[^A-Za-z0-9_.-]", "-", controller_id)[:32]
    return f"mm-{service.name}-{service.id[:8]}-{epoch}-{where}"


def volume_name(owner: UserModel, volume: str) -> str:
    """The Docker volume behind a service's named volume: one per owner, so no user mounts another's data.

    The owner's id comes first and ends at the first ``-``, which makes the name
    unambiguous although usernames and volume names may both contain ``-``
    (``alice`` + ``x-data`` and ``alice-x`` + ``data`` are different volumes).
    """
    return f"mm-{owner.id}-{owner.username}-{volume}"


def endpoint_for(controller_url: str, ports: dict[str, int | None]) -> Endpoint:
    host = urlparse(controller_url).hostname or ""
    return Endpoint(host=host, ports={key.split("/")[0]: value for key, value in ports.items()})


_REGISTRY = ContainerRegistryModel.__table__
_SERVICES = ServiceModel.__table__
_CONTROLLERS = ControllerModel.__table__
_HISTORY = DeploymentHistoryModel.__table__
# A replace's settle (ServiceManager._replace): the service, its row locked until the transaction ends
# (SQLite locks the whole database anyway), made to point at the new copy; every other copy stale.
_LOCK_SERVICE = select(_SERVICES).where(_SERVICES.c.id == bindparam("service_id")).with_for_update()
_FINALIZED = ("epoch", "controller_id", "container_id", "gpu_devices", "spec", "health", "version", "status",
              "endpoint", "status_message", "updated_at")
_FINALIZE = (
    update(_SERVICES)
    .where(_SERVICES.c.id == bindparam("service_id"))
    .values({key: bindparam(key, type_=_SERVICES.c[key].type) for key in _FINALIZED})
)
_RETIRE_OTHERS = (
    update(_REGISTRY)
    .where(_REGISTRY.c.service_id == bindparam("of_service"), _REGISTRY.c.id != bindparam("keep_row"))
    .values(status="stale", updated_at=bindparam("updated_at"))
)
_LATEST_VERSION = select(func.max(_HISTORY.c.version).label("latest")).where(
    _HISTORY.c.service_id == bindparam("service_id"))
_SETTLE_ROW = (
    update(_REGISTRY)
    .where(_REGISTRY.c.id == bindparam("row_id"), _REGISTRY.c.status != "stale")
    .values(container_id=bindparam("container_id"), container_name=bindparam("container_name"),
            status=bindparam("status"), updated_at=bindparam("updated_at"))
    .returning(_REGISTRY.c.health)
)


# A moved copy's probe passed (ServiceManager._follow_health): the service, if still at that copy, and the
# copy's row, unless retired meanwhile, read healthy.
_FOLLOWED_SERVICE = (
    update(_SERVICES)
    .where(_SERVICES.c.id == bindparam("service_id"), _SERVICES.c.epoch == bindparam("at_epoch"),
           _SERVICES.c.container_id == bindparam("copy_id"), _SERVICES.c.health != "healthy")
    .values(health="healthy", updated_at=bindparam("updated_at"))
)
_FOLLOWED_ROW = (
    update(_REGISTRY)
    .where(_REGISTRY.c.id == bindparam("row_id"), _REGISTRY.c.container_id == bindparam("copy_id"),
           _REGISTRY.c.status != "stale")
    .values(health="healthy", updated_at=bindparam("updated_at"))
)
# The create's end: its service pointing at the container, unless another operation got there first.
_SETTLE_CREATED = (
    update(_SERVICES)
    .where(_SERVICES.c.id == bindparam("service_id"), _SERVICES.c.epoch == bindparam("at_epoch"),
           _SERVICES.c.controller_id.is_(None))
    .values({key: bindparam(key, type_=_SERVICES.c[key].type) for key in (
        "controller_id", "container_id", "gpu_devices", "status", "endpoint", "status_message", "updated_at",
        "health")})
)
_CLAIM_EPOCH = (
    update(_SERVICES)
    .where(_SERVICES.c.id == bindparam("service_id"), _SERVICES.c.epoch == bindparam("seen"))
    .values(epoch=bindparam("next_epoch"), status="migrating", updated_at=bindparam("updated_at"))
)
# A create's count of its owner's services, and the id of one already named as the new one, under the
# owner's row lock (NO KEY UPDATE: inserts that only reference the user are not held up).
_LOCK_OWNER = select(UserModel.id).where(UserModel.id == bindparam("owner_id")).with_for_update(key_share=True)
_OWNED = select(
    func.count().label("count"),
    func.max(case((ServiceModel.name == bindparam("name"), ServiceModel.id))).label("clash"),
).where(ServiceModel.owner_id == bindparam("owner_id"))


async def _settle_row(tx: Tx, row: ContainerRegistryModel) -> bool:
    """Record the created container on its reserved row, unless the row was superseded meanwhile.

    An explicit UPDATE rather than a merge: a merge would write back the row's old
    ``updated_at`` and could un-stale a row another operation retired. What a
    heartbeat already recorded on the row (its health) is kept and copied onto ``row``.
    """
    found = await tx.first(_SETTLE_ROW, {"row_id": row.id, "container_id": row.container_id,
                                         "container_name": row.container_name, "status": row.status,
                                         "updated_at": utcnow()})
    if found is None:
        return False
    row.health = found["health"]
    return True


class _LookAgain(Exception):
    """Raised inside a transaction to roll it back: the in-memory view found no place; look at a fresh one."""


class _Superseded(Exception):
    """Raised inside a transaction to roll it back: another operation completed the service first."""


_ROW_COLUMNS = [c.key for c in _REGISTRY.columns]
# The registry row, inserted only while its controller is healthy, enabled and not draining.
_INSERT_ROW_IF_PLACEABLE = insert(_REGISTRY).from_select(
    _ROW_COLUMNS,
    select(*(bindparam(key, type_=_REGISTRY.c[key].type).label(key) for key in _ROW_COLUMNS)).where(
        _CONTROLLERS.c.id == bindparam("place_on"), _CONTROLLERS.c.status == "healthy",
        _CONTROLLERS.c.enabled.is_(True), _CONTROLLERS.c.draining.is_(False),
    ),
)


async def _insert_row_if_placeable(tx: Tx, row: ContainerRegistryModel) -> bool:
    """Insert the registry row only while its controller is healthy, enabled and not draining: the
    database has the last word on a decision made from the in-memory view."""
    values = {key: getattr(row, key) for key in _ROW_COLUMNS}
    return await tx.execute(_INSERT_ROW_IF_PLACEABLE, {**values, "place_on": row.controller_id}) == 1


def _require_visible(user: UserModel | Identity, owner_id: int | None, service_id: str) -> None:
    """A service (owned by ``owner_id``; None: there is none) is seen by its owner and admins; for anyone
    else it does not exist."""
    if owner_id is None or not (user.is_admin or owner_id == user.id):
        raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")


# A service's registry rows of creates begun and never finished, and the healthy controllers they are on.
Unfinished = tuple[list[ContainerRegistryModel], dict[str, ControllerModel]]


_PENDING_ROWS = select(_REGISTRY).where(_REGISTRY.c.service_id == bindparam("service_id"),
                                        _REGISTRY.c.status != "stale")
# A move's service, with what of its owner a move needs (the owner's volumes are named by id and name).
_MOVED = (select(_SERVICES, UserModel.__table__.c.username.label("owner_username"),
                 UserModel.__table__.c.is_admin.label("owner_is_admin"))
          .join_from(_SERVICES, UserModel.__table__, _SERVICES.c.owner_id == UserModel.__table__.c.id)
          .where(_SERVICES.c.id == bindparam("service_id")))
_STALE_COPIES = (
    select(_REGISTRY.c.id, _REGISTRY.c.controller_id, _REGISTRY.c.container_id, _CONTROLLERS.c.status)
    .select_from(_REGISTRY.outerjoin(_CONTROLLERS, _CONTROLLERS.c.id == _REGISTRY.c.controller_id))
    .where(_REGISTRY.c.service_id == bindparam("service_id"), _REGISTRY.c.status == "stale")
)


def _removable(stale: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of ``_STALE_COPIES``, those whose controller answers now (the others are told on its next heartbeat)."""
    return [copy for copy in stale if copy["status"] == "healthy" and copy["container_id"] is not None]


@functools.cache
def _healthy_controllers(sqlite: bool) -> Select[Any]:
    return select(_CONTROLLERS).where(_CONTROLLERS.c.status == "healthy", any_of(_CONTROLLERS.c.id, "ids", sqlite=sqlite))


async def _unfinished(tx: Tx, service: ServiceModel, *, sqlite: bool) -> Unfinished:
    """Rows of ``service`` that are neither its current container nor superseded: creates begun by an
    operation that never finished (a heartbeat may already have seen them run); and of the controllers
    those rows are on, the healthy ones (only those: a failover of thousands must not read the fleet each).
    Rows and controllers as objects of no session, read with Core statements built once."""
    pending = [
        ContainerRegistryModel(**row) for row in await tx.all(_PENDING_ROWS, {"service_id": service.id})
        if row["container_id"] is None or row["container_id"] != service.container_id
    ]
    if not pending:
        return pending, {}
    ids = sorted({row.controller_id for row in pending})
    healthy = [ControllerModel(**row) for row in await tx.all(_healthy_controllers(sqlite), {"ids": ids})]
    return pending, {c.id: c for c in healthy}


# The placement snapshot's three reads, built once (``load_views``).
_VIEW_CONTROLLERS = select(*(_CONTROLLERS.c[name] for name in (
    "id", "url", "server_type", "enabled", "draining", "status", "priority", "weight", "max_containers",
    "containers_running", "cpu_cores", "memory_total_gb", "gpus")))
_VIEW_USAGE = (select(_REGISTRY.c.controller_id, func.count().label("n"),
                      func.coalesce(func.sum(_REGISTRY.c.memory_bytes), 0).label("memory"),
                      func.coalesce(func.sum(_REGISTRY.c.cpu_limit), 0.0).label("cpu"))
               .group_by(_REGISTRY.c.controller_id))
_VIEW_GPUS = (select(_REGISTRY.c.controller_id, _REGISTRY.c.gpu_devices)
              .where(cast(_REGISTRY.c.gpu_devices, Text) != "[]"))


async def load_views(db: Database) -> tuple[list[ControllerView], dict[str, str]]:
    """Every controller as placement sees it, with what the registry reserves on it, and the URLs (also the
    admin's ``/resources/usage``).

    By column reads: no ORM objects, no health document. Three
    statements built once, straight through the driver (``Database.all``), sent together on PostgreSQL: a
    create that must wait for a fresh snapshot waits one round trip, not three in an ORM session.
    """
    reads = (db.all(_VIEW_CONTROLLERS, {}), db.all(_VIEW_USAGE, {}), db.all(_VIEW_GPUS, {}))
    if db.is_sqlite:
        controllers, usage_rows, gpu_rows = [await read for read in reads]
    else:
        controllers, usage_rows, gpu_rows = await asyncio.gather(*reads)
    usage = {r["controller_id"]: (r["n"], r["memory"], r["cpu"]) for r in usage_rows}
    gpus_used: dict[str, set[str]] = {}
    for r in gpu_rows:
        if r["gpu_devices"]:
            gpus_used.setdefault(r["controller_id"], set()).update(str(d) for d in r["gpu_devices"])
    views = []
    for c in controllers:
        cid = c["id"]
        n, memory, cpu = usage.get(cid, (0, 0, 0.0))
        views.append(ControllerView(
            id=cid, server_type=c["server_type"], enabled=c["enabled"], draining=c["draining"],
            healthy=c["status"] == "healthy", priority=c["priority"], weight=c["weight"],
            max_containers=c["max_containers"], containers=max(n, c["containers_running"]), cpu_cores=c["cpu_cores"],
            cpu_reserved=float(cpu), memory_total=int(c["memory_total_gb"] * GIB), memory_reserved=int(memory),
            gpus=tuple(str(g.get("index")) for g in c["gpus"] or ()),
            gpus_used=frozenset(gpus_used.get(cid, ())),
        ))
    return views, {c["id"]: c["url"] for c in controllers}


@dataclass(slots=True, eq=False)
class Held:
    """One placement this process made: counted in its view until a snapshot taken after its row was
    committed counts it instead."""

    controller_id: str
    memory: int
    cpu: float
    gpus: tuple[str, ...]
    committed_at: float | None = None


class PlacementCache:
    """The controllers as placement sees them, kept in memory between snapshots of the database.

    A snapshot (``load_views``: two grouped reads and one of the controllers' columns, sent together)
    is taken when the last one is older than ``refresh_after`` (in the background)
    or ``max_age`` (the placement waits for it), or than 10 (20) times what the last
    one took, whichever is longer. On top of it, every placement this
    process made and whose row the snapshot could not have seen yet (not committed
    when it began). Controllers a call just failed to reach sit out until
    ``avoid_for`` seconds pass or a placement finds nothing without them.
    """

    def __init__(self, db: Database, max_age: float = PLACEMENT_MAX_AGE,
                 refresh_after: float = PLACEMENT_REFRESH_AFTER, avoid_for: float = 6.0) -> None:
        self.db = db
        self.max_age = max_age
        self.refresh_after = refresh_after
        self.avoid_for = avoid_for
        self._index: CandidateIndex | None = None
        self.urls: dict[str, str] = {}
        self._taken_at = -math.inf
        self._invalid_at = -math.inf
        self._held: set[Held] = set()
        self._avoid: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        # Seconds the last snapshot took: the background one is taken no more often than every 10 of them,
        # so it costs at most a tenth of the time (10,000 controllers: about 0.1 s a snapshot).
        self._cost = 0.0

    @property
    def current(self) -> CandidateIndex:
        """The view as it is (``index()`` awaited before)."""
        assert self._index is not None
        return self._index

    async def index(self, fresh: bool = False) -> CandidateIndex:
        now = time.monotonic()
        age = now - self._taken_at
        if fresh or self._index is None or age > max(self.max_age, 20 * self._cost) or self._invalid_at >= self._taken_at:
            if fresh:
                self._avoid.clear()
            await self.refresh(now)
        elif age > max(self.refresh_after, 10 * self._cost) and (self._background is None or self._background.done()):
            self._background = asyncio.create_task(self.refresh(now))
        assert self._index is not None
        return self._index

    async def refresh(self, asked_at: float) -> None:
        async with self._lock:
            if self._taken_at >= asked_at and self._invalid_at < self._taken_at:
                return  # taken meanwhile, after the caller asked
            started = time.monotonic()
            views, urls = await load_views(self.db)
            # A row committed before this snapshot's reads began is in it; the others are added on top.
            self._held = {h for h in self._held if h.committed_at is None or h.committed_at >= started}
            avoided = {cid for cid, until in self._avoid.items() if until > started}
            self._avoid = {cid: self._avoid[cid] for cid in avoided}
            index = CandidateIndex(views)
            for cid in avoided:
                index.forget(cid)
            for h in self._held:
                index.reserve(h.controller_id, h.memory, h.cpu, h.gpus)
            self._index, self.urls, self._taken_at = index, urls, started
            self._cost = time.monotonic() - started

    def hold(self, decision: Placement, request: PlacementRequest) -> Held:
        """Count a placement in the view at once (no await between a decision and this)."""
        assert self._index is not None and decision.controller_id is not None
        held = Held(decision.controller_id, request.memory, request.cpu, decision.gpu_devices)
        self._held.add(held)
        self._index.reserve(held.controller_id, held.memory, held.cpu, held.gpus)
        return held

    def committed(self, held: Held) -> None:
        held.committed_at = time.monotonic()

    def release(self, held: Held) -> None:
        """The placement's row is gone (or never committed). Counted in a snapshot already, it stays
        counted there (a little too much) until the next one."""
        if held in self._held:
            self._held.discard(held)
            if self._index is not None:
                self._index.release(held.controller_id, held.memory, held.cpu, held.gpus)

    def unfit(self, controller_id: str) -> None:
        """The database refused a placement there: out of the view until a fresh snapshot, taken next."""
        if self._index is not None:
            self._index.forget(controller_id)
        self._invalid_at = time.monotonic()

    def stale(self) -> None:
        """A controller's row changed here (enabled, disabled, drained): the next placement takes a fresh
        snapshot. Other replicas see the change with their next one (at most ``max_age`` later)."""
        self._invalid_at = time.monotonic()

    def avoid(self, controller_id: str) -> None:
        """A call could not reach it: no placements there for a while, unless nothing else fits."""
        self._avoid[controller_id] = time.monotonic() + self.avoid_for
        if self._index is not None:
            self._index.forget(controller_id)


class ServiceManager:
    def __init__(
        self,
        db: Database,
        client: ControllerClient,
        controllers: ControllerRegistry,
        ops: OperationLog,
        settings: HubSettings,
        metrics: HubMetrics,
    ) -> None:
        self.db = db
        self.client = client
        self.controllers = controllers
        self.ops = ops
        self.settings = settings
        self.metrics = metrics
        self.placement = PlacementCache(db, avoid_for=settings.heartbeat_grace)
        self._owner_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._service_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._followers: set[asyncio.Task[Any]] = set()
        self.log_streams = LogStreamSlots(settings.max_log_streams, settings.max_log_streams_per_user)
        self._reads = _reads(db)
        self._rendered = Rendered(RENDERED_READS)

    # ------------------------------------------------------------------ reads

    async def get_for(self, session: AsyncSession, user: UserModel, service_id: str) -> ServiceModel:
        """The service, if ``user`` may see it; another user's service does not exist for them."""
        service = await session.get(ServiceModel, service_id)
        _require_visible(user, service.owner_id if service is not None else None, service_id)
        return service  # type: ignore[return-value]

    async def read(self, user: UserModel | Identity, service_id: str) -> ServiceOut:
        """The status read every client polls: the service as the hub knows it, with its owner's name, in
        one statement on a connection outside any transaction (no ORM session, no identity map), shared by
        the reads that come at the same time."""
        row = await self._row(user, service_id)
        return self.to_out(SimpleNamespace(**row), owner=row["owner_name"])  # type: ignore[arg-type]

    async def read_json(self, user: UserModel | Identity, service_id: str) -> bytes:
        """``read``'s answer as the JSON the route sends, rendered again only when the service's row changed
        since it was last rendered (a service polled by many clients, or by one at a fast cadence, is mostly
        unchanged between two polls; rendering it was a fifth of a read's cost)."""
        row = await self._row(user, service_id)
        return self._rendered.get(service_id, row, lambda: self.to_out(
            SimpleNamespace(**row), owner=row["owner_name"]).model_dump_json().encode())  # type: ignore[arg-type]

    async def _row(self, user: UserModel | Identity, service_id: str) -> Mapping[str, Any]:
        row = await self._reads.first(service_id)
        _require_visible(user, row["owner_id"] if row is not None else None, service_id)
        assert row is not None
        return row

    def to_out(self, service: ServiceModel, owner: str | None = None) -> ServiceOut:
        """``service`` may be a row with the model's columns; ``owner``, the owner's name, then too."""
        endpoint = Endpoint.model_validate(service.endpoint) if service.endpoint else None
        owner = owner if owner is not None else service.owner.username
        return ServiceOut(
            id=service.id,
            name=service.name,
            owner=owner,
            repo=service.repo,
            spec=service.spec,
            version=service.version,
            desired_state=service.desired_state,  # type: ignore[arg-type]
            status=service.status,
            status_message=service.status_message,
            controller_id=service.controller_id,
            container_id=service.container_id,
            epoch=service.epoch,
            endpoint=endpoint,
            url=self._url(service, owner, endpoint),
            health=service.health,
            created_at=service.created_at,
            updated_at=service.updated_at,
        )

    def _url(self, service: ServiceModel, owner: str, endpoint: Endpoint | None) -> str | None:
        if self.settings.service_domain:
            return f"http://{service.name}-{owner}.{self.settings.service_domain}"
        if endpoint is None or service.status != "running":
            return None
        for port in endpoint.ports.values():
            if port:
                return f"http://{endpoint.host}:{port}"
        return None

    # --------------------------------------------------------------- plumbing

    def spawn(self, work: Awaitable[Any], tasks: set[asyncio.Task[Any]] | None = None) -> None:
        """Run an operation in the background (``?wait=false``; errors are in its record), or, held in
        ``tasks`` instead of those shutdown waits for, a follow-up of one (``_follow_health``)."""

        async def guarded() -> None:
            try:
                await work
            except HubError:
                pass  # already recorded on the operation (a follow-up's: it ends with nothing to record)
            except Exception:
                log.exception("background operation crashed")

        held = self._tasks if tasks is None else tasks
        task = asyncio.create_task(guarded())
        held.add(task)
        task.add_done_callback(held.discard)

    async def _guarded(self, op: OperationModel, work: Awaitable[T]) -> T:
        """Run an operation's work; whatever escapes it (a database outage, a bug) still ends the
        operation, or at least lets the reconciler recover it once the database is back."""
        try:
            return await work
        except BaseException as exc:
            if op.status == "running":
                try:
                    error = (f"{exc.code}: {exc.message}" if isinstance(exc, HubError)
                             else f"INTERNAL_ERROR: {type(exc).__name__}: {exc}")
                    await self.ops.finish(op, error[:2000])
                except Exception:
                    log.warning("could not record the end of operation %s; it will be recovered", op.id)
            raise

    async def shutdown(self, timeout: float = 30.0) -> None:
        for task in self._followers:
            task.cancel()  # only a quicker health report is lost
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    @staticmethod
    def _request(spec: ServiceSpec, exclude: frozenset[str] = frozenset()) -> PlacementRequest:
        return PlacementRequest(
            memory=spec.resources.memory_bytes,
            cpu=spec.resources.cpu_limit or 0.0,
            gpu_count=spec.resources.gpu_count,
            server_type=spec.server_type,
            exclude=exclude,
        )

    def _decide(self, request: PlacementRequest, target: str | None, final: bool) -> tuple[Placement, Held]:
        """Decide where from the view, and hold it there, in one synchronous step (no other placement
        sees the view in between). Nothing found: ``_LookAgain`` (the caller takes a fresh snapshot, outside
        its transaction: waiting for one while holding a pooled connection could starve the pool), or,
        on a fresh one (``final``), the error."""
        index = self.placement.current
        if target is not None:
            view = index.get(target)
            if view is None:
                if final:
                    raise NotFound(f"controller {target!r} not found", code="CONTROLLER_NOT_FOUND")
                raise _LookAgain
            decision = place([view], request)
        else:
            decision = index.place(request)
        if decision.placed:
            return decision, self.placement.hold(decision, request)
        if final:
            raise NoFeasibleController(
                "no controller can run this service",
                {"rejections": [r.as_dict() for r in decision.rejections]},
            )
        raise _LookAgain

    def _new_row(self, service: ServiceModel, spec: ServiceSpec, epoch: int, decision: Placement
                 ) -> ContainerRegistryModel:
        assert decision.controller_id is not None
        now = utcnow()
        return ContainerRegistryModel(
            id=new_id(),
            service_id=service.id,
            controller_id=decision.controller_id,
            container_id=None,
            container_name=container_name(service, epoch, decision.controller_id),
            image=spec.image,
            status="creating",
            epoch=epoch,
            health="unknown",
            health_restarts=0,
            memory_bytes=spec.resources.memory_bytes,
            cpu_limit=spec.resources.cpu_limit or 0.0,
            gpu_devices=list(decision.gpu_devices),
            created_at=now,
            updated_at=now,
        )

    async def _hold_row(self, tx: Tx, service: ServiceModel, spec: ServiceSpec, epoch: int,
                        exclude: frozenset[str], target: str | None, final: bool
                        ) -> tuple[ContainerRegistryModel, ControllerModel, Held]:
        """Choose a controller and insert its ``creating`` row in the caller's transaction; the hold is
        released if that transaction does not commit (the caller calls ``placement.committed`` when it did).
        The caller has awaited ``placement.index()`` just before (outside the transaction)."""
        refused: set[str] = set()
        for _ in range(CREATE_ATTEMPTS):
            decision, held = self._decide(self._request(spec, exclude | refused), target, final)
            row = self._new_row(service, spec, epoch, decision)
            try:
                placeable = await _insert_row_if_placeable(tx, row)
            except BaseException:
                self.placement.release(held)
                raise
            if placeable:
                controller = ControllerModel(id=row.controller_id, url=self.placement.urls[row.controller_id])
                return row, controller, held
            self.placement.release(held)
            self.placement.unfit(row.controller_id)
            refused.add(row.controller_id)
        raise NoFeasibleController("no controller can run this service (each chosen one was refused)",
                                   {"refused": sorted(refused)})

    async def _reserve(self, service: ServiceModel, spec: ServiceSpec, exclude: frozenset[str],
                       target: str | None, epoch: int,
                       write_first: Callable[[Tx], Awaitable[None]] | None = None,
                       ) -> tuple[ContainerRegistryModel, ControllerModel, Held]:
        """Choose a controller and hold a registry row on it (committed when this returns), in one
        transaction with what ``write_first`` writes (run again if a fresh view must be taken)."""
        for final in (False, True):
            await self.placement.index(fresh=final)
            held: Held | None = None
            try:
                async with self.db.transaction() as tx:
                    if write_first is not None:
                        await write_first(tx)
                    row, controller, held = await self._hold_row(tx, service, spec, epoch, exclude, target, final)
            except _LookAgain:
                continue
            except BaseException:
                if held is not None:
                    self.placement.release(held)
                raise
            self.placement.committed(held)
            return row, controller, held
        raise AssertionError("unreachable: a fresh look decides or raises")

    async def _deploy(self, service: ServiceModel, spec: ServiceSpec, epoch: int,
                      exclude: frozenset[str] = frozenset(), target: str | None = None,
                      first: tuple[ContainerRegistryModel, ControllerModel, Held] | None = None,
                      ) -> tuple[ContainerRegistryModel, ControllerModel, dict[str, int | None], str]:
        """Place and create-and-start one container; on failure nothing stays reserved.

        ``first``: a placement already held (the create's, made in its first transaction).
        A controller that cannot be reached is skipped and the next best one tried.
        """
        tried: set[str] = set()
        last_error: HubError | None = None
        for attempt in range(CREATE_ATTEMPTS):
            if attempt == 0 and first is not None:
                row, controller, held = first
            else:
                try:
                    row, controller, held = await self._reserve(service, spec, exclude | tried, target, epoch)
                except NoFeasibleController:
                    if last_error is not None:
                        raise last_error from None
                    raise
            try:
                created = await self.client.create(
                    controller.id, controller.url,
                    self._container_config(service, spec, epoch, held.gpus, row.container_name),
                )
            except HubError as exc:
                async with self.db.session() as session:
                    await session.execute(delete(ContainerRegistryModel).where(ContainerRegistryModel.id == row.id))
                self.placement.release(held)
                # Unreachable, or full after all (another replica took its last slot meanwhile, or
                # containers the hub does not know of): the next best controller is tried.
                full = isinstance(exc, ControllerRejected) and exc.code == "CAPACITY_EXCEEDED"
                if (isinstance(exc, ControllerUnavailable) or full) and target is None:
                    tried.add(controller.id)
                    if full:
                        self.placement.unfit(controller.id)
                    else:
                        self.placement.avoid(controller.id)
                    last_error = exc
                    continue
                raise
            row.container_id = created.container_id
            row.container_name = created.name
            row.status = "running" if created.status == "running" else created.status
            return row, controller, created.ports, created.status
        assert last_error is not None
        raise last_error

    def _container_config(self, service: ServiceModel, spec: ServiceSpec, epoch: int,
                          gpus: tuple[str, ...], name: str) -> ContainerCreate:
        return ContainerCreate(
            name=name,
            image=spec.image,
            command=spec.command,
            environment=dict(spec.env),
            ports={(k if "/" in k else f"{k}/tcp"): v for k, v in spec.ports.items()},
            # A source that is a path passed the spec policy's host-path allow-list (_check_policy).
            volumes={(source if source.startswith("/") else volume_name(service.owner, source)):
                     {"bind": path, "mode": "ro" if source.startswith("/") else "rw"}
                     for source, path in spec.volumes.items()},
            memory_limit=spec.resources.memory_limit,
            cpu_limit=spec.resources.cpu_limit,
            restart_policy=spec.restart_policy,
            labels=dict(spec.labels),
            service_id=service.id,
            epoch=epoch,
            gpu_count=len(gpus),
            gpu_device_ids=list(gpus) or None,
            health_check=HealthCheck.model_validate(spec.health_check.model_dump()) if spec.health_check else None,
            cap_add=list(spec.cap_add) or None,
        )

    def _check_policy(self, spec: ServiceSpec) -> None:
        """The spec policy (``mmanager.policy``), checked before anything is written; controllers check again."""
        try:
            check_spec(self.settings.spec_policy, image=spec.image, labels=spec.labels, ports=spec.ports,
                       volume_sources=spec.volumes, cap_add=spec.cap_add, environment=spec.env)
        except PolicyViolation as exc:
            raise SpecForbidden(exc.message, exc.details) from None

    # ----------------------------------------------------------------- create

    async def create(self, user: UserModel, username: str, repo: str, spec: ServiceSpec,
                     wait: bool = True) -> ServiceModel | OperationModel:
        owner = user
        if username != user.username:
            if not user.is_admin:
                raise NotFound(f"user {username!r} not found", code="USER_NOT_FOUND")
            async with self.db.session() as session:
                found = await session.scalar(select(UserModel).where(UserModel.username == username))
            if found is None:
                raise NotFound(f"user {username!r} not found", code="USER_NOT_FOUND")
            owner = found
        self._check_policy(spec)
        now = utcnow()
        service = ServiceModel(
            id=new_id(), name=spec.name, owner_id=owner.id, repo=repo, spec=spec.model_dump(mode="json"), version=1,
            desired_state="running", status="pending", status_message=None, controller_id=None, container_id=None,
            epoch=1, endpoint=None, gpu_devices=[], health="unknown", created_at=now, updated_at=now,
        )
        service.owner = owner
        # The quota holds across replicas through the owner's row lock (NO KEY UPDATE, so inserts that
        # only reference the user are not held up), taken before the count and held until the new
        # service is committed. The per-owner asyncio lock in front of it keeps a burst of one owner's
        # creates from each holding a pooled connection while waiting on that row, and serialises them
        # on SQLite (single replica only), whose driver begins the transaction at the first write, too
        # late to cover the count.
        #
        # One transaction: the service, its first history entry, the running create operation and the
        # placement's ``creating`` registry row. So the operation is durable before the controller is
        # touched, a pending service is never seen without its running create (or the reconciler would
        # take it for an interrupted one and start it a second time), and a create interrupted after the
        # commit is finished by the reconciler at the same controller, idempotently (_resume_or_deploy).
        op: OperationModel | None = None

        async def write_first(tx: Tx) -> None:
            nonlocal op
            await tx.first(_LOCK_OWNER, {"owner_id": owner.id})
            found = await tx.first(_OWNED, {"owner_id": owner.id, "name": spec.name})
            assert found is not None  # an aggregate answers one row
            count, clash = found["count"], found["clash"]
            limit = self.settings.max_services_per_user
            if not owner.is_admin and count >= limit:
                raise QuotaExceeded(
                    f"user {owner.username!r} already has {count} services (max_services_per_user={limit})",
                    {"limit": limit, "current": count},
                )
            if clash is not None:
                raise Conflict(f"service {spec.name!r} already exists (id {clash})", code="SERVICE_EXISTS")
            await insert_row(tx, service)
            await insert_row(tx, DeploymentHistoryModel(
                service_id=service.id, version=1, spec=service.spec, image=spec.image,
                reason="create", actor=user.username, created_at=now,
            ))
            op = self.ops.new("create", user.username, service_id=service.id, details={"epoch": 1, "version": 1})
            await insert_row(tx, op)

        async with self._owner_locks[owner.id]:
            # The placement's row in the same transaction: it fails (and rolls all of it back) when nothing
            # could run the service.
            row, controller, held = await self._reserve(service, spec, frozenset(), None, 1, write_first)
        assert op is not None
        self.ops.active.add(op.id)
        work = self._guarded(op, self._run_create(service, spec, op, acknowledged=not wait,
                                                  first=(row, controller, held)))
        if not wait:
            self.spawn(work)
            return op
        return await work

    async def _run_create(self, service: ServiceModel, spec: ServiceSpec, op: OperationModel,
                          acknowledged: bool = False,
                          first: tuple[ContainerRegistryModel, ControllerModel, Held] | None = None) -> ServiceModel:
        """``acknowledged``: the caller already has its 202, so a create that fails only because
        controllers are unreachable or full right now is kept (status ``lost``) for the reconciler
        to finish; bad input (an unknown image) still removes it. ``first``: the placement the
        create's transaction committed."""
        async with self._service_locks[service.id]:
            if acknowledged:
                current = await self._reload_or_none(service.id)
                if current is None or current.status != "pending" or current.epoch != service.epoch:
                    # Finished (or deleted) by someone else meanwhile: nothing left to do here.
                    await self.ops.finish(op, None if current else "service was deleted",
                                          details={"completed_elsewhere": True})
                    if current is None:
                        raise NotFound(f"service {service.id!r} not found", code="SERVICE_NOT_FOUND")
                    return current
            try:
                row, controller, ports, status = await self._deploy(service, spec, service.epoch, first=first)
            except HubError as exc:
                if acknowledged and isinstance(exc, ControllerUnavailable | NoFeasibleController):
                    async with self.db.session() as session:
                        kept = await session.get(ServiceModel, service.id)
                        if kept is not None:
                            kept.status, kept.status_message = "lost", f"{exc.code}: {exc.message}"
                    await self.ops.finish(op, f"{exc.code}: {exc.message}; the reconciler retries it")
                    raise
                async with self.db.session() as session:
                    await session.execute(delete(ServiceModel).where(ServiceModel.id == service.id))
                await self.ops.finish(op, f"{exc.code}: {exc.message}")
                self._service_locks.pop(service.id, None)
                raise
            settled = {
                "controller_id": controller.id, "container_id": row.container_id, "gpu_devices": row.gpu_devices,
                "status": docker_status(status, "running"), "endpoint": endpoint_for(controller.url, ports).model_dump(),
                "status_message": None, "updated_at": utcnow(),
            }
            # One transaction: the container on its row, the service pointing at it, the operation ended.
            # The service's UPDATE is conditional (its epoch, no container yet), as good as its row lock.
            try:
                async with self.db.transaction() as tx:
                    if not await _settle_row(tx, row):
                        raise _Superseded
                    settled["health"] = row.health or "unknown"
                    if await tx.execute(_SETTLE_CREATED, {**settled, "service_id": service.id,
                                                          "at_epoch": service.epoch}) != 1:
                        raise _Superseded
                    await self.ops.finish_in(tx, op, controller_id=controller.id, container_id=row.container_id)
            except _Superseded:
                # Someone else finished (or deleted) this service meanwhile: ours would be a second copy.
                await self._discard(controller.id, row)
                await self.ops.finish(op, "SUPERSEDED: another operation completed this service first")
                raise Conflict("another operation completed this service first", code="CONCURRENT_CHANGE") from None
            except BaseException:
                op.status, op.error, op.finished_at = "running", None, None  # not ended: _guarded records it
                raise
            self.ops.finished(op)
            for key, value in settled.items():
                setattr(service, key, value)
            return service

    # ----------------------------------------------- start / stop / restart

    async def lifecycle(self, user: UserModel, service_id: str, action: str,
                        wait: bool = True) -> ServiceModel | OperationModel:
        async with self.db.session() as session:
            service = await self.get_for(session, user, service_id)
        op = await self.ops.begin(
            action, user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id, details={"epoch": service.epoch},
        )
        work = self._guarded(op, self._run_lifecycle(service.id, action, op))
        if not wait:
            self.spawn(work)
            return op
        return await work

    async def _run_lifecycle(self, service_id: str, action: str, op: OperationModel) -> ServiceModel:
        async with self._service_locks[service_id]:
            async with self.db.session() as session:
                service = await session.get(ServiceModel, service_id)
                if service is None:
                    await self.ops.finish(op, "service was deleted")
                    raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")
                service.desired_state = "stopped" if action == "stop" else "running"
            try:
                if service.container_id is None or service.controller_id is None:
                    raise Conflict("service has no container", code="NO_CONTAINER")
                async with self.db.session() as session:
                    controller = await get_controller(session, service.controller_id)
                params = {"timeout": 10} if action == "stop" else {}
                try:
                    await self.client.action(
                        controller.id, controller.url, service.container_id, action, epoch=service.epoch, **params
                    )
                except ControllerRejected as exc:
                    if exc.status_code != 404 or action == "stop":
                        raise
                    # The container is gone (removed by hand, or its server was rebuilt): make a new one.
                    await self._replace(service, ServiceSpec.model_validate(service.spec), op)
                    return await self._reload(service_id)
                info = await self.client.inspect(controller.id, controller.url, service.container_id)
            except HubError as exc:
                await self.ops.finish(op, f"{exc.code}: {exc.message}")
                raise
            async with self.db.session() as session:
                fresh = await session.get(ServiceModel, service_id)
                assert fresh is not None
                fresh.status = docker_status(info.status, fresh.desired_state)
                fresh.endpoint = endpoint_for(controller.url, info.ports).model_dump() if info.status == "running" else None
                fresh.status_message = None
                await session.execute(
                    ContainerRegistryModel.__table__.update()
                    .where(ContainerRegistryModel.container_id == service.container_id)
                    .values(status=info.status)
                )
            await self.ops.finish(op)
            return fresh

    async def _reload(self, service_id: str) -> ServiceModel:
        service = await self._reload_or_none(service_id)
        if service is None:
            raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")
        return service

    # ------------------------------------------- redeploy: update, rollback, migrate

    @staticmethod
    async def _claim_epoch_in(tx: Tx, service_id: str, seen: int) -> None:
        """Take the next epoch (``seen + 1``) in the caller's transaction, or fail if another operation
        (maybe on another replica) took it first."""
        if await tx.execute(_CLAIM_EPOCH, {"service_id": service_id, "seen": seen, "next_epoch": seen + 1,
                                           "updated_at": utcnow()}) != 1:
            raise Conflict("another operation changed the service meanwhile; retry", code="CONCURRENT_CHANGE")

    async def _resume_or_deploy(self, service: ServiceModel, spec: ServiceSpec, exclude: frozenset[str],
                                target: str | None, unfinished: Unfinished | None = None,
                                ) -> tuple[ContainerRegistryModel, ControllerModel, dict[str, int | None], str, int]:
        """Finish a create that an interrupted operation began, or claim a new epoch and deploy.

        A ``creating`` row at the service's current epoch is the create of an
        operation that did not finish (its hub stopped): repeating that create is
        idempotent on the controller, so the container is made at most once.
        ``unfinished``: those rows, when the caller read them already.
        """
        if unfinished is None:
            async with self.db.transaction() as tx:
                unfinished = await _unfinished(tx, service, sqlite=self.db.is_sqlite)
        pending, healthy = unfinished
        for row in pending:
            controller = healthy.get(row.controller_id)
            usable = (
                row.epoch == service.epoch and controller is not None and row.controller_id not in exclude
                and (target is None or row.controller_id == target)
            )
            if usable and controller is not None:
                config = self._container_config(service, spec, row.epoch, tuple(str(g) for g in row.gpu_devices),
                                               row.container_name)
                try:
                    created = await self.client.create(controller.id, controller.url, config)
                except HubError as exc:
                    log.warning("could not resume the create of %s on %s: %s", service.id, controller.id, exc.message)
                else:
                    row.container_id, row.container_name = created.container_id, created.name
                    row.status = created.status
                    return row, controller, created.ports, created.status, row.epoch
            # Its container, if the controller made one, has no row now: the controller removes it as an orphan.
            async with self.db.session() as session:
                await session.execute(delete(ContainerRegistryModel).where(ContainerRegistryModel.id == row.id))
        # The next epoch is claimed in the transaction that holds the placement's row: no epoch is used
        # up when nothing can run the service, and a move costs one transaction less.
        epoch = service.epoch + 1

        async def claim(tx: Tx) -> None:
            await self._claim_epoch_in(tx, service.id, service.epoch)

        first = await self._reserve(service, spec, exclude, target, epoch, claim)
        row, controller, ports, status = await self._deploy(service, spec, epoch, exclude, target, first=first)
        return row, controller, ports, status, epoch

    async def _await_healthy(self, controller: ControllerModel, container_id: str,
                             timeout: float | None = None, backoff: bool = False) -> None:
        """Wait until the controller's probe passes on the new container (asking every 0.25 s, or,
        with ``backoff``, so for 2 s and then ever less often, up to every 2 s)."""
        timeout = timeout or self.settings.health_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        last = "unknown"
        pause = 0.25
        slow_after = asyncio.get_running_loop().time() + 2.0
        if backoff:
            await asyncio.sleep(pause)  # a container that just started has not passed a probe yet
        while asyncio.get_running_loop().time() < deadline:
            info = await self.client.inspect(controller.id, controller.url, container_id)
            last = f"{info.status}/{info.health}"
            if info.status == "running" and info.health == "healthy":
                return
            await asyncio.sleep(pause)
            if backoff and asyncio.get_running_loop().time() > slow_after:
                pause = min(pause * 2, 2.0)
        raise Conflict(
            f"the new container did not pass its health check within {timeout:g}s ({last}); "
            "the old one keeps serving",
            code="HEALTH_CHECK_FAILED",
        )

    async def _replace(self, service: ServiceModel, spec: ServiceSpec, op: OperationModel,
                       exclude: frozenset[str] = frozenset(), target: str | None = None,
                       version: int | None = None, reason: str | None = None,
                       wait_healthy: bool = True, unfinished: Unfinished | None = None) -> ServiceModel:
        """Start a copy at a new epoch, wait until it runs (and is healthy, if it has a check),
        then retire the old one: no gap for a planned move.

        Without ``wait_healthy`` (failover: the old copy is gone anyway) the new copy is
        recorded as soon as it runs, whatever its check says; its probe is then followed for a
        short while (``_follow_health``) so the service reads healthy as soon as it is, not a
        heartbeat later.

        The old copy's registry row becomes ``stale`` in the same transaction
        that makes the new one current, so from then on every heartbeat of its
        controller tells it to stop that copy, even if the hub dies right after.
        """
        prior_status = service.status
        try:
            row, controller, ports, status, epoch = await self._resume_or_deploy(service, spec, exclude, target,
                                                                                 unfinished)
        except HubError:
            await self._restore_status(service.id, prior_status)
            raise
        healthy = False
        if wait_healthy and spec.health_check is not None and row.container_id:
            try:
                await self._await_healthy(controller, row.container_id)
                healthy = True
            except HubError:
                await self._remove_container(controller.id, row.container_id)
                async with self.db.session() as session:
                    await session.execute(delete(ContainerRegistryModel).where(ContainerRegistryModel.id == row.id))
                await self._restore_status(service.id, prior_status)
                raise
        details = self._moved_details(epoch, service.controller_id, controller, reason)
        ended = False
        try:
            async with self.db.transaction() as tx:
                # Locked until commit: no other operation can claim an epoch between the check and the write.
                locked = await tx.first(_LOCK_SERVICE, {"service_id": service.id})
                if locked is None or locked["epoch"] != epoch or not await _settle_row(tx, row):
                    raise _Superseded
                fresh = await self._finalize(tx, locked, service.owner, row, controller, spec, op, epoch, ports,
                                             status, version, reason, healthy)
                # The old copies whose controller answers now, read once: removed after the commit. None to
                # remove (a failover's is on a lost controller) and nothing to stop: the operation ends in
                # this transaction too.
                removable = _removable(await tx.all(_STALE_COPIES, {"service_id": service.id}))
                if fresh.desired_state != "stopped" and not removable:
                    await self.ops.finish_in(tx, op, controller_id=controller.id, container_id=row.container_id,
                                             details={**details, "old_containers_removed": 0})
                    ended = True
        except _Superseded:
            # A newer epoch was claimed meanwhile (another replica's move): it wins, ours goes.
            await self._discard(controller.id, row)
            raise Conflict("another operation changed the service meanwhile; retry",
                           code="CONCURRENT_CHANGE") from None
        except BaseException:
            if ended:
                op.status, op.error, op.finished_at = "running", None, None  # not ended: _guarded records it
            raise
        if ended:
            self.ops.finished(op)
        else:
            await self._after_finalize(fresh, row, controller, op, epoch, details, removable)
        if not healthy and spec.health_check is not None and row.container_id and fresh.desired_state == "running":
            self._follow_health(fresh.id, epoch, controller, row)
        return await self._reload(service.id) if fresh.desired_state == "stopped" else fresh

    def _follow_health(self, service_id: str, epoch: int, controller: ControllerModel,
                       row: ContainerRegistryModel) -> None:
        """Record the new copy healthy when its probe first passes, if that is within
        FAILOVER_HEALTH_WAIT; in a task of its own, at most HEALTH_FOLLOWERS at once (beyond, and
        after, its controller's heartbeats report its health)."""
        if len(self._followers) >= HEALTH_FOLLOWERS or row.container_id is None:
            return
        container_id = row.container_id

        async def follow() -> None:
            await self._await_healthy(controller, container_id, FAILOVER_HEALTH_WAIT, backoff=True)
            now = utcnow()
            async with self.db.transaction() as tx:
                # Each statement only its own values: on SQLite, SQLAlchemy would SET a value named after a column.
                await tx.execute(_FOLLOWED_SERVICE, {"service_id": service_id, "at_epoch": epoch,
                                                     "copy_id": container_id, "updated_at": now})
                await tx.execute(_FOLLOWED_ROW, {"row_id": row.id, "copy_id": container_id, "updated_at": now})

        self.spawn(follow(), self._followers)

    @staticmethod
    async def _finalize(tx: Tx, locked: Mapping[str, Any], owner: UserModel, row: ContainerRegistryModel,
                        controller: ControllerModel, spec: ServiceSpec, op: OperationModel, epoch: int,
                        ports: dict[str, int | None], status: str, version: int | None, reason: str | None,
                        healthy: bool) -> ServiceModel:
        """Make the new copy current and every other copy stale, in the caller's transaction, which holds
        the service's row lock (``locked``, the row as it read it); the service as it now is, an object of
        no session."""
        now = utcnow()
        changes: dict[str, Any] = {
            "epoch": epoch, "controller_id": controller.id, "container_id": row.container_id,
            "gpu_devices": row.gpu_devices, "spec": spec.model_dump(mode="json"),
            "health": "healthy" if healthy else row.health or "unknown", "version": locked["version"],
            "status": docker_status(status, "running"), "endpoint": endpoint_for(controller.url, ports).model_dump(),
            "status_message": None, "updated_at": now,
        }
        if version is not None:
            # Numbered here, under the service's row lock: two redeploys that planned the same number
            # (concurrent calls, or two replicas) get consecutive ones.
            latest = await tx.first(_LATEST_VERSION, {"service_id": locked["id"]})
            changes["version"] = version = max(version, ((latest or {}).get("latest") or 0) + 1)
            await insert_row(tx, DeploymentHistoryModel(
                service_id=locked["id"], version=version, spec=changes["spec"], image=spec.image,
                reason=reason or op.operation, actor=op.actor, created_at=now,
            ))
        await tx.execute(_FINALIZE, {**changes, "service_id": locked["id"]})
        await tx.execute(_RETIRE_OTHERS, {"of_service": locked["id"], "keep_row": row.id, "updated_at": now})
        fresh = ServiceModel(**{**dict(locked), **changes})
        fresh.owner = owner
        return fresh

    @staticmethod
    def _moved_details(epoch: int, old_controller_id: str | None, controller: ControllerModel,
                       reason: str | None) -> dict[str, Any]:
        details: dict[str, Any] = {"epoch": epoch, "from_controller": old_controller_id,
                                   "to_controller": controller.id}
        if reason:
            details["reason"] = reason
        return details

    async def _after_finalize(self, fresh: ServiceModel, row: ContainerRegistryModel, controller: ControllerModel,
                              op: OperationModel, epoch: int, details: dict[str, Any],
                              removable: list[Mapping[str, Any]]) -> None:
        """Retire the old copies (``removable``: those on controllers that answer), keep a stopped service
        stopped, and close the operation."""
        details = {**details, "old_containers_removed": await self._retire_stale(removable)}
        if fresh.desired_state == "stopped":
            await self.client.action(controller.id, controller.url, row.container_id or "", "stop", epoch=epoch)
            async with self.db.session() as session:
                stopped = await session.get(ServiceModel, fresh.id)
                assert stopped is not None
                stopped.status, stopped.endpoint = "stopped", None
        await self.ops.finish(op, controller_id=controller.id, container_id=row.container_id, details=details)

    async def _discard(self, controller_id: str, row: ContainerRegistryModel) -> None:
        """Remove a container we made but must not keep, and its row (else its heartbeat removes it)."""
        if row.container_id:
            await self._remove_container(controller_id, row.container_id)
        async with self.db.session() as session:
            await session.execute(delete(ContainerRegistryModel).where(ContainerRegistryModel.id == row.id))

    async def _restore_status(self, service_id: str, prior: str) -> None:
        """After a failed move the old copy (if any) keeps serving; say what the service is."""
        async with self.db.session() as session:
            fresh = await session.get(ServiceModel, service_id)
            if fresh is None:
                return
            if fresh.container_id is None:
                fresh.status = "lost" if fresh.desired_state == "running" else "stopped"
            elif prior in ("migrating", "pending"):
                fresh.status = "lost"
            else:
                fresh.status = prior

    async def _retire_stale(self, removable: list[Mapping[str, Any]]) -> int:
        """Remove superseded copies on controllers that answer (``_removable``); the others are told on their
        next heartbeat."""
        removed = 0
        for copy in removable:
            row_id, controller_id, container_id = copy["id"], copy["controller_id"], copy["container_id"]
            if await self._remove_container(controller_id, container_id):
                removed += 1
                async with self.db.session() as session:
                    await session.execute(delete(ContainerRegistryModel).where(ContainerRegistryModel.id == row_id))
        return removed

    async def _remove_container(self, controller_id: str, container_id: str) -> bool:
        async with self.db.session() as session:
            controller = await session.get(ControllerModel, controller_id)
        if controller is None:
            return False
        try:
            await self.client.action(controller.id, controller.url, container_id, "delete", force="true")
            return True
        except ControllerRejected as exc:
            return exc.status_code == 404
        except HubError as exc:
            log.warning("could not remove old container %s on %s: %s", container_id, controller_id, exc.message)
            return False

    # ------------------------------------------------- moves the reconciler asks for

    async def move(self, service_id: str, reason: str, exclude: frozenset[str] = frozenset(),
                   expected_controller: str | None = None) -> ServiceModel | None:
        """Move a service for the reconciler: off a lost or draining controller, away from a
        container that stays unhealthy, or to finish what an interrupted operation began.

        Returns None when there was nothing (left) to do.
        """
        async with self._service_locks[service_id]:
            if reason == "resume":
                service = await self._reload_or_none(service_id)
                if service is None or service.controller_id != expected_controller:
                    return None
                if service.status not in UNSETTLED or await self._still_serving(service):
                    return None
            operation = {"controller_lost": "failover", "resume": "recover"}.get(reason, "migrate")
            # One transaction of Core statements: the service read, its operation begun, its unfinished
            # creates read (in ORM sessions, a third of a move's CPU).
            async with self.db.transaction() as tx:
                found = await tx.first(_MOVED, {"service_id": service_id})
                if found is None or found["controller_id"] != expected_controller:
                    return None
                values = dict(found)
                owner = UserModel(id=values["owner_id"], username=values.pop("owner_username"),
                                  is_admin=values.pop("owner_is_admin"))
                service = ServiceModel(**values)
                service.owner = owner
                op = self.ops.new(
                    operation, "system", service_id=service.id, controller_id=service.controller_id,
                    container_id=service.container_id,
                    details={"reason": reason, "from_epoch": service.epoch, "from_controller": service.controller_id},
                )
                await insert_row(tx, op)
                unfinished = await _unfinished(tx, service, sqlite=self.db.is_sqlite)
            self.ops.active.add(op.id)
            # No request carries a move: its operation id tags its log lines and its controller calls
            # (the reconciler runs each move in a task of its own, so this stays within it).
            bind_request_id(op.id)
            try:
                fresh = await self._guarded(op, self._replace(
                    service, ServiceSpec.model_validate(service.spec), op, exclude=exclude, reason=reason,
                    wait_healthy=reason in ("drain", "unhealthy"), unfinished=unfinished,
                ))
            except HubError as exc:
                if op.status == "running":
                    await self.ops.finish(op, f"{exc.code}: {exc.message}")
                raise
            if reason == "controller_lost":
                self.metrics.failovers.inc()
            return fresh

    async def _still_serving(self, service: ServiceModel) -> bool:
        """A service marked lost whose container turned out fine (its controller came back in time)."""
        if service.status != "lost" or service.container_id is None or service.controller_id is None:
            return False
        async with self.db.session() as session:
            row = await session.scalar(
                select(ContainerRegistryModel).where(
                    ContainerRegistryModel.service_id == service.id,
                    ContainerRegistryModel.container_id == service.container_id,
                )
            )
            controller = await session.get(ControllerModel, service.controller_id)
            if row is None or row.status != "running" or controller is None or controller.status != "healthy":
                return False
            fresh = await session.get(ServiceModel, service.id)
            assert fresh is not None
            fresh.status = "unhealthy" if row.health == "unhealthy" else "running"
        return True

    async def _reload_or_none(self, service_id: str) -> ServiceModel | None:
        async with self.db.session() as session:
            return await session.get(ServiceModel, service_id)

    async def redeploy(self, user: UserModel, service_id: str, operation: str, *, spec: ServiceSpec | None = None,
                       rollback_to: int | None = None, exclude_current: bool = False, target: str | None = None,
                       wait: bool = True) -> ServiceModel | OperationModel:
        async with self.db.session() as session:
            service = await self.get_for(session, user, service_id)
            version: int | None = None
            if rollback_to is not None:
                past = await session.scalar(
                    select(DeploymentHistoryModel).where(
                        DeploymentHistoryModel.service_id == service.id, DeploymentHistoryModel.version == rollback_to
                    )
                )
                if past is None:
                    raise NotFound(f"service has no version {rollback_to}", code="VERSION_NOT_FOUND")
                spec = ServiceSpec.model_validate(past.spec)
            if spec is not None:
                latest = await session.scalar(
                    select(func.max(DeploymentHistoryModel.version)).where(DeploymentHistoryModel.service_id == service.id)
                )
                version = (latest or 0) + 1
            if target is not None:
                await get_controller(session, target)
        if spec is not None:
            # A rollback too: the policy may have tightened since that version ran.
            self._check_policy(spec)
        op = await self.ops.begin(
            operation, user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id,
            details={"from_epoch": service.epoch, **({"version": version} if version else {}),
                     **({"rollback_to": rollback_to} if rollback_to else {})},
        )
        exclude = frozenset({service.controller_id}) if exclude_current and service.controller_id else frozenset()
        work = self._guarded(op, self._run_redeploy(service.id, spec, op, exclude, target, version))
        if not wait:
            self.spawn(work)
            return op
        return await work

    async def _run_redeploy(self, service_id: str, spec: ServiceSpec | None, op: OperationModel,
                            exclude: frozenset[str], target: str | None, version: int | None) -> ServiceModel:
        async with self._service_locks[service_id]:
            try:
                service = await self._reload(service_id)
                if target is not None and target == service.controller_id:
                    raise Conflict("the service already runs on that controller", code="SAME_CONTROLLER")
                if spec is None:
                    spec = ServiceSpec.model_validate(service.spec)
                return await self._replace(service, spec, op, exclude, target, version)
            except HubError as exc:
                if op.status == "running":
                    await self.ops.finish(op, f"{exc.code}: {exc.message}")
                raise

    async def update(self, user: UserModel, service_id: str, patch: ServicePatch,
                     wait: bool = True) -> ServiceModel | OperationModel:
        async with self.db.session() as session:
            service = await self.get_for(session, user, service_id)
        changes = patch.model_dump(mode="json", exclude_unset=True)
        if not changes:
            raise InvalidRequest("the patch changes nothing", code="EMPTY_PATCH")
        # A merge patch (RFC 7396) at the spec's structure: a field given as null goes back to its default,
        # and the sub-objects merge field by field ({"resources": {"cpu_limit": 1}} keeps the GPUs and memory).
        # The maps (env, labels, ports, volumes) are replaced whole: that is how a key is removed from them.
        for key in ("resources", "health_check"):
            if isinstance(service.spec.get(key), dict) and isinstance(changes.get(key), dict):
                changes[key] = {**service.spec[key], **changes[key]}
        merged = {key: value for key, value in {**service.spec, **changes}.items()
                  if not (key in changes and value is None)}
        try:
            spec = ServiceSpec.model_validate(merged)
        except ValidationError as exc:
            raise InvalidRequest("the patched spec is invalid",
                                 [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]) from None
        return await self.redeploy(user, service_id, "update", spec=spec, wait=wait)

    # ----------------------------------------------------------------- delete

    async def delete(self, user: UserModel, service_id: str) -> None:
        async with self.db.session() as session:
            service = await self.get_for(session, user, service_id)
        op = await self.ops.begin(
            "delete", user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id,
        )
        await self._guarded(op, self._run_delete(service, op))
        self._service_locks.pop(service.id, None)

    async def _run_delete(self, service: ServiceModel, op: OperationModel) -> None:
        async with self._service_locks[service.id]:
            async with self.db.session() as session:
                containers = list(
                    await session.execute(
                        select(ContainerRegistryModel.controller_id, ContainerRegistryModel.container_id).where(
                            ContainerRegistryModel.service_id == service.id
                        )
                    )
                )
            left: list[str] = []
            for controller_id, container_id in containers:
                if container_id is None:
                    continue
                async with self.db.session() as session:
                    controller = await session.get(ControllerModel, controller_id)
                if controller is None:
                    continue
                try:
                    await self.client.action(controller.id, controller.url, container_id, "delete", force="true")
                except ControllerRejected as exc:
                    if exc.status_code != 404:
                        await self.ops.finish(op, f"{exc.code}: {exc.message}")
                        raise
                except ControllerUnavailable:
                    # With the service gone, the container has no registry row: the controller is
                    # told to remove it (an orphan) on its next heartbeat, whenever it comes back.
                    left.append(controller_id)
            async with self.db.session() as session:
                await session.execute(delete(ServiceModel).where(ServiceModel.id == service.id))
            await self.ops.finish(op, details={"left_for_controller_cleanup": left} if left else None)

    # ----------------------------------------------------------------- status

    async def refresh(self, user: UserModel, service_id: str) -> ServiceModel:
        """The service with its status read from the controller, when it can be reached."""
        async with self.db.session() as session:
            service = await self.get_for(session, user, service_id)
            if service.controller_id is None or service.container_id is None:
                return service
            controller = await session.get(ControllerModel, service.controller_id)
        if controller is None:
            return service
        try:
            info = await self.client.inspect(controller.id, controller.url, service.container_id)
        except ControllerRejected as exc:
            if exc.status_code != 404:
                raise
            status, message, endpoint = "failed", "container not found on its controller", None
        except ControllerUnavailable as exc:
            async with self.db.session() as session:
                fresh = await session.get(ServiceModel, service_id)
                assert fresh is not None
                fresh.status_message = exc.message
            return fresh
        else:
            status = docker_status(info.status, service.desired_state)
            message = None if status in ("running", "stopped") else f"container is {info.status}"
            endpoint = endpoint_for(controller.url, info.ports).model_dump() if info.status == "running" else None
        async with self.db.session() as session:
            fresh = await session.get(ServiceModel, service_id)
            assert fresh is not None
            if fresh.epoch == service.epoch:
                fresh.status, fresh.status_message, fresh.endpoint = status, message, endpoint
        return fresh

    async def logs(self, user: UserModel, service_id: str, tail: int, follow: bool) -> str | ClosingStream:
        async with self.db.session() as session:
            service = await self.get_for(session, user, service_id)
            if service.container_id is None or service.controller_id is None:
                raise Conflict("service has no container yet", code="NO_CONTAINER")
            controller = await get_controller(session, service.controller_id)
        if not follow:
            return await self.client.logs(controller.id, controller.url, service.container_id, tail)
        # After the ownership check: another user's service is a 404 whatever the caller has open.
        release = self.log_streams.acquire(user.id, user.username)
        try:
            stream = await self.client.follow_logs(controller.id, controller.url, service.container_id, tail)
        except BaseException:
            release()
            raise
        return stream.on_close(release)

    # ------------------------------------------------------------------ drain

    async def drain(self, user: UserModel, controller_id: str, wait: bool = True) -> ControllerModel | OperationModel:
        """Disable the controller and have the reconciler move everything off it.

        The reconciler (on whichever replica runs the loops) does the moves and
        finishes this operation, so a drain survives a hub restart half-way.
        The call waits up to ``drain_timeout`` and then answers with the
        operation still running (202) rather than failing.
        """
        async with self.db.session() as session:
            controller = await get_controller(session, controller_id)
            controller.draining = True
            controller.enabled = False
            count = await session.scalar(
                select(func.count()).where(ServiceModel.controller_id == controller_id)
            ) or 0
            # With the flag, so the reconciler never finishes a drain whose operation is not there yet.
            op = self.ops.add(session, "drain", user.username, controller_id=controller_id,
                              details={"services": count})
        self.placement.stale()
        if not wait:
            return op
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        while asyncio.get_running_loop().time() < deadline:
            async with self.db.session() as session:
                fresh = await get_controller(session, controller_id)
                if not fresh.draining:
                    return fresh
            await asyncio.sleep(0.2)
        return op


def _reads(db: Database) -> Gathered:
    """The status reads (ServiceManager.read, read_json): the services of a list of ids with their owners'
    names, in one statement built once (so its cache key is computed once) for the calls that come together."""
    return Gathered(db, select(*ServiceModel.__table__.c, UserModel.username.label("owner_name"))
                    .join_from(ServiceModel, UserModel, ServiceModel.owner_id == UserModel.id)
                    .where(any_of(ServiceModel.id, "keys", sqlite=db.is_sqlite)), "id")
