"""The leader's move back from CPU fallback (``GpuReturn``): a copy that runs its spec's CPU variant because
no GPU fitted goes back to a GPU once one is free, by a planned move (the new copy healthy and routed
before the old one goes: no request lost).

Invariant: at most ``MMANAGER_GPU_RETURN_BATCH`` such moves start per look, one per service at a time,
each only where a GPU is still free after the ones started before it in that look (counted on a scratch
copy of the placement view); a move that failed (the GPU taken meanwhile) is not tried again for that
service before a growing pause, and a service found off its GPU again soon after a move back (moved to
its fallback once more) waits a growing cool-down, so the two moves never loop. A look that finds no copy
on a fallback makes the next ``QUIET_LOOKS - 1`` looks do nothing (unless this hub has placed a fallback
since: ``ServiceManager.fallbacks_placed``); while some copy is on one, a look reads
the placement view (refreshed when stale) and, if a GPU has room, the registry once.
``MMANAGER_GPU_RETURN_INTERVAL=0`` turns the move back off.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Text, bindparam, cast, select

from hub.config import HubSettings
from hub.db import Database
from hub.errors import HubError
from hub.models import ContainerRegistryModel, ServiceModel
from hub.scheduler.placement import CandidateIndex, ControllerView
from hub.schemas import ServiceSpec
from hub.services.lifecycle import ServiceManager
from hub.services.lifecycle.deploy import placement_request
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

_REGISTRY = ContainerRegistryModel.__table__
_SERVICES = ServiceModel.__table__
# The serving copies that hold no GPU of services whose spec asks for one: those running a CPU variant
# (``on_fallback``), oldest first.
_ON_FALLBACK = (
    select(_REGISTRY.c.id, _REGISTRY.c.service_id, _SERVICES.c.spec)
    .join(_SERVICES, _SERVICES.c.id == _REGISTRY.c.service_id)
    .where(_REGISTRY.c.serving.is_(True), _REGISTRY.c.status == "running",
           cast(_REGISTRY.c.gpu_devices, Text) == "[]", _SERVICES.c.desired_state == "running",
           _SERVICES.c.spec[("resources", "gpu_required")].as_boolean().is_(True))
    .order_by(_REGISTRY.c.updated_at)
    .limit(bindparam("most")))
# Seconds before a service whose move back failed is tried again: doubled at each failure, up to the cap.
RETRY_FIRST = 15.0
RETRY_CAP = 300.0
# A service found on its fallback again within BOUNCE_WINDOW seconds of a move back is left there for a
# cool-down: COOL_FIRST seconds, doubled at each such bounce, up to COOL_CAP.
BOUNCE_WINDOW = 600.0
COOL_FIRST = 60.0
COOL_CAP = 3600.0
# After a look that finds no copy on a fallback, this many looks in all pass before the registry is read again.
QUIET_LOOKS = 6


def gpu_room(view: ControllerView) -> bool:
    """Could the controller take a GPU ask at all: placeable, with a GPU not held whole."""
    return bool(view.gpus) and view.enabled and view.healthy and not view.draining and \
        len(view.gpus_used) < len(view.gpus)


class GpuReturn(LoopService):
    name = "gpu-return"

    def __init__(self, db: Database, services: ServiceManager, settings: HubSettings) -> None:
        super().__init__(settings.gpu_return_interval)
        self.db = db
        self.services = services
        self.batch = settings.gpu_return_batch
        self._moving: set[str] = set()
        # Service id -> (when it may be tried again, the pause after its next failure).
        self._retry: dict[str, tuple[float, float]] = {}
        # Service id -> when a copy of it was last moved back, and its other copies on a fallback then;
        # and the cool-down its next bounce gets.
        self._returned: dict[str, tuple[float, frozenset[str]]] = {}
        self._cool: dict[str, float] = {}
        # Whether the last read found copies on a fallback (unknown at first: the view is looked at first);
        # the looks still to skip since one found none.
        self._some = True
        self._quiet = 0
        self._placed_seen = 0

    def start(self) -> None:
        if self.interval > 0:
            super().start()

    async def _rows(self) -> list[dict[str, object]]:
        self._placed_seen = self.services.fallbacks_placed
        rows = [dict(row) for row in await self.db.all(_ON_FALLBACK, {"most": self.batch * 4})]
        self._some = bool(rows)
        if not rows:
            self._quiet = QUIET_LOOKS - 1
        return rows

    async def run_once(self) -> None:
        if self._quiet > 0 and self.services.fallbacks_placed == self._placed_seen:
            self._quiet -= 1
            return
        self._quiet = 0
        rows = None if self._some else await self._rows()
        if rows is not None and not rows:
            return
        index = await self.services.placement.index()
        if not any(gpu_room(view) for view in index.views()):
            return
        if rows is None:
            rows = await self._rows()
        now = time.monotonic()
        self._forget_returns(now)
        # The moves started in this look count as placed: each takes a GPU the next may not.
        scratch = CandidateIndex(index.views())
        on_cpu: dict[str, set[str]] = {}
        for row in rows:
            on_cpu.setdefault(str(row["service_id"]), set()).add(str(row["id"]))
        started = 0
        for row in rows:
            if started >= self.batch:
                break
            service_id = str(row["service_id"])
            if service_id in self._moving or self._retry.get(service_id, (0.0, 0.0))[0] > now:
                continue
            if self._bounced(service_id, on_cpu[service_id], now):
                continue
            spec = ServiceSpec.model_validate(row["spec"])
            if spec.health_check is None:
                # Its fallback cleared with its health check: a move back could route a copy still loading.
                continue
            request = placement_request(spec)
            # A look at the view, no hold: the move places for itself (and fails if the GPU went meanwhile).
            decision = scratch.place(request)
            if not decision.placed:
                continue
            assert decision.controller_id is not None
            scratch.reserve(decision.controller_id, request.memory, request.cpu, decision.gpu_devices,
                            decision.gpu_memory)
            self._start(service_id, str(row["id"]), frozenset(on_cpu[service_id]))
            started += 1

    def _forget_returns(self, now: float) -> None:
        for service_id, (at, _) in list(self._returned.items()):
            if now - at >= BOUNCE_WINDOW:
                # Stayed on its GPU: a later bounce starts from the first cool-down again.
                del self._returned[service_id]
                self._cool.pop(service_id, None)

    def _bounced(self, service_id: str, on_cpu: set[str], now: float) -> bool:
        """Was a copy of the service moved back within ``BOUNCE_WINDOW``, and has it a copy on a fallback
        now that was not one then (moved off its GPU again)? Then it cools down."""
        returned = self._returned.get(service_id)
        if returned is None or on_cpu <= returned[1]:
            return False
        del self._returned[service_id]
        cool = self._cool.get(service_id, COOL_FIRST)
        self._cool[service_id] = min(cool * 2, COOL_CAP)
        self._retry[service_id] = (now + cool, RETRY_FIRST / 2)
        log.warning("service %s is off its GPU again soon after its move back: left on its CPU fallback for "
                    "%.0f s", service_id, cool)
        return True

    def _start(self, service_id: str, row_id: str, on_cpu: frozenset[str]) -> None:
        self._moving.add(service_id)

        async def move() -> None:
            try:
                if await self.services.back_to_gpu(service_id, row_id) is not None:
                    log.info("service %s moved back from its CPU fallback to a GPU", service_id)
                    self._returned[service_id] = (time.monotonic(), on_cpu - {row_id})
                self._retry.pop(service_id, None)
            except HubError as exc:
                pause = self._retry.get(service_id, (0.0, RETRY_FIRST / 2))[1] * 2
                self._retry[service_id] = (time.monotonic() + pause, min(pause, RETRY_CAP))
                log.warning("service %s could not move back to a GPU: %s", service_id, exc.message)
            finally:
                self._moving.discard(service_id)

        self.services.spawn(move())
