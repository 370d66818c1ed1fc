"""The controller's audit trail: what it did and refused, until the hub has it.

``mmanager.audit.AuditMiddleware`` hands every mutating call and every refusal
(a hostile create refused with a 4xx, a wrong key's 401) to ``AuditTrail.record``,
which logs it as one JSON line (logger ``mmanager.audit``) and queues it. The
heartbeat agent ships the queue's oldest events (at most 1000, the wire's bound)
with each heartbeat and drops them only once the hub has answered that heartbeat,
so an event reaches the hub's audit log at least once while the hub is reachable.

The queue is bounded (``MMANAGER_AUDIT_BUFFER``): when the hub stays away, or
nobody polls a controller that does not push, the oldest events go first; they
are counted, the count rides on the next event shipped (``details.dropped_before``),
and every event stays in the log whatever happens. ``GET /audit`` (the
controller's key) shows what is queued.
"""

from __future__ import annotations

import logging
from collections import deque

from mmanager.audit import event_line
from mmanager.wire import AuditEvent

# What one heartbeat carries at most (mmanager.wire.Heartbeat.audit).
PER_BEAT = 1000
# The drop warning is repeated every this many drops.
WARN_EVERY = 1000

log = logging.getLogger("mmanager.audit")


class AuditTrail:
    def __init__(self, server_id: str, capacity: int) -> None:
        self.source = f"controller:{server_id}"
        self.capacity = capacity
        self._queue: deque[AuditEvent] = deque()
        # Events dropped since the start (oldest first) because the queue was full.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    async def record(self, event: AuditEvent) -> None:
        log.info("%s", event_line(event, source=self.source))
        if len(self._queue) >= self.capacity:
            oldest = self._queue.popleft()
            self.dropped += 1
            # The next event shipped says how many went before it (those the dropped one carried included).
            heir = self._queue[0] if self._queue else event
            heir.details["dropped_before"] = (heir.details.get("dropped_before", 0)
                                              + oldest.details.get("dropped_before", 0) + 1)
            if self.dropped % WARN_EVERY == 1:
                log.warning("the audit queue is full (%d events, the hub has not taken them): "
                            "%d dropped so far, oldest first; the log keeps every event", self.capacity, self.dropped)
        self._queue.append(event)

    def batch(self, limit: int = PER_BEAT) -> list[AuditEvent]:
        """The oldest queued events, for the next heartbeat; they stay queued until ``acknowledge``."""
        return [self._queue[i] for i in range(min(limit, len(self._queue)))]

    def acknowledge(self, shipped: list[AuditEvent]) -> None:
        """The hub answered the heartbeat that carried ``shipped``: they are its now."""
        # Still queued ones are at the head: newer events go to the tail, drops leave from the head.
        ids = {id(event) for event in shipped}
        while self._queue and id(self._queue[0]) in ids:
            self._queue.popleft()
