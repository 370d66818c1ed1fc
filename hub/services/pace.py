"""The heartbeat pace: the interval and grace the hub answers, stretched for a big fleet.

Every controller beats at the interval the hub's answer names. With ``MMANAGER_HEARTBEAT_MAX_RATE``
set (heartbeats a second, for the whole fleet; 0: off), a fleet too big to beat at
``MMANAGER_HEARTBEAT_INTERVAL`` within that rate is told a longer one: ``controllers / max_rate``
seconds, and a grace stretched by the same factor, as Nomad's servers spread heartbeat TTLs
(``max_heartbeats_per_second``). A hub then stays within what it can take however many controllers
join, instead of falling behind on every beat at once (every controller would be declared lost).
The price is detection: a controller is declared lost after the stretched grace.

When the fleet shrinks the interval comes down again, but a controller learns it only from its
next answer: until the longer grace that controllers were last told has passed, the hub keeps
judging silence by it (``detection_grace``), so a controller still beating at the old interval is
never taken for lost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from hub.config import HubSettings


class HeartbeatPace:
    def __init__(self, settings: HubSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.controllers = 0
        self.interval = settings.heartbeat_interval
        self.grace = settings.heartbeat_grace
        # (until, grace): longer graces answered before the pace came down, kept for detection until then.
        self._earlier: list[tuple[float, float]] = []

    @property
    def stretch(self) -> float:
        """How many times the configured interval the hub answers (1.0: not stretched)."""
        return self.interval / self.settings.heartbeat_interval

    def update(self, controllers: int) -> None:
        """Set the pace for a fleet of ``controllers`` (every registered one: a lost one beats again when
        it comes back)."""
        self.controllers = max(controllers, 0)
        base = self.settings.heartbeat_interval
        rate = self.settings.heartbeat_max_rate
        # In steps of a tenth of the configured interval, so that a controller joining does not change
        # the answer every time.
        interval = base
        if rate > 0 and self.controllers / rate > base:
            step = base / 10
            interval = math.ceil(round(self.controllers / rate / step, 6)) * step
        grace = self.settings.heartbeat_grace * interval / base
        if grace < self.grace:
            # Controllers told the longer grace beat at the longer interval until their next answer.
            self._earlier.append((self._clock() + self.grace, self.grace))
        self.interval, self.grace = interval, grace

    @property
    def detection_grace(self) -> float:
        """The silence after which a controller is lost: the grace answered, or a longer one answered
        before it for as long as controllers may still be beating by it."""
        now = self._clock()
        self._earlier = [(until, grace) for until, grace in self._earlier if until > now]
        return max([self.grace, *(grace for _, grace in self._earlier)])
