"""The audit trail's ASGI middleware, shared by the hub and the controllers.

``AuditMiddleware`` sees every HTTP call and records, as an ``AuditEvent``,
each mutating one (POST, PUT, PATCH, DELETE) whatever its outcome, and each
one refused (a 4xx) whatever its method: who (what the
authentication put on ``request.state`` through ``identify()``; "anonymous"
when nothing authenticated), what (method, path, the id the path names),
when, the status with the error code of the ``{"error": {"code"}}`` body,
and the caller's address. Nothing of the request body, its headers or its
query values is kept: they are where tokens, keys and environment values
travel.

It is a pure ASGI middleware, not ``BaseHTTPMiddleware``: streamed answers
(``logs?follow=true``) pass through untouched. An audited answer's last body
chunk is held until ``record`` has returned, so a client that saw the whole
answer knows the event was handed over (on the hub: committed, unless the
database is down or slow). ``record``
must not raise; whatever happens there never fails the call.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmanager.wire import AuditEvent

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ANONYMOUS = "anonymous"
# The request.state attribute identify() sets.
ACTOR_ATTR = "audit_actor"
# Path parameters that name what a call acts on, most specific first.
TARGET_PARAMS = ("service_id", "entry_id", "container_id", "key_id", "controller_id", "name")
# The most of an audited answer's body read for its error code or the id it created.
MAX_CAPTURE = 64 * 1024
MAX_MESSAGE = 500

Record = Callable[[AuditEvent], Awaitable[None]]
# (method, path, status) -> True for calls that are not worth an event (the hub's successful heartbeats).
Skip = Callable[[str, str, int], bool]


def identify(request: HTTPConnection, actor: str) -> None:
    """Name who is calling, for the audit trail; authentication calls this once it has succeeded."""
    setattr(request.state, ACTOR_ATTR, actor)


def result_of(status_code: int) -> str:
    """ok | refused (4xx) | error (5xx): the audit log's ``result``."""
    if status_code >= 500:
        return "error"
    return "refused" if status_code >= 400 else "ok"


def event_line(event: AuditEvent, **extra: Any) -> str:
    """One event as one JSON line, for a log."""
    return json.dumps({**event.model_dump(mode="json"), "result": result_of(event.status_code), **extra},
                      separators=(",", ":"), sort_keys=True)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, record: Record, skip: Skip | None = None) -> None:
        self.app = app
        self.record = record
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Shared with every Request of this call: the authentication writes the actor here.
        state = scope.setdefault("state", {})
        method = scope["method"]
        status = 0
        audited = False
        recorded = False
        captured: list[bytes] = []
        size = 0

        async def record() -> None:
            nonlocal recorded
            recorded = True
            await self.record(_event(scope, state, status, b"".join(captured) if size <= MAX_CAPTURE else b""))

        async def audit_send(message: Message) -> None:
            nonlocal status, audited, size
            if message["type"] == "http.response.start":
                status = message["status"]
                audited = (method in MUTATING or 400 <= status < 500) and not (
                    self.skip is not None and self.skip(method, scope["path"], status)
                )
            elif message["type"] == "http.response.body" and audited and not recorded:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= MAX_CAPTURE:
                    captured.append(chunk)
                if not message.get("more_body", False):
                    await record()
            await send(message)

        try:
            await self.app(scope, receive, audit_send)
        except Exception:
            # The server's last-resort handler answers 500 once this propagates.
            if not recorded and (audited or (not status and method in MUTATING)):
                status = status or 500
                await record()
            raise


def _event(scope: Scope, state: dict[str, Any], status: int, body: bytes) -> AuditEvent:
    params: dict[str, Any] = scope.get("path_params") or {}
    target = next((str(params[p]) for p in TARGET_PARAMS if params.get(p)), None)
    error_code = message = None
    answer = _json(body)
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict):
            error_code = _text(error.get("code"), 64)
            message = _text(error.get("message"), MAX_MESSAGE)
        elif target is None and status < 300:
            # What a create made: the new service's id, the new container's, the new user.
            target = _text(answer.get("id") or answer.get("container_id") or answer.get("username"), 160)
    if error_code is None and status >= 500 and not body:
        error_code = "INTERNAL_ERROR"
    details: dict[str, Any] = {}
    if message:
        details["message"] = message
    client = scope.get("client")
    return AuditEvent(
        at=datetime.now(UTC),
        actor=str(state.get(ACTOR_ATTR) or ANONYMOUS),
        method=scope["method"],
        path=scope["path"][:512],
        target=target[:160] if target else None,
        status_code=status,
        error_code=error_code,
        remote=client[0][:64] if client else None,
        details=details,
    )


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _text(value: Any, limit: int) -> str | None:
    return str(value)[:limit] if isinstance(value, str | int) and value != "" else None
