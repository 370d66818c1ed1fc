"""The jobs' loops: ``JobDispatcher`` (every replica) starts pending jobs from the queue
(``hub.services.jobs.queue``); ``JobWatcher`` (the leader only) follows the attempts that run and settles
them (``hub.services.jobs.watch``). A submit or an attempt's end on this replica wakes the dispatcher at once;
otherwise it polls."""

from __future__ import annotations

from hub.services.jobs.queue import Dispatcher
from hub.services.jobs.watch import Watcher
from mmanager.loops import LoopService


class JobDispatcher(LoopService):
    name = "job-dispatcher"

    def __init__(self, dispatcher: Dispatcher, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.dispatcher = dispatcher

    async def run_once(self) -> None:
        await self.dispatcher.dispatch_once()

    async def stop(self) -> None:
        await super().stop()
        await self.dispatcher.stop()


class JobWatcher(LoopService):
    name = "job-watcher"

    def __init__(self, watcher: Watcher, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.watcher = watcher

    async def run_once(self) -> None:
        await self.watcher.tick()

    async def stop(self) -> None:
        await super().stop()
        await self.watcher.stop()
