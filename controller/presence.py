"""Presence: one request held open to the hub, so that the hub learns at once when this process dies.

Beside its heartbeats (``controller.heartbeat``), a controller keeps one
``POST {hub}/api/controllers/{SERVER_ID}/presence`` open to the hub replica its
beats go to, with the heartbeat's key and a body that never ends on its own: a
``hello`` line, then an ``alive`` line every ``KEEPALIVE`` seconds. A process
that dies closes the connection mid-body; the hub then probes this controller
and, when nothing listens at its address any more, marks it lost without
waiting for the heartbeat grace. ``stop()`` (SIGTERM, shutdown) ends the body
with ``bye``: a planned stop, which the grace judges as before.

The invariant: presence never delays nor breaks a heartbeat. It runs in its
own task with its own client; a stream that breaks, or that the hub answers,
is opened again after a backoff, to whichever replica the beats go to then.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import httpx

from controller.config import ControllerSettings
from mmanager.loops import LoopService

# Seconds between keepalive lines: a hub ends a stream silent for a few of them (hub.services.presence).
KEEPALIVE = 15.0
# Seconds the ``bye`` gets to reach the hub, and the hub's answer to come back, when the controller stops.
BYE_WAIT = 2.0
# Backoff before a stream is opened again: doubled per failure in a row from FIRST_RETRY, at most MAX_RETRY.
FIRST_RETRY, MAX_RETRY = 0.5, 30.0
# A stream that lasted this long was not a failure: the next one opens after FIRST_RETRY.
STEADY = 60.0

HELLO, ALIVE, BYE = b"hello\n", b"alive\n", b"bye\n"

log = logging.getLogger(__name__)


class PresenceAgent(LoopService):
    name = "presence"
    cancel_on_stop = True
    stop_wait = BYE_WAIT

    def __init__(self, settings: ControllerSettings, hub_url: Callable[[], str], key: Callable[[], str], *,
                 transport: httpx.AsyncBaseTransport | None = None, keepalive: float = KEEPALIVE) -> None:
        super().__init__(FIRST_RETRY, jitter=0.0)
        self.settings = settings
        # The replica the heartbeats go to now, and the key they use now: read for each stream.
        self.hub_url = hub_url
        self.key = key
        self.keepalive = keepalive
        self.path = f"/api/controllers/{quote(settings.server_id, safe='')}/presence"
        self.failures = 0
        # Streams opened; the one open now, if any, is the last.
        self.opened = 0
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._ending = asyncio.Event()
        self._lasted = 0.0

    def start(self) -> None:
        if self._task is not None:
            return
        self._ending.clear()
        self._client = httpx.AsyncClient(transport=self._transport, verify=self.settings.tls.client_context())
        super().start()

    async def stop(self) -> None:
        """End the open stream with ``bye`` and wait (``BYE_WAIT`` at most) for the hub's answer."""
        self._ending.set()
        # The loop ends once the stream in progress has said bye (at once when none is open)...
        self._stopped.set()
        self.wake()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=BYE_WAIT)
        # ...or is cancelled, its connection closed, when the hub does not answer in time.
        await super().stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run_once(self) -> None:
        if self._ending.is_set():
            return
        assert self._client is not None, "start() the agent first"
        url = self.hub_url() + self.path
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.opened += 1
        try:
            # Writes are small and rare; the answer comes once the body has ended.
            response = await self._client.post(
                url, content=self._body(), timeout=httpx.Timeout(BYE_WAIT, connect=5.0, write=10.0),
                headers={"Authorization": f"Bearer {self.key()}", "Content-Type": "text/plain"})
        except httpx.HTTPError as exc:
            outcome = f"{type(exc).__name__} {exc}".rstrip()
        else:
            outcome = f"the hub answered {response.status_code}"
        self._lasted = loop.time() - began
        if self._ending.is_set():
            return
        self.failures = 0 if self._lasted >= STEADY else self.failures + 1
        # Worth a warning only when it keeps happening: a hub replica that restarts ends every stream once.
        log.log(logging.WARNING if self.failures >= 3 else logging.INFO,
                "presence stream to %s ended after %.1fs (%s); opening another", url, self._lasted, outcome)

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        log.warning("presence stream failed: %r", exc, exc_info=True)

    def next_delay(self, took: float) -> float:
        if self._ending.is_set():
            return MAX_RETRY
        backoff = min(FIRST_RETRY * 2 ** min(max(self.failures - 1, 0), 10), MAX_RETRY)
        return backoff * (1 + random.random()) / 2

    async def _body(self) -> AsyncIterator[bytes]:
        yield HELLO
        while True:
            try:
                await asyncio.wait_for(self._ending.wait(), self.keepalive)
            except TimeoutError:
                yield ALIVE
                continue
            yield BYE
            return
