"""Request body size limits, for the hub and the controllers.

``BodyLimit`` answers 413 ``PAYLOAD_TOO_LARGE`` to a body over the limit:

- with a ``Content-Length`` over it, at once, before any handler runs (so a
  handler that never reads its body, ``POST …/stop`` say, does not act either);
- without one (chunked), by counting while the body streams in: the read that
  goes over raises ``BodyTooLarge``, an ``HTTPException`` that FastAPI passes
  on from its body parsing to the app's error handler, so the handler never
  runs with a body cut short.

A call with a ``Content-Length`` within the limit, or with no body (neither
header: RFC 9112, 6.3), passes on untouched: the server delivers no more than
the length it framed the body by.

Starlette's ``RequestBodyLimitMiddleware`` (and FastAPI's ``max_body_size``) only
check ``Content-Length`` once the body is read, after a handler that does not
read it has already run, and answer in plain text; hence this one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CODE = "PAYLOAD_TOO_LARGE"

# scope -> the limit in bytes for that call.
LimitFor = Callable[[Scope], int]


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=_message(limit))
        self.limit = limit


def too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": {"code": CODE, "message": _message(limit), "details": {"limit_bytes": limit}}},
                        status_code=413)


def _message(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: a call passed on untouched (most) adds no coroutine frame of its own,
        # which every resumption of the call's coroutines would pass through.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        declared: bytes | None = None
        chunked = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                if declared is None:
                    declared = value  # the first, as ``Headers.get`` reads it
            elif key == b"transfer-encoding":
                chunked = True
        if declared is None and not chunked:
            return self.app(scope, receive, send)
        limit = self.limit_for(scope)
        if declared is not None:
            length = declared.decode("latin-1").strip()
            if length.isdigit():
                if int(length) > limit:
                    return too_large(limit)(scope, receive, send)
                if not chunked:
                    return self.app(scope, receive, send)
        return self._counted(scope, receive, send, limit)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """The call with its body counted as it comes (no length it can be judged by beforehand)."""
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            # Read outside FastAPI's body parsing (no handler turned it into an answer).
            if started:
                raise
            await too_large(limit)(scope, receive, send)
