"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Forbidden, Unauthorized
from hub.metrics import HubMetrics
from hub.models import UserModel
from hub.services.controllers import ControllerRegistry
from hub.services.heartbeats import HeartbeatIngest
from hub.services.lifecycle import ServiceManager
from hub.services.operations import OperationLog
from hub.services.users import authenticate

if TYPE_CHECKING:
    from hub.background.reconciler import ControllerPoller, Reconciler


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
    # Set while this replica leads.
    reconciler: Reconciler | None = None

    async def refresh_controllers(self) -> None:
        """Poll the controllers that do not push, and write what every controller said."""
        await self.poller.run_once()
        await self.ingest.flush()


def get_hub(request: Request) -> Hub:
    return request.app.state.hub


HubDep = Annotated[Hub, Depends(get_hub)]


async def get_session(hub: HubDep) -> AsyncIterator[AsyncSession]:
    async with hub.db.session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return token.strip()


async def get_current_user(request: Request, hub: HubDep) -> UserModel:
    token = bearer(request)
    async with hub.db.session() as session:
        return await authenticate(session, token)


CurrentUser = Annotated[UserModel, Depends(get_current_user)]


async def get_admin(user: CurrentUser) -> UserModel:
    if not user.is_admin:
        raise Forbidden("this needs an admin token", code="ADMIN_REQUIRED")
    return user


AdminUser = Annotated[UserModel, Depends(get_admin)]


async def authenticate_controller(request: Request, hub: HubDep, controller_id: str) -> str:
    """The controller's own key, before its body is even read; answers the controller id."""
    hub.ingest.authenticate(controller_id, bearer(request))
    return controller_id


ControllerAuth = Annotated[str, Depends(authenticate_controller)]
