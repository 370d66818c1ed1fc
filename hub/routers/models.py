"""The model catalog (docs/API.md, Model types): any user reads it, admins write it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from hub.deps import AdminUser, CurrentUser, HubDep, SessionDep
from hub.routers.paging import Limit, Offset
from hub.schemas import ModelTypeIn, ModelTypeOut
from hub.services.catalog import create_type, delete_type, get_type, replace_type, type_out, types_query

router = APIRouter(prefix="/api", tags=["models"])


@router.get("/models", response_model=list[ModelTypeOut])
async def list_models(_: CurrentUser, session: SessionDep, limit: int = Limit, offset: int = Offset) -> Any:
    return [type_out(row) for row in await session.scalars(types_query().limit(limit).offset(offset))]


@router.get("/models/{name}", response_model=ModelTypeOut)
async def get_model(name: str, _: CurrentUser, session: SessionDep) -> Any:
    return type_out(await get_type(session, name))


@router.post("/admin/models", status_code=201, response_model=ModelTypeOut)
async def create_model(body: ModelTypeIn, _: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    return type_out(await create_type(session, body, hub.settings.spec_policy))


@router.put("/admin/models/{name}", response_model=ModelTypeOut)
async def replace_model(name: str, body: ModelTypeIn, _: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    return type_out(await replace_type(session, name, body, hub.settings.spec_policy))


@router.delete("/admin/models/{name}", status_code=204)
async def delete_model(name: str, _: AdminUser, session: SessionDep) -> Response:
    await delete_type(session, name)
    return Response(status_code=204)
