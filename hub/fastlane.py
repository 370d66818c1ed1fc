"""The two busiest calls without the framework: the status read, ``GET /api/services/{id}``, which every
client polls, and the heartbeat, ``POST /api/controllers/{id}/heartbeat``, which every controller sends.

Through FastAPI a read costs about five times what the read itself does: seven
middlewares (Starlette's and FastAPI's error, telemetry and body-limit layers,
the audit's, the body limit's), the router, and dependency solving, each on every
call (bench.api_floor, docs/BENCHMARKS.md), and so does a heartbeat
(bench.heartbeats). ``FastLane`` sits in front of all of that, inside only the
request-id middleware, and answers the case of each that needs none of it. A
status read: a GET without a body, from a token this replica accepted less
than ``MMANAGER_AUTH_CACHE_SECONDS`` ago, within the caller's rate limit, for a
service the caller may see. The answer is the route's own (``ServiceManager.read_json``:
``to_out``'s JSON, the same bytes and headers), and such a call writes no audit row
there either.

A heartbeat is answered here when it carries its length (no chunked body)
within ``MMANAGER_MAX_HEARTBEAT_BYTES``, a key this replica's snapshot accepts
for that controller without the database (``ControllerKeyAuth.remembered``), a
body the wire's model takes, and the controller's own id: it goes to the same
``HeartbeatIngest.receive`` and gets the route's answer. Otherwise, or when its
batch refuses it, the application gets the call with the body the lane read,
and does it all again itself.

Everything else goes to the application untouched, which then does the whole
call itself: an unknown or new token or key, a missing service, another user's
service, a refusal by the rate limiter, a database error (the application
answers it with its own 503). So every error, every audit row and every header of
a refusal comes from one place; the lane only skips work for the call that
succeeds. One refusal is the lane's own: a beat shed because too many wait
(``503 HUB_BUSY`` with Retry-After, the same ``HubError.response()`` the
application gives), with no audit row (``mmanager_heartbeats_shed_total``
counts them), since an overloaded hub's cheapest answer must be its refusal.
"""

from __future__ import annotations

import logging
import re

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.deps import RATE_CHARGED, Hub, bearer_token
from hub.errors import HubError, Overloaded
from mmanager.wire import Heartbeat

log = logging.getLogger(__name__)

_PATH = re.compile(r"/api/services/([^/]+)")
_HEARTBEAT = re.compile(r"/api/controllers/([^/]+)/heartbeat")
_JSON = (b"content-type", b"application/json")


class FastLane:
    def __init__(self, app: ASGIApp, hub: Hub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "POST"):
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]  # as Starlette routes (behind a proxy's prefix)
            if scope["method"] == "GET":
                found = _PATH.fullmatch(path)
                if found is not None:
                    body = await self._read(scope, found.group(1))
                    if body is not None:
                        await _ok(send, body)
                        return
            else:
                found = _HEARTBEAT.fullmatch(path)
                if found is not None:
                    await self._heartbeat(scope, receive, send, found.group(1))
                    return
        await self.app(scope, receive, send)

    async def _heartbeat(self, scope: Scope, receive: Receive, send: Send, controller_id: str) -> None:
        """Answer a heartbeat, or hand it to the application (with the body, when read)."""
        length = authorization = None
        for key, value in scope["headers"]:
            if key == b"transfer-encoding":
                length = None
                break  # chunked: the application's body limit watches it as it comes
            if key == b"content-length" and length is None:
                length = value
            elif key == b"authorization" and authorization is None:
                authorization = value
        hub = self.hub
        token = bearer_token(authorization.decode("latin-1")) if authorization is not None else None
        if (length is None or not length.isdigit() or int(length) > hub.settings.max_heartbeat_bytes
                or token is None or not hub.ingest.keys.remembered(controller_id, token)):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the caller went away: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            heartbeat = Heartbeat.model_validate_json(raw)
        except ValidationError:
            heartbeat = None
        if heartbeat is not None and heartbeat.server_id == controller_id:
            try:
                answer = await hub.ingest.receive(controller_id, heartbeat)
            except HubError as exc:
                if isinstance(exc, Overloaded) and exc.code == Overloaded.code:
                    # Shed (too many beats waiting): under overload the refusal must be the cheapest answer
                    # the hub gives, not the framework's whole path and an audit row each.
                    await exc.response()(scope, receive, send)
                    return
                # Refused by its batch (nothing of it was recorded): the application does it again and answers.
                log.debug("the fast lane hands a heartbeat of %s to the application: %s", controller_id, exc.code)
            else:
                await _ok(send, answer.model_dump_json().encode())
                return
        await self.app(scope, _replay(raw, receive), send)

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
            return await hub.services.read_json(user, service_id)
        except Exception as exc:  # noqa: BLE001 - the application answers it, and logs what it must
            log.debug("the fast lane hands %s to the application: %s", scope["path"], type(exc).__name__)
            return None


async def _ok(send: Send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), _JSON]})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for a call whose body was read already: that body first, then the connection's own."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
