"""The uvicorn server the hub and the controller run: one whose stop takes no longer than the calls under way.

uvicorn waits for the calls in flight to end before it runs the app's shutdown. Calls that never end on their
own (the hub's presence streams) or only after a while (a controller's long poll of its job runs) are told to
end then, through ``closing``. And a connection uvicorn closed while idle still counts until its close is done:
over TLS that waits for the peer's close_notify, which an idle client in a connection pool never sends
(asyncio gives up after 30 s); such a connection, with nothing left to send, is dropped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import uvicorn


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, closing: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.closing = closing

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.closing is not None:
            self.closing()
        dropping = asyncio.create_task(self._drop_closed_connections())
        try:
            await super().shutdown(sockets)
        finally:
            dropping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dropping

    async def _drop_closed_connections(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None and transport.is_closing() and not transport.get_write_buffer_size():
                    transport.abort()


def serve(app: Any, closing: Callable[[], None] | None = None, **options: Any) -> None:
    """Serve ``app`` (uvicorn.Config's ``options``) until SIGINT or SIGTERM; as uvicorn.run, exit with status 3
    when it never listened (its port taken, say)."""
    server = Server(uvicorn.Config(app, **options), closing=closing)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(3)
