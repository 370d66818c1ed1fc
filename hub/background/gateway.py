"""The gateway's two loops: the leader publishes the routing table (``GatewayPublisher``), every replica
keeps the live gateway's URL for services' ``url`` (``GatewayWatch``)."""

from __future__ import annotations

import logging

from hub.services.gateway import GatewayDirectory, GatewayTable
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

# How often a replica looks up the live gateway's URL (it changes when a gateway comes or goes).
WATCH_INTERVAL = 2.0


class GatewayPublisher(LoopService):
    """The leader's: a new version of the routing table whenever the services or their keys changed."""

    name = "gateway-publisher"

    def __init__(self, table: GatewayTable, interval: float) -> None:
        super().__init__(interval, jitter=0.0)
        self.table = table

    async def run_once(self) -> None:
        await self.table.publish()


class GatewayWatch(LoopService):
    """Every replica's: which gateway URL services' ``url`` start with."""

    name = "gateway-watch"

    def __init__(self, directory: GatewayDirectory) -> None:
        super().__init__(WATCH_INTERVAL)
        self.directory = directory

    async def run_once(self) -> None:
        await self.directory.refresh()
