"""Controller-facing endpoints, authenticated with the controller's key: heartbeats, and presence streams."""

from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from hub.deps import Hub, HubDep, admit_controller
from hub.errors import Overloaded, error_response
from hub.routers.hot import HotRoute, read_body, send_json
from hub.services.audit import CLIENT_CLOSED
from mmanager.wire import Heartbeat, HeartbeatAnswer

router = APIRouter(prefix="/api/controllers", tags=["controllers"])


async def receive_heartbeat(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /api/controllers/{controller_id}/heartbeat``, every controller's every few seconds (a
    ``HotRoute``, bound to ``hub``): the key checked before the body is read, the body parsed and the answer
    written by pydantic's core directly, the beat recorded with its batch (``HeartbeatIngest.receive``)."""
    controller_id = scope["path_params"]["controller_id"]
    await admit_controller(hub, scope, controller_id)
    heartbeat = _parse(await read_body(receive))
    try:
        answer = await hub.ingest.receive(controller_id, heartbeat)
    except Overloaded as exc:
        if exc.code != "DATABASE_UNAVAILABLE":
            raise  # shed (HUB_BUSY): the cheapest answer an overloaded hub gives
        # Its batch failed on the database (a connection a restart dropped, which the pool then replaces):
        # once more, so that a controller does not see the restart.
        answer = await hub.ingest.receive(controller_id, heartbeat)
    await send_json(send, answer.model_dump_json().encode())


def _parse(raw: bytes) -> Heartbeat:
    """The body as the wire's model; what it refuses, as FastAPI's validation refuses a body."""
    try:
        try:
            return Heartbeat.model_validate_json(raw)
        except ValidationError as exc:
            if not any(e["type"] == "json_invalid" for e in exc.errors()):
                raise
            # What Python's json takes and pydantic's parser does not (lone surrogates, NaN), as FastAPI would.
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise exc from None
            return Heartbeat.model_validate(parsed)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) \
            from None


# The heartbeat's declaration, for the OpenAPI document (no docstring: it would become the operation's
# description). Never called: a HotRoute hands every call it takes to ``receive_heartbeat``.
async def heartbeat(controller_id: str, body: Heartbeat) -> None:
    raise NotImplementedError("HotRoute answers through receive_heartbeat")


def heartbeat_route(hub: Hub) -> HotRoute:
    """The heartbeat's route, answered for ``hub`` (as ``services.status_read``)."""
    return HotRoute("/api/controllers/{controller_id}/heartbeat", heartbeat, partial(receive_heartbeat, hub),
                    methods=["POST"], response_model=HeartbeatAnswer, tags=["controllers"], name="heartbeat")


@router.post("/{controller_id}/presence", response_model=None, responses={503: {"description": "shutting down"}})
async def presence(controller_id: str, request: Request, hub: HubDep) -> JSONResponse:
    """A controller's presence stream (``controller.presence``): held open, its body never ending on its own,
    until the controller ends it with ``bye`` (a planned stop) or its connection is lost, which has the hub
    probe the controller at once and mark it lost when its address refuses connections
    (``hub.services.presence``). Not a heartbeat: it neither counts as one nor holds a database connection."""
    await admit_controller(hub, request.scope, controller_id)
    ended = await hub.presence.hold(request.receive)
    if ended == "lost":
        if await hub.presence.suspect(controller_id) == "confirmed" and hub.reconciler is not None:
            # This replica leads: its reconciler acts on the mark now rather than at its next tick.
            hub.reconciler.wake()
        # Nobody reads it.
        return error_response(CLIENT_CLOSED, "CLIENT_DISCONNECTED", "the controller went away")
    if ended == "closing":
        raise Overloaded("this hub replica is shutting down; open the stream to another", retry_after=1,
                         code="HUB_SHUTTING_DOWN")
    return JSONResponse({"ended": ended})
