"""The fencing guard: no new work before the stale copies are gone.

With heartbeats on (``MMANAGER_HUB_URL`` set) the controller takes new work
(create, start, restart) only while its last completed heartbeat round trip
is younger than the grace the hub answered. A round trip counts only once the
stop orders it carried have been carried out, and it is dated from the moment
the heartbeat *began*: an answer that arrives late (the process was frozen
after sending, say) cannot make the controller look fresher than the state
the hub judged. A controller the hub may already have declared lost (silent
for longer than the grace, by a clock that runs at least as late as ours)
therefore refuses new work until a heartbeat has removed its stale copies.

Without a hub URL the hub only polls and nothing is ever refused for this
reason (GeoML-Hub compatibility).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from controller.errors import ControllerNotSynced

# What a controller assumes until the hub's first answer says otherwise.
DEFAULT_INTERVAL = 2.0
DEFAULT_GRACE = 6.0


class SyncGuard:
    def __init__(
        self, *, required: bool, grace: float = DEFAULT_GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.required = required
        self.grace = grace
        self.clock = clock
        self._synced_at: float | None = None

    def synced(self, began: float, grace: float) -> None:
        """A round trip that began at ``began`` (``clock()`` time) completed, its stop orders applied."""
        self.grace = grace
        if self._synced_at is None or began > self._synced_at:
            self._synced_at = began

    def age(self) -> float | None:
        """Seconds since the last synced round trip began; None before the first."""
        return None if self._synced_at is None else self.clock() - self._synced_at

    @property
    def in_sync(self) -> bool:
        age = self.age()
        return not self.required or (age is not None and age <= self.grace)

    def check(self) -> None:
        """Raise ``ControllerNotSynced`` unless new work may be taken now."""
        if self.in_sync:
            return
        age = self.age()
        if age is None:
            why = "has not yet completed a heartbeat with the hub"
        else:
            why = f"has had no heartbeat round trip with the hub for {age:.1f} s (grace {self.grace:g} s)"
        raise ControllerNotSynced(
            f"this controller {why}; it takes no new work until a heartbeat has told it which stale "
            "copies to remove and they are gone. Retry shortly.",
            {"last_sync_seconds_ago": None if age is None else round(age, 3), "grace": self.grace},
        )
