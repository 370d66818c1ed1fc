"""The leader's push of the hub's usage alerts to Alertmanager (``MMANAGER_ALERTMANAGER_URL``).

Every ``MMANAGER_ALERTMANAGER_INTERVAL`` seconds it reads the open alerts and those resolved lately, and posts
them (``hub.services.alertmanager.postable``) to each Alertmanager. It keeps no state of what was sent: each
round sends the whole current picture, so a failed round is made good by the next, and a new leader picks up
where the old one stopped. Whichever replica's heartbeats opened an alert, the leader sends it: it reads the
database, which every replica's monitor writes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from hub.db import Database
from hub.models import utcnow
from hub.services.alertmanager import Alertmanagers, postable, to_send_query
from mmanager.loops import LoopService


class AlertPusher(LoopService):
    name = "alert-push"

    def __init__(self, db: Database, alertmanagers: Alertmanagers, interval: float,
                 clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(interval)
        self.db = db
        self.alertmanagers = alertmanagers
        self.clock = clock

    async def run_once(self) -> None:
        now = self.clock()
        async with self.db.session() as session:
            alerts = list(await session.scalars(to_send_query(now)))
        if alerts:
            await self.alertmanagers.send(postable(alerts, now, self.interval))
