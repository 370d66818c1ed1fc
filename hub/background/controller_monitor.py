"""Polls every controller's ``/health`` each heartbeat interval, so placement
sees who is up and how loaded they are."""

from __future__ import annotations

from hub.background.base import LoopService
from hub.services.controllers import ControllerRegistry


class ControllerMonitor(LoopService):
    name = "controller-monitor"

    def __init__(self, registry: ControllerRegistry, interval: float) -> None:
        super().__init__(interval)
        self.registry = registry

    async def run_once(self) -> None:
        await self.registry.poll_all()
