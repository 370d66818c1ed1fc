"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Forbidden, RateLimited, Unauthorized
from hub.metrics import HubMetrics
from hub.models import UserModel
from hub.ratelimit import RateLimiter
from hub.services.controllers import ControllerRegistry
from hub.services.heartbeats import HeartbeatIngest
from hub.services.lifecycle import ServiceManager
from hub.services.operations import OperationLog
from hub.services.users import UserAuth
from mmanager.audit import identify

if TYPE_CHECKING:
    from hub.background.poller import ControllerPoller
    from hub.background.reconciler import Reconciler


@dataclass
class Hub:
    """Everything a request may need, built once in the app's lifespan."""

    settings: HubSettings
    db: Database
    client: ControllerClient
    metrics: HubMetrics
    ops: OperationLog
    controllers: ControllerRegistry
    services: ServiceManager
    ingest: HeartbeatIngest
    poller: ControllerPoller
    replica_id: str
    users: UserAuth
    # Set while this replica leads.
    reconciler: Reconciler | None = None
    # Per-user request rate on this replica; None when MMANAGER_RATE_LIMIT is 0.
    limiter: RateLimiter | None = None

    async def refresh_controllers(self) -> None:
        """Poll the controllers that do not push, and write what every controller said."""
        await self.poller.run_once()
        await self.ingest.flush()


async def get_hub(request: Request) -> Hub:
    # (async: FastAPI runs a plain function dependency in a worker thread, a thread hop on every call.)
    return request.app.state.hub


HubDep = Annotated[Hub, Depends(get_hub)]


async def get_session(hub: HubDep) -> AsyncIterator[AsyncSession]:
    async with hub.db.session() as session:
        yield session


# Function scope: the handler's transaction commits when it returns, before its answer goes out (with
# FastAPI's default request scope it would commit after the answer was sent: a 201 for a change that may
# still fail, and on SQLite a write lock held while the audit middleware writes the call's event).
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization`` header's value ``Bearer <token>``; None for anything else."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer(request: Request) -> str:
    token = bearer_token(request.headers.get("authorization", ""))
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return token


# Set in a request's state by hub.fastlane when it took the call's rate-limit token and then handed the call on.
RATE_CHARGED = "rate_charged"


async def get_current_user(request: Request, hub: HubDep) -> UserModel:
    user = await hub.users.authenticate(bearer(request))
    identify(request, user.username)
    if hub.limiter is not None and not getattr(request.state, RATE_CHARGED, False):
        # Before the handler runs, so a refused call has done nothing.
        wait = hub.limiter.acquire(user.id)
        if wait:
            raise RateLimited(f"too many requests from {user.username!r}; retry in {wait}s", retry_after=wait)
    return user


CurrentUser = Annotated[UserModel, Depends(get_current_user)]


async def get_admin(user: CurrentUser) -> UserModel:
    if not user.is_admin:
        raise Forbidden("this needs an admin token", code="ADMIN_REQUIRED")
    return user


AdminUser = Annotated[UserModel, Depends(get_admin)]


class ControllerRoute(APIRoute):
    """A route only a controller's key reaches (``/api/controllers/{controller_id}/...``).

    The key is checked before FastAPI reads and parses the body (it reads the body
    before it runs any dependency), so a caller without a valid key costs one key
    lookup, never a parse.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authenticated(request: Request) -> Response:
            controller_id = request.path_params["controller_id"]
            await request.app.state.hub.ingest.authenticate(controller_id, bearer(request))
            request.state.controller_id = controller_id
            identify(request, f"controller:{controller_id}")
            return await handler(request)

        return authenticated


async def authenticate_controller(request: Request, hub: HubDep, controller_id: str) -> str:
    """The controller id, once its key is checked (by ``ControllerRoute``, before the body is read)."""
    if getattr(request.state, "controller_id", None) != controller_id:
        await hub.ingest.authenticate(controller_id, bearer(request))
    identify(request, f"controller:{controller_id}")
    return controller_id


ControllerAuth = Annotated[str, Depends(authenticate_controller)]
