"""FastAPI dependencies, as ``Annotated`` aliases, and ``admit``: every call's authentication and rate
limit, the same for the routes FastAPI runs and for the hot routes (``hub.routers.hot``)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Scope

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Forbidden, RateLimited, Unauthorized
from hub.metrics import HubMetrics
from hub.models import UserModel
from hub.outage import DatabaseOutage
from hub.ratelimit import RateLimiter
from hub.services.controllers import ControllerRegistry
from hub.services.gateway import GatewayDirectory, GatewayTable
from hub.services.heartbeats import HeartbeatIngest
from hub.services.lifecycle import ServiceManager
from hub.services.operations import OperationLog
from hub.services.presence import PresenceWatch
from hub.services.users import Identity, UserAuth, as_user
from mmanager.audit import identify_call

if TYPE_CHECKING:
    from hub.background.poller import ControllerPoller
    from hub.background.reconciler import Reconciler
    from hub.services.jobs.core import JobService
    from hub.services.jobs.queue import Dispatcher
    from hub.services.jobs.watch import Watcher


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
    gateway: GatewayTable
    gateways: GatewayDirectory
    presence: PresenceWatch
    # The one account of a database outage in the log: every loop and the heartbeats report theirs there.
    outage: DatabaseOutage
    # Set while this replica leads.
    reconciler: Reconciler | None = None
    # Per-user request rate on this replica; None when MMANAGER_RATE_LIMIT is 0.
    limiter: RateLimiter | None = None
    # Batch jobs (hub.services.jobs): the API's side, the queue (every replica), the watcher (the leader's).
    jobs: JobService | None = None
    dispatcher: Dispatcher | None = None
    watcher: Watcher | None = None

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


def call_bearer(scope: Scope) -> str:
    """The bearer token of a call (its first ``Authorization`` header, as ``Request.headers`` reads it)."""
    for key, value in scope["headers"]:
        if key == b"authorization":
            token = bearer_token(value.decode("latin-1"))
            break
    else:
        token = None
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return token


def bearer(request: Request) -> str:
    return call_bearer(request.scope)


async def admit(hub: Hub, scope: Scope) -> Identity:
    """Who makes this call, and whether they may make it now: the token's user (``Unauthorized``), named
    for the audit trail, then one token of the user's rate limit (``RateLimited``), taken before anything
    is done so that a refused call has done nothing. Every route a user calls goes through here: the
    dependencies below, and the status read (``hub.routers.hot``), which tries ``admit_remembered`` first."""
    who = admit_remembered(hub, scope)
    if who is None:
        who = _admitted(hub, scope, await hub.users.identity(call_bearer(scope)))
    return who


def admit_remembered(hub: Hub, scope: Scope) -> Identity | None:
    """``admit`` for a token this replica accepted less than ``MMANAGER_AUTH_CACHE_SECONDS`` ago, without
    the database and without a coroutine; None (nothing done) when the token is not remembered, which
    ``admit`` then asks the database about. Its refusals (``Unauthorized``, ``RateLimited``) are ``admit``'s."""
    who = hub.users.remembered(call_bearer(scope))
    return None if who is None else _admitted(hub, scope, who)


def _admitted(hub: Hub, scope: Scope, who: Identity) -> Identity:
    identify_call(scope, who.username)
    if hub.limiter is not None:
        wait = hub.limiter.acquire(who.id)
        if wait:
            raise RateLimited(f"too many requests from {who.username!r}; retry in {wait}s", retry_after=wait)
    return who


async def admit_controller(hub: Hub, scope: Scope, controller_id: str) -> None:
    """Whether the call's key may speak for ``controller_id`` (``Unauthorized`` if not), named for the audit
    trail: the heartbeat checks it before it reads its body, so a caller without a valid key costs one key
    lookup, never a parse."""
    await hub.ingest.authenticate(controller_id, call_bearer(scope))
    identify_call(scope, f"controller:{controller_id}")


async def get_current_user(request: Request, hub: HubDep) -> UserModel:
    return as_user(await admit(hub, request.scope))


CurrentUser = Annotated[UserModel, Depends(get_current_user)]


async def key_or_admin(request: Request, hub: Hub, key: SecretStr | None, actor: str, refusal: str) -> str:
    """Who asks, for a route a machine reaches with a key of its own: ``actor`` for that key (named for the
    audit trail), else an admin user's name; anyone else is refused with ``refusal``."""
    token = bearer(request)
    if key is not None and hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        identify_call(request.scope, actor)
        return actor
    user = await get_current_user(request, hub)
    if not user.is_admin:
        raise Forbidden(refusal, code="ADMIN_REQUIRED")
    return user.username


async def get_admin(user: CurrentUser) -> UserModel:
    if not user.is_admin:
        raise Forbidden("this needs an admin token", code="ADMIN_REQUIRED")
    return user


AdminUser = Annotated[UserModel, Depends(get_admin)]
