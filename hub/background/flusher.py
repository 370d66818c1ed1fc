"""Writes what heartbeats said, on every replica: ``HeartbeatIngest`` keeps
them in memory and this loop flushes them a few times per heartbeat interval,
and once more on the way out; with them, when users' tokens were last used
(``UserAuth.flush``)."""

from __future__ import annotations

import logging

from hub.services.heartbeats import HeartbeatIngest
from hub.services.users import UserAuth
from mmanager.loops import LoopService

log = logging.getLogger(__name__)


class HeartbeatFlusher(LoopService):
    """Writes what heartbeats said, on every replica, a few times per heartbeat interval."""

    name = "heartbeat-flusher"

    def __init__(self, ingest: HeartbeatIngest, interval: float, users: UserAuth | None = None) -> None:
        super().__init__(interval, jitter=0.0)
        self.ingest = ingest
        self.users = users

    async def run_once(self) -> None:
        await self.ingest.flush()
        if self.users is not None:
            await self.users.flush()

    async def stop(self) -> None:
        await super().stop()
        try:
            await self.run_once()
        except Exception as exc:
            log.warning("could not write the last heartbeats: %s", exc)
