"""One error base for the hub and the controller, and the handlers that answer with it.

Below the routers both sides raise ``AppError`` subclasses (``hub.errors``,
``controller.errors``), never ``HTTPException``: each class carries its code
and HTTP status. ``install_error_handlers`` maps them, and what the framework
raises itself, to one envelope, ``{"error": {"code", "message", "details"}}``
(``mmanager.wire.ErrorEnvelope``); an app adds its own handlers through
``extra``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from mmanager.limits import BodyTooLarge, too_large

Handler = Callable[[Request, Any], Awaitable[Response]]


def envelope(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The body of every error either side answers (``mmanager.wire.ErrorEnvelope``, built without pydantic)."""
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(code, message, details), status_code=status, headers=headers)


class AppError(Exception):
    status_code = 400
    code = "BAD_REQUEST"
    # Extra response headers (Retry-After on a 429 or 503, WWW-Authenticate on a 401).
    headers: dict[str, str] | None = None

    def __init__(self, message: str, details: Any = None, *, code: str | None = None,
                 status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code

    def envelope(self) -> dict[str, Any]:
        return envelope(self.code, self.message, self.details)

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status_code, headers=self.headers)


def problems(exc: RequestValidationError) -> list[dict[str, Any]]:
    """A validation error's findings, only loc/msg/type: the raw ones may carry the input (a key, a file)
    and objects JSON cannot hold."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]


def summary(found: list[dict[str, Any]]) -> str:
    """``invalid request: body.name: Field required; …``"""
    return "invalid request: " + "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in found)


def install_error_handlers(
    app: FastAPI,
    *,
    log: logging.Logger,
    internal_message: str,
    http_codes: Mapping[int, str],
    http_headers: bool = True,
    invalid_message: Callable[[list[dict[str, Any]]], str] = summary,
    malformed_json: bool = False,
    extra: Mapping[type[BaseException], Handler] | None = None,
) -> None:
    """Answer ``AppError``s, invalid requests (422 ``VALIDATION_ERROR``), bodies over the limit (413),
    Starlette's HTTP errors (their status; the code from ``http_codes``, else ``HTTP_ERROR``) and anything
    else (500 ``INTERNAL_ERROR`` with ``internal_message``, the traceback to ``log``) with the envelope.

    ``http_headers``: pass an HTTP error's headers on (``Allow`` on a 405). ``malformed_json``: a body that
    is not JSON answers 400 ``MALFORMED_JSON`` rather than a 422. ``extra`` adds handlers, or replaces
    these for the same class (``Exception`` included).
    """

    async def app_error(_: Request, exc: AppError) -> Response:
        return exc.response()

    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        found = problems(exc)
        if malformed_json and any(p["type"] == "json_invalid" for p in found):
            return error_response(400, "MALFORMED_JSON", "the body is not valid JSON", found)
        return error_response(422, "VALIDATION_ERROR", invalid_message(found), found)

    async def body_too_large(_: Request, exc: BodyTooLarge) -> Response:
        return too_large(exc.limit)

    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, http_codes.get(exc.status_code, "HTTP_ERROR"), str(exc.detail),
                              headers=exc.headers if http_headers else None)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "INTERNAL_ERROR", internal_message)

    handlers: dict[type[BaseException], Handler] = {
        AppError: app_error,
        RequestValidationError: validation_error,
        BodyTooLarge: body_too_large,
        StarletteHTTPException: http_error,
        Exception: unexpected,
    }
    handlers.update(extra or {})
    for error, handler in handlers.items():
        if issubclass(error, Exception):  # Starlette hands its handlers nothing else
            app.add_exception_handler(error, handler)
