"""``ServiceManager``: the one front object the routers, the hot routes and the reconciler call. It holds the
lifecycle's parts, built on one shared ``Lifecycle`` context, and hands each call to the part that owns it.

The delegating methods return the part's awaitable rather than awaiting it: no frame of their own on the
status read's path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.logstreams import LogStreamSlots
from hub.metrics import HubMetrics
from hub.models import OperationModel, ServiceModel, UserModel
from hub.outage import DatabaseOutage
from hub.scheduler.snapshot import PlacementCache
from hub.schemas import ServiceOut, ServicePatch, ServiceSpec
from hub.services.gateway import GatewayDirectory
from hub.services.lifecycle import reads
from hub.services.lifecycle.actions import Actions, Woken
from hub.services.lifecycle.context import Lifecycle
from hub.services.lifecycle.create import Creator
from hub.services.lifecycle.deploy import Deployer
from hub.services.lifecycle.moves import Mover
from hub.services.lifecycle.replace import Replacer
from hub.services.operations import OperationLog
from hub.services.users import Identity
from mmanager.streams import ClosingStream


class ServiceManager:
    def __init__(
        self,
        db: Database,
        client: ControllerClient,
        ops: OperationLog,
        settings: HubSettings,
        metrics: HubMetrics,
        placement: PlacementCache,
        gateways: GatewayDirectory,
        outage: DatabaseOutage | None = None,
    ) -> None:
        self.placement = placement
        self.log_streams = LogStreamSlots(settings.max_log_streams, settings.max_log_streams_per_user)
        self.ctx = Lifecycle(db, client, ops, settings, metrics, self.placement, gateways.table, outage=outage)
        self.model_store = self.ctx.model_store
        deployer = Deployer(self.ctx)
        replacer = Replacer(self.ctx, deployer)
        self._reads = reads.Reads(db, gateways)
        self._creator = Creator(self.ctx, deployer)
        self._mover = Mover(self.ctx, deployer, replacer)
        self._deployer = deployer
        self._actions = Actions(self.ctx, replacer, self.log_streams)

    # ------------------------------------------------------------------ reads

    def get_for(self, session: AsyncSession, user: UserModel, service_id: str) -> Awaitable[ServiceModel]:
        return reads.get_for(session, user, service_id)

    def read(self, user: UserModel | Identity, service_id: str) -> Awaitable[ServiceOut]:
        return self._reads.read(user, service_id)

    def read_json(self, user: UserModel | Identity, service_id: str) -> Awaitable[bytes]:
        return self._reads.read_json(user, service_id)

    def out(self, service: ServiceModel) -> Awaitable[ServiceOut]:
        """The API's answer for ``service``, with its replicas."""
        return self._reads.out(service)

    # --------------------------------------------------------------- changes

    def create(self, user: UserModel, username: str, repo: str, spec: ServiceSpec,
               wait: bool = True, watch: bool = False) -> Awaitable[ServiceModel | OperationModel]:
        return self._creator.create(user, username, repo, spec, wait, watch)

    def lifecycle(self, user: UserModel, service_id: str, action: str,
                  wait: bool = True) -> Awaitable[ServiceModel | OperationModel]:
        """Start, stop or restart the service's container."""
        return self._actions.lifecycle(user, service_id, action, wait)

    def idle_stop(self, service_id: str, idle_for: float) -> Awaitable[ServiceModel | None]:
        """Stop a service that had no gateway traffic for ``idle_for`` seconds; it reads ``idle``."""
        return self._actions.idle_stop(service_id, idle_for)

    def wake(self, service_id: str, actor: str) -> Awaitable[Woken]:
        """For a request at a gateway: start an ``idle`` service again, or say whether a copy may serve soon."""
        return self._actions.wake(service_id, actor)

    def redeploy(self, user: UserModel, service_id: str, operation: str, *, spec: ServiceSpec | None = None,
                 rollback_to: int | None = None, exclude_current: bool = False, target: str | None = None,
                 replacing: str | None = None, leave_volumes: bool = False,
                 wait: bool = True) -> Awaitable[ServiceModel | OperationModel]:
        """Update or roll back the service (rolling over its replicas), or migrate one replica (``replacing``,
        its registry row; None: the primary copy; ``leave_volumes``: even though its volumes stay behind)."""
        return self._mover.redeploy(user, service_id, operation, spec=spec, rollback_to=rollback_to,
                                    exclude_current=exclude_current, target=target, replacing=replacing,
                                    leave_volumes=leave_volumes, wait=wait)

    def update(self, user: UserModel, service_id: str, patch: ServicePatch,
               wait: bool = True) -> Awaitable[ServiceModel | OperationModel]:
        return self._mover.update(user, service_id, patch, wait)

    def move(self, service_id: str, reason: str, exclude: frozenset[str] = frozenset(),
             expected_controller: str | None = None, replica: str | None = None) -> Awaitable[ServiceModel | None]:
        """The reconciler's move (``Mover.move``); None when there was nothing (left) to do."""
        return self._mover.move(service_id, reason, exclude, expected_controller, replica)

    @property
    def fallbacks_placed(self) -> int:
        """Copies this hub has placed as a CPU fallback since it started (``GpuReturn`` looks again when it grows)."""
        return self._deployer.fallbacks_placed

    def back_to_gpu(self, service_id: str, row_id: str) -> Awaitable[ServiceModel | None]:
        """Move a copy that runs its CPU fallback back to a GPU (``Mover.back_to_gpu``)."""
        return self._mover.back_to_gpu(service_id, row_id)

    def delete(self, user: UserModel, service_id: str) -> Awaitable[None]:
        return self._actions.delete(user, service_id)

    def refresh(self, user: UserModel, service_id: str) -> Awaitable[ServiceModel]:
        return self._actions.refresh(user, service_id)

    def logs(self, user: UserModel, service_id: str, tail: int, follow: bool,
             replica: str | None = None) -> Awaitable[str | ClosingStream]:
        return self._actions.logs(user, service_id, tail, follow, replica)

    # --------------------------------------------------------------- plumbing

    def spawn(self, work: Awaitable[object], tasks: set[asyncio.Task[Any]] | None = None) -> None:
        """Run an operation in the background (``?wait=false``; shutdown waits for it), or, held in
        ``tasks``, a follow-up of one."""
        self.ctx.spawn(work, tasks)

    def shutdown(self, timeout: float = 30.0) -> Awaitable[None]:
        return self.ctx.shutdown(timeout)
