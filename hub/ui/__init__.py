"""The web console, served by the hub at ``/ui``: server-rendered pages (``hub.ui.pages``) that speak to the
hub through its own API, in process.

``console(api)`` builds it as an application of its own, mounted under the hub's: its answers, errors and
static files included, all carry the console's security headers (``hub.ui.security.SecurityHeaders``),
and the hub's API routes and hot paths gain no middleware for it.

The hub's audit middleware sees the console's requests too: they are kept out of the trail
(``Unaudited``), for what a console action does is audited as the API call it makes, and only the refusals
the console makes itself are recorded, with their code (``hub.ui.pages.refusal``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from hub.errors import HubError
from hub.ui import pages, security
from hub.ui.templating import HERE
from mmanager.audit import refused_call, skip_call
from mmanager.client import ApiError

PATH = "/ui"


def console(api: FastAPI) -> ASGIApp:
    """The console for the hub application ``api`` (whose ``state.hub`` it reads, and which it calls)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.api = api
    app.state.hub = api.state.hub
    settings = api.state.hub.settings
    app.state.site = security.Site(settings.console_url, settings.console_session_seconds)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    async def sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, pages.SignIn)
        response = RedirectResponse(f"{pages.base(request)}/login" + ("?expired=true" if exc.expired else ""),
                                    status_code=303)
        if exc.expired:
            pages.site(request).clear_session(response, request, pages.base(request))
        return response

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError | HubError)
        view = pages.refusal(request, exc)
        return pages.render(request, "error.html", view["status"], error=view)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        code = "NOT_FOUND" if status == 404 else "METHOD_NOT_ALLOWED" if status == 405 else "BAD_REQUEST"
        message = {404: "no such page", 405: "this page does not take that method"}.get(status, "bad request")
        refused_call(request.scope, code, message)
        return pages.render(request, "error.html", status,
                            error={"status": status, "code": code, "message": message, "lines": []})

    async def invalid(request: Request, exc: Exception) -> Response:
        refused_call(request.scope, "VALIDATION_ERROR", "the request is invalid")
        return pages.render(request, "error.html", 422, error={
            "status": 422, "code": "VALIDATION_ERROR", "message": "the request is invalid",
            "lines": [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in getattr(exc, "errors", list)()]})

    handlers: dict[Any, Any] = {pages.SignIn: sign_in, ApiError: refused, HubError: refused,
                                HTTPException: not_found, RequestValidationError: invalid}
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    return Unaudited(security.SecurityHeaders(app))


class Unaudited:
    """Keeps the console's requests out of the hub's audit trail unless the console marks one as a refusal of
    its own (``mmanager.audit.refused_call``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        skip_call(scope)
        await self.app(scope, receive, send)
