"""What the lifecycle's parts share: the hub's parts they call, the placement cache, the locks, the bound on
the copies made at once and the background tasks.

Invariant: calls on one service are serialised by that service's lock (``service_locks``), on every
path that changes it; a burst of one owner's creates, by that owner's (``owner_locks``); creates make at
most ``COPIES_AT_ONCE`` containers at a time, all of them together (``making``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import HubError, NotFound
from hub.metrics import HubMetrics
from hub.models import ServiceModel
from hub.outage import DatabaseOutage
from hub.scheduler.snapshot import PlacementCache
from hub.services.gateway import GatewayTable
from hub.services.model_files import ModelStore
from hub.services.operations import OperationLog

log = logging.getLogger(__name__)

# Below the controller client's pools kept (``PoolPerController``'s ``max_pools``), so the pools in use are
# never what it must look past to close one.
COPIES_AT_ONCE = 128


@dataclass(eq=False)
class Lifecycle:
    """The state the lifecycle's parts share, one per hub process."""

    db: Database
    client: ControllerClient
    ops: OperationLog
    settings: HubSettings
    metrics: HubMetrics
    placement: PlacementCache
    # The gateways' routing table: a move waits for them before it removes a copy they route to.
    gateway: GatewayTable | None = None
    # Where a background operation lost to the database being away is told (once per outage); None: each one
    # is logged with its traceback.
    outage: DatabaseOutage | None = None
    owner_locks: defaultdict[int, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    service_locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    # Copies being made at once, the controllers' creates of every create together: each holds a connection
    # to its controller, so a burst of creates of many replicas each queues here rather than opening
    # thousands of connections at once and starving the hub's own requests.
    making: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(COPIES_AT_ONCE))
    # Operations run in the background (``?wait=false``): shutdown waits for them.
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Follow-ups of moves (``Replacer.follow_health``): shutdown cancels them.
    followers: set[asyncio.Task[Any]] = field(default_factory=set)
    # The model-file store, where a spec's ``models`` must be found (``hub.services.model_files``).
    model_store: ModelStore = field(init=False)

    def __post_init__(self) -> None:
        self.model_store = ModelStore(self.settings.model_store, self.settings.model_uploads)

    def spawn(self, work: Awaitable[Any], tasks: set[asyncio.Task[Any]] | None = None) -> None:
        """Run an operation in the background (``?wait=false``; errors are in its record), or, held in
        ``tasks`` instead of those shutdown waits for, a follow-up of one."""

        async def guarded() -> None:
            try:
                await work
            except HubError:
                pass  # already recorded on the operation (a follow-up's: it ends with nothing to record)
            except Exception as exc:
                if self.outage is None or not self.outage.failed("a background operation", exc):
                    log.exception("background operation crashed")

        held = self.tasks if tasks is None else tasks
        task = asyncio.create_task(guarded())
        held.add(task)
        task.add_done_callback(held.discard)

    async def shutdown(self, timeout: float) -> None:
        for task in self.followers:
            task.cancel()  # only a quicker health report is lost
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    async def reload_or_none(self, service_id: str) -> ServiceModel | None:
        async with self.db.session() as session:
            return await session.get(ServiceModel, service_id)

    async def reload(self, service_id: str) -> ServiceModel:
        service = await self.reload_or_none(service_id)
        if service is None:
            raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")
        return service
