"""Presence: the streams controllers hold open to this replica, and what a broken one means.

A controller holds ``POST /api/controllers/{id}/presence`` open beside its
heartbeats (``controller.presence``): a body that never ends on its own, a
line every few seconds. ``hold()`` reads one until it ends:

- with ``bye`` (or any end of the body): a planned stop; the grace judges it;
- the connection lost before the body ended: the controller is suspected, and
  ``suspect()`` probes its address at once. A refused connection (nothing
  listens: its process is gone) confirms it: the controller is marked
  ``unhealthy`` now, and the leader's reconciler fails its services over at its
  next tick, well within the grace. Anything else (an answer, a timeout: an
  overloaded host, a partition) clears it, and the grace decides as before;
- silent for ``IDLE`` seconds (a peer gone without a word, frozen or cut off):
  dropped, and left to the grace;
- this replica shutting down (``close()``): answered at once, so that shutdown
  does not wait for streams that never end; the controller opens another.

The invariant: an open stream costs no database connection and writes nothing
per keepalive; only a suspected controller is read (its address) and, when
confirmed, written (its mark), and what it said before it died and is not yet
written is dropped (``HeartbeatIngest.gone``) so that it cannot undo the mark.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from sqlalchemy import select, update
from starlette.types import Message, Receive

from hub.controller_client import ControllerClient
from hub.db import Database
from hub.metrics import HubMetrics
from hub.models import ControllerModel, utcnow
from hub.services.heartbeats import HeartbeatIngest

log = logging.getLogger(__name__)

# Seconds a stream may stay silent (controllers send a line every 15 s) before it is dropped as a dead peer's.
IDLE = 60.0
# Seconds the probe of a suspected controller gets: a live one on an overloaded host may be slower, and is
# cleared (the grace decides), never confirmed, by its timeout.
PROBE_TIMEOUT = 0.5
# The most of a body kept, to tell its last line.
TAIL = 16

Ended = Literal["bye", "lost", "idle", "closing"]
Outcome = Literal["confirmed", "cleared"]


class PresenceWatch:
    def __init__(self, db: Database, client: ControllerClient, ingest: HeartbeatIngest, metrics: HubMetrics) -> None:
        self.db = db
        self.client = client
        self.ingest = ingest
        self.metrics = metrics
        self.closing = False
        # Each open stream's pending read: close() cancels them.
        self._reads: set[asyncio.Future[Message]] = set()

    def close(self) -> None:
        """This replica is shutting down: every stream ends now, and new ones at once."""
        self.closing = True
        for read in list(self._reads):
            read.cancel()

    async def hold(self, receive: Receive) -> Ended:
        """Read a stream's body (``receive``, the call's ASGI receive) until it ends, and say how it ended."""
        self.metrics.presence_streams.inc()
        tail = b""
        try:
            while not self.closing:
                read = asyncio.ensure_future(receive())
                self._reads.add(read)
                try:
                    done, _ = await asyncio.wait((read,), timeout=IDLE)
                finally:
                    self._reads.discard(read)
                if not done:
                    read.cancel()
                    return "idle"
                if read.cancelled():
                    break
                message = read.result()
                if message["type"] != "http.request":
                    return "lost"
                tail = (tail + message.get("body", b""))[-TAIL:]
                if not message.get("more_body", False):
                    return "bye"
            return "closing"
        finally:
            self.metrics.presence_streams.dec()

    async def suspect(self, controller_id: str) -> Outcome:
        """The controller's stream broke: probe it now; mark it ``unhealthy`` if its process is gone."""
        lost_at = utcnow()
        async with self.db.session() as session:
            url = await session.scalar(select(ControllerModel.url).where(ControllerModel.id == controller_id))
        if url is None:
            return self._outcome(controller_id, "cleared", "it is not registered")
        refused = await self.client.refuses(url, PROBE_TIMEOUT)
        if not refused:
            return self._outcome(controller_id, "cleared", f"{url} still accepts connections, or did not say "
                                                           f"within {PROBE_TIMEOUT:g}s")
        # Before the mark: a beat it sent just before it died must not be written after the mark.
        self.ingest.gone(controller_id, lost_at)
        message = "its process closed its connection to the hub and its address refuses connections"
        async with self.db.session() as session:
            await session.execute(
                update(ControllerModel).where(ControllerModel.id == controller_id)
                .values(status="unhealthy", error_message=message, updated_at=lost_at)
                .execution_options(synchronize_session=False))
        self.metrics.controller_down(controller_id)
        log.warning("controller %s is lost: %s (%s)", controller_id, message, url)
        return self._outcome(controller_id, "confirmed", None)

    def _outcome(self, controller_id: str, outcome: Outcome, why: str | None) -> Outcome:
        self.metrics.controllers_suspected.labels(outcome).inc()
        if why is not None:
            log.info("controller %s closed its presence stream without a bye; cleared: %s", controller_id, why)
        return outcome

