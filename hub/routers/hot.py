"""The routes every client and every controller call all the time, answered without FastAPI's request
handling: the status read (``hub.routers.services``) and the heartbeat (``hub.routers.controllers``).

A ``HotRoute`` is an ``APIRoute`` that the application puts first among its routes: the OpenAPI document
describes it from its declaration (an endpoint whose signature names the path parameters and the body,
its response model), as any route; a call to it goes to its ``answer``, a pure ASGI function, with no
``Request``, no dependency solving and no response validation. Everything around a route is the
application's, as for every call: the request id, the audit, the body limit and the error handlers (an
``answer`` raises ``HubError`` as any handler does). The declaration is never called: ``answer`` is the
route's one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

_JSON = (b"content-type", b"application/json")


class HotRoute(APIRoute):
    def __init__(self, path: str, declaration: Callable[..., Any], answer: ASGIApp, **kwargs: Any) -> None:
        super().__init__(path, declaration, **kwargs)
        self.answer = answer
        self._answered = frozenset(self.methods or ())

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self._answered:
            await self.answer(scope, receive, send)
        else:
            await super().handle(scope, receive, send)  # 405, with Allow


async def send_json(send: Send, body: bytes) -> None:
    """A 200 with ``body``, JSON, and its headers as ``Response(body, media_type="application/json")``'s."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), _JSON]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    """The call's whole body (``ClientDisconnect`` when the caller went away first, as ``Request.body``)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
