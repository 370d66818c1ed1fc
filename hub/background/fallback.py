"""The leader's move back from CPU fallback (``GpuReturn``): a copy that runs its spec's CPU variant because
no GPU fitted goes back to a GPU once one is free, by a planned move (the new copy healthy and routed
before the old one goes: no request lost).

Invariant: at most ``MMANAGER_GPU_RETURN_BATCH`` such moves start per look, one per service at a time;
a move that failed (the GPU taken meanwhile) is not tried again for that service before a growing pause.
A look costs nothing but a pass over the in-memory placement view while no GPU has room.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Text, bindparam, cast, select

from hub.config import HubSettings
from hub.db import Database
from hub.errors import HubError
from hub.models import ContainerRegistryModel, ServiceModel
from hub.scheduler.placement import ControllerView
from hub.schemas import ServiceSpec
from hub.services.lifecycle import ServiceManager
from hub.services.lifecycle.deploy import placement_request
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

_REGISTRY = ContainerRegistryModel.__table__
_SERVICES = ServiceModel.__table__
# The serving copies that hold no GPU of services that have a CPU fallback: those running it, oldest first.
_ON_FALLBACK = (
    select(_REGISTRY.c.id, _REGISTRY.c.service_id, _SERVICES.c.spec)
    .join(_SERVICES, _SERVICES.c.id == _REGISTRY.c.service_id)
    .where(_REGISTRY.c.serving.is_(True), _REGISTRY.c.status == "running",
           cast(_REGISTRY.c.gpu_devices, Text) == "[]", _SERVICES.c.desired_state == "running",
           _SERVICES.c.spec[("cpu_fallback", "image")].as_string().is_not(None))
    .order_by(_REGISTRY.c.updated_at)
    .limit(bindparam("most")))
# Seconds before a service whose move back failed is tried again: doubled at each failure, up to the cap.
RETRY_FIRST = 15.0
RETRY_CAP = 300.0


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

    async def run_once(self) -> None:
        index = await self.services.placement.index()
        if not any(gpu_room(view) for view in index.views()):
            return
        now = time.monotonic()
        started = 0
        for row in await self.db.all(_ON_FALLBACK, {"most": self.batch * 4}):
            if started >= self.batch:
                break
            service_id = row["service_id"]
            if service_id in self._moving or self._retry.get(service_id, (0.0, 0.0))[0] > now:
                continue
            # A look at the view, no hold: the move places for itself (and fails if the GPU went meanwhile).
            if not index.place(placement_request(ServiceSpec.model_validate(row["spec"]))).placed:
                continue
            self._start(service_id, row["id"])
            started += 1

    def _start(self, service_id: str, row_id: str) -> None:
        self._moving.add(service_id)

        async def move() -> None:
            try:
                if await self.services.back_to_gpu(service_id, row_id) is not None:
                    log.info("service %s moved back from its CPU fallback to a GPU", service_id)
                self._retry.pop(service_id, None)
            except HubError as exc:
                pause = self._retry.get(service_id, (0.0, RETRY_FIRST / 2))[1] * 2
                self._retry[service_id] = (time.monotonic() + pause, min(pause, RETRY_CAP))
                log.warning("service %s could not move back to a GPU: %s", service_id, exc.message)
            finally:
                self._moving.discard(service_id)

        self.services.spawn(move())
