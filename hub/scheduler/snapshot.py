"""The controllers as placement sees them: a snapshot of the database (``load_views``) and the cache
that keeps one in memory between snapshots (``PlacementCache``), with every placement this process
made since (``Held``).

Invariant: a placement this process made is counted in its view from the moment it is decided until a
snapshot taken after its row was committed counts it instead, so two placements here never both take the
last slot of a controller; another replica's are seen with the next snapshot, at most ``PLACEMENT_MAX_AGE``
seconds later. ``hub.scheduler.placement`` stays pure: this module is its I/O.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from sqlalchemy import Text, cast, func, or_, select, union_all

from hub.db import Database
from hub.models import ContainerRegistryModel, ControllerModel, JobAttemptModel, JobModel, ServiceModel
from hub.scheduler.placement import (
    GIB,
    NO_GPU_SHARES,
    CandidateIndex,
    ControllerView,
    Placement,
    PlacementRequest,
)
from mmanager.wire import parse_memory

_REGISTRY = ContainerRegistryModel.__table__
_CONTROLLERS = ControllerModel.__table__
_SERVICES = ServiceModel.__table__
_ATTEMPTS = JobAttemptModel.__table__
_JOBS = JobModel.__table__
# A batch job's attempt holds its controller's resources while it is starting or running, as a registry row does.
_LIVE_ATTEMPT = or_(_ATTEMPTS.c.status == "starting", _ATTEMPTS.c.status == "running")
# Placement reads the controllers from a snapshot at most this old (plus this process's own reservations
# since); older, a placement waits for a fresh one. In between, one is taken in the background.
PLACEMENT_MAX_AGE = 1.0
PLACEMENT_REFRESH_AFTER = 0.5

# The placement snapshot's three reads, built once (``load_views``).
_VIEW_CONTROLLERS = select(*(_CONTROLLERS.c[name] for name in (
    "id", "url", "server_type", "enabled", "draining", "status", "priority", "weight", "max_containers",
    "max_containers_cap", "containers_running", "cpu_cores", "memory_total_gb", "gpus")),
    # One flag of the last health report, not the document: whether it runs golden-inference probes.
    _CONTROLLERS.c.health_data[("capabilities", "golden_probes")].as_boolean().label("golden_probes"))
_HOLDERS = union_all(
    select(_REGISTRY.c.controller_id, _REGISTRY.c.memory_bytes, _REGISTRY.c.cpu_limit),
    select(_ATTEMPTS.c.controller_id, _ATTEMPTS.c.memory_bytes, _ATTEMPTS.c.cpu_limit).where(_LIVE_ATTEMPT),
).subquery("holders")
_VIEW_USAGE = (select(_HOLDERS.c.controller_id, func.count().label("n"),
                      func.coalesce(func.sum(_HOLDERS.c.memory_bytes), 0).label("memory"),
                      func.coalesce(func.sum(_HOLDERS.c.cpu_limit), 0.0).label("cpu"))
               .group_by(_HOLDERS.c.controller_id))
# A row's GPUs; shared (its service's ``resources.gpu_memory``, the budget on each) or else held whole.
_VIEW_GPUS = (select(_REGISTRY.c.controller_id, _REGISTRY.c.gpu_devices,
                     _SERVICES.c.spec[("resources", "gpu_memory")].as_string().label("gpu_memory"))
              .join(_SERVICES, _SERVICES.c.id == _REGISTRY.c.service_id)
              .where(cast(_REGISTRY.c.gpu_devices, Text) != "[]")
              .union_all(select(_ATTEMPTS.c.controller_id, _ATTEMPTS.c.gpu_devices,
                                _JOBS.c.spec[("resources", "gpu_memory")].as_string().label("gpu_memory"))
                         .join(_JOBS, _JOBS.c.id == _ATTEMPTS.c.job_id)
                         .where(_LIVE_ATTEMPT, cast(_ATTEMPTS.c.gpu_devices, Text) != "[]")))


async def load_views(db: Database, images: Callable[[str], frozenset[str] | None] | None = None,
                     ) -> tuple[list[ControllerView], dict[str, str]]:
    """Every controller as placement sees it, with what the registry reserves on it, and the URLs (also the
    admin's ``/resources/usage``); ``images``: the image keys each holds, None when it reported none
    (``hub.services.locality``).

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
    shared: dict[str, dict[str, int]] = {}
    for r in gpu_rows:
        if r["gpu_devices"]:
            if r["gpu_memory"]:
                budget, on = parse_memory(r["gpu_memory"]), shared.setdefault(r["controller_id"], {})
                for d in r["gpu_devices"]:
                    on[str(d)] = on.get(str(d), 0) + budget
            else:
                gpus_used.setdefault(r["controller_id"], set()).update(str(d) for d in r["gpu_devices"])
    views = []
    for c in controllers:
        cid = c["id"]
        n, memory, cpu = usage.get(cid, (0, 0, 0.0))
        views.append(ControllerView(
            id=cid, server_type=c["server_type"], enabled=c["enabled"], draining=c["draining"],
            healthy=c["status"] == "healthy", priority=c["priority"], weight=c["weight"],
            # The controller's own limit, or the admin's cap when smaller (PATCH /api/admin/controllers/{id}).
            max_containers=min(c["max_containers"], c["max_containers_cap"] or c["max_containers"]),
            containers=max(n, c["containers_running"]), cpu_cores=c["cpu_cores"],
            cpu_reserved=float(cpu), memory_total=int(c["memory_total_gb"] * GIB), memory_reserved=int(memory),
            gpus=tuple(str(g.get("index")) for g in c["gpus"] or ()),
            gpus_used=frozenset(gpus_used.get(cid, ())), golden_probes=bool(c["golden_probes"]),
            gpu_models=tuple(str(g.get("model") or "") for g in c["gpus"] or ()),
            gpu_memory=tuple(int(g.get("memory_mb") or 0) * 1024**2 for g in c["gpus"] or ()),
            gpu_shared=MappingProxyType(shared[cid]) if cid in shared else NO_GPU_SHARES,
            images=images(cid) if images is not None else None,
        ))
    return views, {c["id"]: c["url"] for c in controllers}


class ImageLookup(Protocol):
    """What placement reads of the image sets (``hub.services.locality.ImageSets``)."""

    def keys(self, controller_id: str) -> frozenset[str] | None: ...

    def holders(self, key: str) -> Iterable[str]: ...

    def retain(self, controller_ids: Collection[str], before: float) -> None: ...


@dataclass(slots=True, eq=False)
class Held:
    """One placement this process made: counted in its view until a snapshot taken after its row was
    committed counts it instead."""

    controller_id: str
    memory: int
    cpu: float
    gpus: tuple[str, ...]
    committed_at: float | None = None
    # The VRAM budget on each of ``gpus`` when they are shared; 0: held whole.
    gpu_memory: int = 0
    # The placement's reason beyond load (``Placement.reason``), for the operation's details.
    reason: str = ""


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
                 refresh_after: float = PLACEMENT_REFRESH_AFTER, avoid_for: float = 6.0,
                 images: ImageLookup | None = None) -> None:
        self.db = db
        # What each controller's heartbeats say it holds, for image locality (hub.services.locality).
        self.images = images
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
        # so it costs at most a tenth of the time however big the fleet.
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
            images = self.images
            views, urls = await load_views(self.db, images.keys if images is not None else None)
            if images is not None:
                # Controllers gone from the database lose their image sets (beats before this snapshot).
                images.retain({v.id for v in views}, started)
            # A row committed before this snapshot's reads began is in it; the others are added on top.
            self._held = {h for h in self._held if h.committed_at is None or h.committed_at >= started}
            avoided = {cid for cid, until in self._avoid.items() if until > started}
            self._avoid = {cid: self._avoid[cid] for cid in avoided}
            index = CandidateIndex(views, images.holders if images is not None else None)
            for cid in avoided:
                index.forget(cid)
            for h in self._held:
                index.reserve(h.controller_id, h.memory, h.cpu, h.gpus, h.gpu_memory)
            self._index, self.urls, self._taken_at = index, urls, started
            self._cost = time.monotonic() - started

    def hold(self, decision: Placement, request: PlacementRequest) -> Held:
        """Count a placement in the view at once (no await between a decision and this)."""
        assert self._index is not None and decision.controller_id is not None
        held = Held(decision.controller_id, request.memory, request.cpu, decision.gpu_devices,
                    gpu_memory=decision.gpu_memory, reason=decision.reason)
        self._held.add(held)
        self._index.reserve(held.controller_id, held.memory, held.cpu, held.gpus, held.gpu_memory)
        return held

    def committed(self, held: Held) -> None:
        held.committed_at = time.monotonic()

    def release(self, held: Held) -> None:
        """The placement's row is gone (or never committed). Counted in a snapshot already, it stays
        counted there (a little too much) until the next one."""
        if held in self._held:
            self._held.discard(held)
            if self._index is not None:
                self._index.release(held.controller_id, held.memory, held.cpu, held.gpus, held.gpu_memory)

    def unfit(self, controller_id: str) -> None:
        """The database refused a placement there: out of the view until a fresh snapshot, taken next."""
        if self._index is not None:
            self._index.forget(controller_id)
        self._invalid_at = time.monotonic()

    def stale(self) -> None:
        """A controller's row changed here (enabled, disabled, drained): the next placement takes a fresh
        snapshot. Other replicas see the change with their next one (at most ``max_age`` later)."""
        self._invalid_at = time.monotonic()

    def images_changed(self, controller_id: str) -> None:
        """A controller's image set changed (its heartbeat said so): its view takes it in place, with no
        snapshot (a snapshot taken later reads the sets afresh)."""
        if self._index is not None and self.images is not None:
            self._index.set_images(controller_id, self.images.keys(controller_id))

    def avoid(self, controller_id: str) -> None:
        """A call could not reach it: no placements there for a while, unless nothing else fits."""
        self._avoid[controller_id] = time.monotonic() + self.avoid_for
        if self._index is not None:
            self._index.forget(controller_id)
