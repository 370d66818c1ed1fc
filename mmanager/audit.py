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

An application mounted inside an audited one may keep its own calls out of
the trail (``skip_call``: the hub's console, whose changes are the API calls
it makes, each audited) and name the code of a refusal whose answer is not
the API's JSON (``refused_call``).

Every event is cleaned where it is made (``clean_event``: control characters
and lone surrogates replaced by U+FFFD, every text cut to its column's width),
so a path like ``/containers/%00`` cannot make the hub's database refuse it.
Refusals nobody can be held to (anonymous 4xx, and 429s) are coalesced
(``Coalescer``): each caller's first ``COALESCE_PER_KEY`` a minute are
recorded, the rest counted into one event when the minute is over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmanager.logs import current_request_id
from mmanager.wire import AuditEvent

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ANONYMOUS = "anonymous"
# The request.state attribute identify() sets.
ACTOR_ATTR = "audit_actor"
# Set by an application mounted in an audited one (the hub's console, whose changes are audited as the API
# calls it makes): ``SKIP_ATTR`` true keeps the call out of the trail, ``ERROR_ATTR`` names the error code
# and message of an answer whose body is not the API's JSON error. Read when the answer starts.
SKIP_ATTR = "audit_skip"
ERROR_ATTR = "audit_error"
# What a route adds to its call's event (``describe_call``): what it changed, before and after.
DETAILS_ATTR = "audit_details"
# Path parameters that name what a call acts on, most specific first.
TARGET_PARAMS = ("service_id", "entry_id", "container_id", "key_id", "controller_id", "name")
# The most of an audited answer's body read for its error code or the id it created.
MAX_CAPTURE = 64 * 1024
MAX_MESSAGE = 500
# The audit_log columns' widths (hub.models.AuditModel): an event is cut to them where it is made, and
# again where the hub stores it.
WIDTHS = {"source": 160, "actor": 160, "method": 8, "path": 512, "target": 160, "error_code": 64, "remote": 64}
# What one ``details`` string, key or nesting level keeps at most.
MAX_DETAIL_TEXT = 1024
MAX_DETAIL_KEY = 64
MAX_DETAIL_DEPTH = 4
# Control characters (C0, DEL, C1) and lone surrogates: PostgreSQL refuses NUL in text and a surrogate
# cannot be encoded; the rest would garble a log line or a terminal. Each is replaced by U+FFFD.
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
REPLACEMENT = "\ufffd"

# Refusals nobody authenticated (actor "anonymous", key: the caller's address) and 429s of authenticated
# callers (key: the actor) are coalesced per fixed window: each key's first ANONYMOUS_PER_KEY events of a
# window, and ANONYMOUS_TOTAL of all keys together, are recorded; the rest are counted and recorded as one
# event per key (details.suppressed) when the window closes.
COALESCE_WINDOW = 60.0
COALESCE_PER_KEY = 20
COALESCE_TOTAL = 200

log = logging.getLogger("mmanager.audit")


Record = Callable[[AuditEvent], Awaitable[None]]
# (method, path, status) -> True for calls that are not worth an event (the hub's successful heartbeats).
Skip = Callable[[str, str, int], bool]


def clean_text(value: str, limit: int | None = None) -> str:
    """``value`` without control characters or lone surrogates (each becomes U+FFFD), cut to ``limit``."""
    cleaned = UNPRINTABLE.sub(REPLACEMENT, value)
    return cleaned if limit is None else cleaned[:limit]


def _clean_detail(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # NaN and the infinities are not JSON: PostgreSQL would refuse them.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return clean_text(value, MAX_DETAIL_TEXT)
    if depth >= MAX_DETAIL_DEPTH:
        return clean_text(json.dumps(value, default=str), MAX_DETAIL_TEXT)
    if isinstance(value, dict):
        return {clean_text(str(k), MAX_DETAIL_KEY): _clean_detail(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_detail(v, depth + 1) for v in value]
    return clean_text(str(value), MAX_DETAIL_TEXT)


def clean_event(event: AuditEvent) -> AuditEvent:
    """``event`` fit for any log and any database: every text without control characters or lone
    surrogates (see ``UNPRINTABLE``) and cut to its column's width, the same for ``details``.

    Applied where an event is made (the middleware, on the hub and on the controllers) and again
    where the hub stores one: a controller's events are not trusted.
    """
    return event.model_copy(update={
        "actor": clean_text(event.actor, WIDTHS["actor"]),
        "method": clean_text(event.method, WIDTHS["method"]),
        "path": clean_text(event.path, WIDTHS["path"]),
        "target": clean_text(event.target, WIDTHS["target"]) if event.target else None,
        "error_code": clean_text(event.error_code, WIDTHS["error_code"]) if event.error_code else None,
        "remote": clean_text(event.remote, WIDTHS["remote"]) if event.remote else None,
        "details": _clean_detail(event.details),
    })


def identify(request: HTTPConnection, actor: str) -> None:
    """Name who is calling, for the audit trail; authentication calls this once it has succeeded."""
    setattr(request.state, ACTOR_ATTR, actor)


def identify_call(scope: Scope, actor: str) -> None:
    """``identify`` for a call without a ``Request`` (a pure ASGI route): the same state, the scope's."""
    scope.setdefault("state", {})[ACTOR_ATTR] = actor


def describe_call(request: HTTPConnection, **details: Any) -> None:
    """Add ``details`` to this call's audit event (never a secret: they are stored as given)."""
    state = request.scope.setdefault("state", {})
    state.setdefault(DETAILS_ATTR, {}).update(details)


def skip_call(scope: Scope, skip: bool = True) -> None:
    """Keep this call out of the audit trail (``skip``), or back in it."""
    scope.setdefault("state", {})[SKIP_ATTR] = skip


def refused_call(scope: Scope, code: str, message: str) -> None:
    """Audit this call, as refused with ``code`` and ``message`` (an answer that is not the API's JSON)."""
    state = scope.setdefault("state", {})
    state[SKIP_ATTR] = False
    state[ERROR_ATTR] = (code, message)


def result_of(status_code: int) -> str:
    """ok | refused (4xx) | error (5xx): the audit log's ``result``."""
    if status_code >= 500:
        return "error"
    return "refused" if status_code >= 400 else "ok"


def event_line(event: AuditEvent, **extra: Any) -> str:
    """One event as one JSON line, for a log."""
    return json.dumps({**event.model_dump(mode="json"), "result": result_of(event.status_code), **extra},
                      separators=(",", ":"), sort_keys=True)


@dataclass
class _Suppressed:
    count: int
    since: datetime
    last: AuditEvent


class Coalescer:
    """Bounds what refusals nobody can be held to cost the audit log (see ``COALESCE_WINDOW``).

    Coalesced: refusals (4xx) of anonymous callers, keyed by their address, and 429s of authenticated
    ones, keyed by the actor. Within each fixed window of ``window`` seconds a key's first ``per_key``
    events, and ``total`` of all keys together, are recorded; the rest are counted. When the window has
    closed, ``take`` and ``flush`` give one summary event per key whose events were suppressed: the
    last suppressed call's method, path and status, ``details`` ``{"suppressed": n, "since": ...}``
    (``remote`` null and ``details.over`` ``"total"`` for those over the total). Everything else passes.
    """

    def __init__(self, window: float = COALESCE_WINDOW, per_key: int = COALESCE_PER_KEY, total: int = COALESCE_TOTAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.per_key = per_key
        self.total = total
        self.clock = clock
        self._index = self._now_index()
        self._counts: dict[tuple[str, str], int] = {}
        self._admitted = 0
        self._suppressed: dict[tuple[str, str] | None, _Suppressed] = {}

    def _now_index(self) -> int:
        return int(self.clock() // self.window)

    @property
    def suppressing(self) -> bool:
        return bool(self._suppressed)

    def remaining(self) -> float:
        """Seconds until the current window closes."""
        return (self._index + 1) * self.window - self.clock()

    def flush(self) -> list[AuditEvent]:
        """The summaries of the window that closed, if it has (then a new one begins)."""
        index = self._now_index()
        if index == self._index:
            return []
        self._index = index
        self._counts.clear()
        self._admitted = 0
        summaries = [self._summary(key, s) for key, s in self._suppressed.items()]
        self._suppressed.clear()
        return summaries

    def take(self, event: AuditEvent) -> list[AuditEvent]:
        """What to record now: summaries of a window that closed, then ``event`` unless it is suppressed."""
        summaries = self.flush()
        if event.actor == ANONYMOUS and 400 <= event.status_code < 500:
            key = ("remote", event.remote or "")
        elif event.status_code == 429:
            key = ("actor", event.actor)
        else:
            return [*summaries, event]
        count = self._counts.get(key, 0)
        if count < self.per_key and self._admitted < self.total:
            self._counts[key] = count + 1
            self._admitted += 1
            return [*summaries, event]
        # Over its own bound, or (slot None) over the total of all keys.
        slot = key if count >= self.per_key else None
        held = self._suppressed.get(slot)
        if held is None:
            self._suppressed[slot] = _Suppressed(1, event.at, event)
            log.warning("audit: over %d refusals from %s within %g s: counting the rest, one event for them "
                        "when the window closes", self.per_key if slot else self.total,
                        f"{key[0]} {key[1]!r}" if slot else "all callers together", self.window)
        else:
            held.count += 1
            held.last = event
        return summaries

    def _summary(self, key: tuple[str, str] | None, held: _Suppressed) -> AuditEvent:
        last = held.last
        details: dict[str, Any] = {"suppressed": held.count, "since": held.since.isoformat()}
        if key is None:
            details["over"] = "total"
        return AuditEvent(at=datetime.now(UTC), actor=last.actor if key else ANONYMOUS, method=last.method,
                          path=last.path, status_code=last.status_code, error_code=last.error_code,
                          remote=last.remote if key else None, details=details)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, record: Record, skip: Skip | None = None,
                 coalescer: Coalescer | None = None) -> None:
        self.app = app
        self.record_one = record
        self.skip = skip
        self.coalescer = coalescer if coalescer is not None else Coalescer()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def record(self, event: AuditEvent) -> None:
        for item in self.coalescer.take(event):
            await self.record_one(item)
        self._schedule()

    def _schedule(self) -> None:
        """While events are being counted, record their summaries once the window closes, calls or not."""
        if self.coalescer.suppressing and self._timer is None:
            delay = min(max(self.coalescer.remaining(), 0.0), self.coalescer.window) + 0.05
            self._timer = asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        for summary in self.coalescer.flush():
            await self.record_one(summary)
        self._schedule()

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

        # Not a coroutine function: a call that is not audited (most) costs no coroutine of its own per message.
        def audit_send(message: Message) -> Awaitable[None]:
            nonlocal status, audited, size, recorded
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                audited = (method in MUTATING or 400 <= status < 500) and not state.get(SKIP_ATTR) and not (
                    self.skip is not None and self.skip(method, _route_path(scope), status)
                )
            elif audited and not recorded and kind == "http.response.body":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= MAX_CAPTURE:
                    captured.append(chunk)
                if not message.get("more_body", False):
                    recorded = True
                    return self._record_then(_event(scope, state, status, _captured(captured, size)), send, message)
            return send(message)

        try:
            await self.app(scope, receive, audit_send)
        except Exception:
            # The server's last-resort handler answers 500 once this propagates.
            if not recorded and (audited or (not status and method in MUTATING and not state.get(SKIP_ATTR))):
                await self.record(_event(scope, state, status or 500, _captured(captured, size)))
            raise

    async def _record_then(self, event: AuditEvent, send: Send, message: Message) -> None:
        await self.record(event)
        await send(message)


def _captured(chunks: list[bytes], size: int) -> bytes:
    return b"".join(chunks) if size <= MAX_CAPTURE else b""


def _route_path(scope: Scope) -> str:
    """The path as the routes match it: behind a proxy's prefix (``root_path``), without the prefix."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


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
            # What a create made: the new service's id, the new container's, the new user, the new model type.
            target = _text(answer.get("id") or answer.get("container_id") or answer.get("username")
                           or answer.get("name"), 160)
    if error_code is None and state.get(ERROR_ATTR):
        code, said = state[ERROR_ATTR]
        error_code, message = _text(code, 64), _text(said, MAX_MESSAGE)
    if error_code is None and status >= 500 and not body:
        error_code = "INTERNAL_ERROR"
    details: dict[str, Any] = dict(state.get(DETAILS_ATTR) or {})
    if message:
        details["message"] = message
    # RequestIdMiddleware runs outside this one: the event names the call's log lines.
    request_id = current_request_id()
    if request_id:
        details["request_id"] = request_id
    client = scope.get("client")
    return clean_event(AuditEvent(
        at=datetime.now(UTC),
        actor=str(state.get(ACTOR_ATTR) or ANONYMOUS),
        method=scope["method"],
        path=scope["path"],
        target=target,
        status_code=status,
        error_code=error_code,
        remote=str(client[0]) if client else None,
        details=details,
    ))


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _text(value: Any, limit: int) -> str | None:
    return str(value)[:limit] if isinstance(value, str | int) and value != "" else None
