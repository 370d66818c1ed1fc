"""Controller-facing endpoints: heartbeats, authenticated with the controller's key."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from hub.deps import ControllerRoute
from mmanager.wire import Heartbeat, HeartbeatAnswer

router = APIRouter(prefix="/api/controllers", tags=["controllers"], route_class=ControllerRoute)


@router.post(
    "/{controller_id}/heartbeat",
    response_model=HeartbeatAnswer,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Heartbeat"}}}}},
)
async def heartbeat(controller_id: str, request: Request) -> Response:
    # The hot path of every controller: the body is parsed and the answer written by pydantic's core
    # directly (no dependency solving, no intermediate dicts). ControllerRoute has checked the key.
    raw = await request.body()
    try:
        try:
            body = Heartbeat.model_validate_json(raw)
        except ValidationError as exc:
            if not any(e["type"] == "json_invalid" for e in exc.errors()):
                raise
            # What Python's json takes and pydantic's parser does not (lone surrogates, NaN), as FastAPI would.
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise exc from None
            body = Heartbeat.model_validate(parsed)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) \
            from None
    answer = await request.app.state.hub.ingest.receive(controller_id, body)
    return Response(answer.model_dump_json(), media_type="application/json")


def document_bodies(app: FastAPI) -> None:
    """Put the heartbeat's schema in the OpenAPI document (the route reads its body itself)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            wire = Heartbeat.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in wire.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault("Heartbeat", wire)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
