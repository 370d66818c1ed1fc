"""The status read without the framework: ``GET /api/services/{id}``, the call every client polls.

Through FastAPI a read costs about five times what the read itself does: seven
middlewares (Starlette's and FastAPI's error, telemetry and body-limit layers,
the audit's, the body limit's), the router, and dependency solving, each on every
call (bench.api_floor, docs/BENCHMARKS.md). ``FastLane`` sits in front of all of
that, inside only the request-id middleware, and answers the one case that
needs none of it: a GET without a body, from a token this replica accepted less
than ``MMANAGER_AUTH_CACHE_SECONDS`` ago, within the caller's rate limit, for a
service the caller may see. The answer is the route's own (``ServiceManager.read``
and ``to_out``, the same bytes and headers), and such a call writes no audit row
there either.

Everything else goes to the application untouched, which then does the whole
call itself: an unknown or new token, a missing service, another user's
service, a refusal by the rate limiter, a database error (the application
answers it with its own 503). So every error, every audit row and every header of
a refusal comes from one place; the lane only skips work for the call that
succeeds.
"""

from __future__ import annotations

import logging
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from hub.deps import RATE_CHARGED, Hub, bearer_token

log = logging.getLogger(__name__)

_PATH = re.compile(r"/api/services/([^/]+)")
_JSON = (b"content-type", b"application/json")


class FastLane:
    def __init__(self, app: ASGIApp, hub: Hub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]  # as Starlette routes (behind a proxy's prefix)
            found = _PATH.fullmatch(path)
            if found is not None:
                body = await self._read(scope, found.group(1))
                if body is not None:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-length", str(len(body)).encode()), _JSON]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    async def _read(self, scope: Scope, service_id: str) -> bytes | None:
        """The answer's body, or None when the application must answer (see the module's text)."""
        authorization = None
        for key, value in scope["headers"]:
            if key in (b"content-length", b"transfer-encoding"):
                return None  # a body: the application's limits decide what becomes of it
            if key == b"authorization" and authorization is None:
                authorization = value  # the first, as the application reads it
        token = bearer_token(authorization.decode("latin-1")) if authorization is not None else None
        if token is None:
            return None
        hub = self.hub
        user = hub.users.remembered(token)
        if user is None:
            return None
        if hub.limiter is not None:
            if hub.limiter.acquire(user.id):
                return None  # refused (no token taken): the application refuses it again, with its 429
            # Taken: if the application ends up answering, it must not take another.
            scope.setdefault("state", {})[RATE_CHARGED] = True
        try:
            out = await hub.services.read(user, service_id)
        except Exception as exc:  # noqa: BLE001 - the application answers it, and logs what it must
            log.debug("the fast lane hands %s to the application: %s", scope["path"], type(exc).__name__)
            return None
        return out.model_dump_json().encode()
