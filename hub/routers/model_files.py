"""The model-file store (docs/API.md, Model files): users upload, list and download; admins delete; each
controller downloads with its own key what a create on it names."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select

from hub.deps import AdminUser, CurrentUser, HubDep, SessionDep, admit_controller
from hub.models import ModelFileModel
from hub.routers.paging import Limit, Offset
from hub.schemas import ModelFileOut
from hub.services.model_files import ModelStore, check_name, delete_file, get_file, record

router = APIRouter(prefix="/api", tags=["model-files"])

# The upload's path: the body limit gives it MMANAGER_MODEL_FILE_MAX_BYTES rather than the API's small one.
UPLOAD_PATH = "/api/model-files"


@router.post("/model-files", status_code=201, response_model=ModelFileOut,
             responses={200: {"description": "the same bytes were in the store already"},
                        413: {"description": "the file is larger than MMANAGER_MODEL_FILE_MAX_BYTES"}})
async def upload(request: Request, user: CurrentUser, hub: HubDep, session: SessionDep,
                 name: str | None = Query(default=None, max_length=128)) -> Any:
    """The raw request body is the file (any content type): streamed to disk and hashed as it comes."""
    store = hub.services.model_store
    if name is not None:
        check_name(name, "")
    digest, size = await store.receive(request.stream())
    row, new = await record(session, digest, size, check_name(name, digest), user.username)
    out = ModelFileOut.model_validate(row, from_attributes=True)
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if new else 200)


@router.get("/model-files", response_model=list[ModelFileOut])
async def list_files(_: CurrentUser, session: SessionDep, limit: int = Limit, offset: int = Offset) -> Any:
    rows = await session.scalars(select(ModelFileModel).order_by(ModelFileModel.created_at, ModelFileModel.digest)
                                 .limit(limit).offset(offset))
    return [ModelFileOut.model_validate(row, from_attributes=True) for row in rows]


@router.get("/model-files/{digest}", response_class=FileResponse)
async def download(digest: str, _: CurrentUser, hub: HubDep, session: SessionDep) -> FileResponse:
    return await _file(hub.services.model_store, session, digest)


@router.get("/controllers/{controller_id}/model-files/{digest}", response_class=FileResponse)
async def controller_download(controller_id: str, digest: str, request: Request, hub: HubDep,
                              session: SessionDep) -> FileResponse:
    """A controller's download, with its heartbeat key (``controller.model_cache``)."""
    await admit_controller(hub, request.scope, controller_id)
    return await _file(hub.services.model_store, session, digest)


@router.delete("/model-files/{digest}", status_code=204)
async def delete(digest: str, _: AdminUser, hub: HubDep, session: SessionDep) -> Response:
    await delete_file(session, hub.services.model_store, digest)
    return Response(status_code=204)


async def _file(store: ModelStore, session: SessionDep, digest: str) -> FileResponse:
    row = await get_file(session, store, digest)
    return FileResponse(store.path(row.digest), media_type="application/octet-stream", filename=row.name,
                        headers={"X-Model-Digest": row.digest})
