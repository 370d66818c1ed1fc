"""The uvicorn server the hub and the controller run: one that tells its app when shutting down begins.

uvicorn waits for the calls in flight to end before it runs the app's shutdown; calls that never end on their
own (the hub's presence streams) or only after a while (a controller's long poll of its job runs) are told
to end then, through ``closing``, so a stop takes no longer than the work under way.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, closing: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.closing = closing

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.closing is not None:
            self.closing()
        await super().shutdown(sockets)
