"""Logging for the hub and the controllers: one setup, one format, request ids.

``LogSettings`` (``LOG_LEVEL``, ``LOG_FILE``, ``LOG_FORMAT``; ``MMANAGER_*``
aliases) is a mixin of both processes' settings; ``setup_logging`` installs one
handler on the root logger, so uvicorn's error and access logs, httpx and our
own modules all come out the same way: text lines, or with ``LOG_FORMAT=json``
one JSON object per line (``time``, ``level``, ``logger``, ``message``,
``request_id`` when there is one, ``exception``).

``RequestIdMiddleware`` gives every HTTP call an id, the caller's
``X-Request-ID`` when it is sane (``clean_request_id``) or a fresh one, answers
it in ``X-Request-ID`` and puts it in ``request_id_var`` for the call's
duration, so every line logged while serving it carries it. The hub's
controller client sends it on, and the controller takes it the same way: one
id finds a call on both sides. Background work binds an id of its own
(``bind_request_id``: a move's operation id).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Awaitable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode()
# What an incoming id may be: a UUID, a hex digest, a proxy's own id scheme. Anything else (a newline
# that would forge a log line, a kilobyte of junk) is replaced by a fresh id, never echoed.
MAX_REQUEST_ID = 128
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=+/-]*")

access_log = logging.getLogger("mmanager.access")

request_id_var: ContextVar[str | None] = ContextVar("mmanager_request_id", default=None)

# Successful calls that come every few seconds from every controller, prober and scraper: their access
# lines are dropped unless LOG_LEVEL is DEBUG.
_ROUTINE = re.compile(r"^/(health|metrics|api/controllers/[^/?]+/heartbeat)(\?|$)")
# The status read clients poll (a GET of one service; hub.routers.services), as routine as a health check.
_POLL = re.compile(r"^/api/services/[^/?]+(\?|$)")


class LogSettings(BaseSettings):
    """The same names on the hub and the controllers (docs/OPERATIONS.md, Logs)."""

    log_level: str = Field(default="INFO", validation_alias=AliasChoices("LOG_LEVEL", "MMANAGER_LOG_LEVEL"))
    # None: stderr. A file is appended to, created if missing.
    log_file: Path | None = Field(default=None, validation_alias=AliasChoices("LOG_FILE", "MMANAGER_LOG_FILE"))
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=AliasChoices("LOG_FORMAT", "MMANAGER_LOG_FORMAT"))

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("log_file", mode="before")
    @classmethod
    def _blank_is_stderr(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class LogFileError(Exception):
    """LOG_FILE cannot be opened for appending: the process must not start writing its logs nowhere."""


def clean_request_id(value: str | bytes | None) -> str | None:
    """``value`` when it is fit to log and echo (at most 128 safe characters), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not value or len(value) > MAX_REQUEST_ID or not _SANE_ID.fullmatch(value):
        return None
    return value


def new_request_id() -> str:
    # 128 random bits in 32 hex digits, as uuid4().hex but without the cost of building a UUID.
    return os.urandom(16).hex()


def current_request_id() -> str | None:
    return request_id_var.get()


def bind_request_id(value: str) -> None:
    """Tag everything the current task logs from now on (and the controller calls it makes) with ``value``.

    For background work, which no request carries: each task gets its own copy of the context, so this
    stays within the task that calls it.
    """
    request_id_var.set(value)


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request it was logged under (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def _routine(method: str, path: str, status: int) -> bool:
    """A successful health check, scrape, heartbeat or status poll: no access line above DEBUG."""
    return status < 400 and (_ROUTINE.match(path) is not None or (method == "GET" and _POLL.match(path) is not None))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Never raises on odd values: a message is text already, the rest are plain types.
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(settings: LogSettings) -> logging.Handler:
    """Route every logger through one handler on the root logger, at LOG_LEVEL.

    Raises ``LogFileError`` when LOG_FILE cannot be opened. Run uvicorn with ``log_config=None`` and no
    ``log_level`` afterwards, so its loggers propagate here instead of installing their own handlers.
    """
    handler: logging.Handler
    if settings.log_file is not None:
        try:
            settings.log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(settings.log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(settings.log_file) else ""
            raise LogFileError(f"LOG_FILE {str(settings.log_file)!r} cannot be opened for appending: "
                               f"{exc.strerror or exc}{where}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        # Whatever uvicorn or an earlier setup left there: everything goes through the root's handler.
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    # uvicorn's own access line is off (it logs where it finds a handler): RequestIdMiddleware writes it, as
    # ``mmanager.access``, and builds none for the routine calls it would drop (building one costs a hot call dearly).
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
    # httpx logs every request at INFO: one line per heartbeat and per poll would drown the rest.
    logging.getLogger("httpx").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    return handler


class RequestIdMiddleware:
    """Pure ASGI (streamed answers pass through untouched): the call's id into ``request_id_var``, the
    ``X-Request-ID`` answer header, and the call's access line once its answer starts (uvicorn's format,
    logger ``mmanager.access``; none above DEBUG for a routine call that succeeded).

    Install it with ``install_request_ids(app)``: outside Starlette's error middleware, so the line of an
    unexpected error and its 500 carry the id too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for key, value in scope.get("headers", ()):
            if key == _HEADER_KEY:
                incoming = value
                break
        rid = clean_request_id(incoming) if incoming is not None else None
        if rid is None:
            rid = new_request_id()
        header = (_HEADER_KEY, rid.encode())

        started = False

        # Not a coroutine function: no coroutine of its own per message.
        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = []
                for item in message.get("headers", ()):  # (a loop: a comprehension is a call of its own)
                    if item[0].lower() != _HEADER_KEY:
                        headers.append(item)
                headers.append(header)
                message = {**message, "headers": headers}
                _access_line(scope, message["status"])
            return send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not started:
                _access_line(scope, 500)  # uvicorn answers it 500 itself, past this middleware
            raise
        finally:
            request_id_var.reset(token)


def _access_line(scope: Scope, status: int) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    method = scope["method"]
    if not access_log.isEnabledFor(logging.DEBUG) and _routine(method, scope["path"], status):
        return
    client = get_client_addr(scope)  # type: ignore[arg-type]  # uvicorn's TypedDict of this HTTP scope
    path = get_path_with_query_string(scope)  # type: ignore[arg-type]  # (Starlette's Scope: a plain mapping)
    access_log.info('%s - "%s %s HTTP/%s" %d', client, method, path, scope["http_version"], status)


def install_request_ids(app: Any) -> None:
    """Put ``RequestIdMiddleware`` around a Starlette app's whole middleware stack, error handling included
    (``add_middleware`` would place it inside Starlette's ``ServerErrorMiddleware``)."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIdMiddleware(build())
