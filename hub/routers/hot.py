"""The routes every client and every controller call all the time: the status read (``hub.routers.services``)
and the heartbeat (``hub.routers.controllers``), and the order in which a call reaches them.

A ``HotRoute`` is an ``APIRoute`` whose call goes to its ``answer``, a pure ASGI function: no ``Request``, no
dependency solving, no response validation. The OpenAPI document describes it from its declaration (an
endpoint whose signature names the path parameters and the body, its response model), as any route; the
declaration is never called.

``HotApp`` is a FastAPI application that dispatches a call matching one of its hot routes (method and path,
a full match as its router finds it) ahead of FastAPI's own layers: ``HotDispatch`` runs the route's
``answer`` inside the application's own middlewares (the same classes, built once, in the same order) and
answers what it raises with the application's exception handlers, looked up as Starlette's exception and
server-error middlewares look them up. Everything else, a wrong method on a hot path included, goes to the
FastAPI stack untouched, where the same route objects are declared.

The invariant: each hot route has one handler, its ``answer``. The dispatcher only orders: whichever way a
call reaches a hot route, it runs that ``answer``, with the same middlewares and the same error handlers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

_JSON = (b"content-type", b"application/json")

Handler = Callable[[Request, Exception], Any]


class HotRoute(APIRoute):
    def __init__(self, path: str, declaration: Callable[..., Any], answer: ASGIApp, **kwargs: Any) -> None:
        super().__init__(path, declaration, **kwargs)
        self.answer = answer
        self.answered = frozenset(self.methods or ())

    def full_match(self, scope: Scope) -> Scope | None:
        """The child scope of a full match, as ``matches`` gives it for a top-level route (its own regex on the
        routed path, the parameters converted, ``route`` set); None for any other call. It is all of
        ``matches`` that ``HotDispatch`` needs: a call there is not yet inside an included router's context."""
        if scope["method"] not in self.answered:
            return None
        found = self.path_regex.match(get_route_path(scope))
        if found is None:
            return None
        params = dict(scope.get("path_params", {}))
        for key, value in found.groupdict().items():
            params[key] = self.param_convertors[key].convert(value)
        return {"endpoint": self.endpoint, "path_params": params, "route": self}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Reached through the router only for another method (405), or where no ``HotDispatch`` runs.
        if scope["method"] in self.answered:
            await self.answer(scope, receive, send)
        else:
            await super().handle(scope, receive, send)  # 405, with Allow


class HotApp(FastAPI):
    """A FastAPI application whose hot routes are dispatched ahead of FastAPI's layers (``HotDispatch``)."""

    def build_middleware_stack(self) -> ASGIApp:
        return HotDispatch(self, super().build_middleware_stack())


class HotDispatch:
    """``app``'s hot routes in front of ``stack`` (``app``'s whole middleware stack and router)."""

    def __init__(self, app: FastAPI, stack: ASGIApp) -> None:
        self.stack = stack
        self.router = app.router
        handlers = dict(app.exception_handlers)
        # As Starlette builds its stack: the handler of ``Exception`` (or 500) is the server-error middleware's,
        # outside the application's middlewares; the others are the exception middleware's, inside them.
        self.error_handler: Handler | None = None
        for key in (500, Exception):
            if key in handlers:
                self.error_handler = handlers.pop(key)
        by_status = {k: v for k, v in handlers.items() if isinstance(k, int)}
        by_type: dict[Any, Handler] = {HTTPException: ExceptionMiddleware(stack).http_exception}
        by_type.update((k, v) for k, v in handlers.items() if not isinstance(k, int))
        # Each method's hot routes, in the router's order: a call is tested against those of its method only.
        self.routes: dict[str, list[tuple[HotRoute, ASGIApp]]] = {}
        for route in app.router.routes:
            if isinstance(route, HotRoute):
                chain: ASGIApp = _Handled(route.answer, by_type, by_status)
                for cls, args, kwargs in reversed(app.user_middleware):
                    chain = cls(chain, *args, **kwargs)
                for method in route.answered:
                    self.routes.setdefault(method, []).append((route, chain))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route, chain in self.routes.get(scope["method"], ()):
                child = route.full_match(scope)
                if child is not None:
                    scope.setdefault("router", self.router)
                    scope.update(child)
                    try:
                        await chain(scope, receive, send)
                    except Exception as exc:
                        # As ``ServerErrorMiddleware``: the application's answer to an unexpected error,
                        # then the error raised on for the server to log. (A hot ``answer`` sends its
                        # answer last, once nothing of its own can fail: no answer has started here.)
                        if self.error_handler is not None:
                            response = await _call(self.error_handler, Request(scope), exc)
                            await response(scope, receive, send)
                        raise
                    return
        await self.stack(scope, receive, send)


class _Handled:
    """As Starlette's ``ExceptionMiddleware``: an exception with a handler becomes that handler's answer,
    inside the application's middlewares (the audit sees it); any other is raised on."""

    def __init__(self, app: ASGIApp, by_type: Mapping[Any, Handler], by_status: Mapping[int, Handler]) -> None:
        self.app = app
        self.by_type = by_type
        self.by_status = by_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            handler = self.by_status.get(exc.status_code) if isinstance(exc, HTTPException) else None
            if handler is None:
                handler = next((self.by_type[c] for c in type(exc).__mro__ if c in self.by_type), None)
            if handler is None:
                raise
            response = await _call(handler, Request(scope, receive), exc)
            if response is not None:
                await response(scope, receive, send)
            exc.__traceback__ = None  # (as Starlette: a reused exception instance would pile up tracebacks)


async def _call(handler: Handler, request: Request, exc: Exception) -> Any:
    if inspect.iscoroutinefunction(handler):
        return await handler(request, exc)
    return await run_in_threadpool(handler, request, exc)


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
