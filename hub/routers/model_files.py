"""The model-file store (docs/API.md, Model files): users upload, list, download and delete their own;
admins delete any; each controller downloads with its own key what a create on it names."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from hub.deps import CurrentUser, HubDep, SessionDep, admit_controller
from hub.errors import NotFound
from hub.models import ModelFileModel
from hub.routers.jobs import controller_artifact
from hub.routers.paging import Limit, Offset
from hub.schemas import ModelFileOut
from hub.services.model_files import ModelStore, allowance, check_name, delete_file, get_file, record

router = APIRouter(prefix="/api", tags=["model-files"])

# The upload's path: the body limit gives it MMANAGER_MODEL_FILE_MAX_BYTES rather than the API's small one.
UPLOAD_PATH = "/api/model-files"


@router.post("/model-files", status_code=201, response_model=ModelFileOut,
             responses={200: {"description": "the same bytes were in the store already"},
                        409: {"description": "MODEL_FILE_QUOTA_EXCEEDED: the caller's uploads are at their limit"},
                        413: {"description": "the file is larger than MMANAGER_MODEL_FILE_MAX_BYTES"},
                        429: {"description": "TOO_MANY_UPLOADS under way on this hub"},
                        507: {"description": "MODEL_STORE_FULL"}})
async def upload(request: Request, user: CurrentUser, hub: HubDep,
                 name: str | None = Query(default=None, max_length=128)) -> Any:
    """The raw request body is the file (any content type): streamed to disk and hashed as it comes. No
    database connection is held while it streams."""
    store, settings = hub.services.model_store, hub.settings
    if name is not None:
        check_name(name, "")
    with store.upload_slot():
        async with hub.db.session() as session:
            room, refusal = await allowance(session, settings.model_store_max_bytes,
                                            settings.model_files_per_user_bytes, user.username)
        declared = request.headers.get("content-length", "")
        if room <= 0 or (declared.isdigit() and int(declared) > room):
            raise refusal
        digest, size = await store.receive(request.stream(), room, lambda _: refusal)
        async with hub.db.session() as session:
            row, new = await record(session, digest, size, check_name(name, digest), user.username)
            out = ModelFileOut.model_validate(row, from_attributes=True)
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if new else 200)


@router.get("/model-files", response_model=list[ModelFileOut])
async def list_files(_: CurrentUser, session: SessionDep, limit: int = Limit, offset: int = Offset) -> Any:
    rows = await session.scalars(select(ModelFileModel).order_by(ModelFileModel.created_at, ModelFileModel.digest)
                                 .limit(limit).offset(offset))
    return [ModelFileOut.model_validate(row, from_attributes=True) for row in rows]


@router.get("/model-files/{digest}", response_class=StreamingResponse)
async def download(digest: str, _: CurrentUser, hub: HubDep, session: SessionDep) -> StreamingResponse:
    return await _file(hub.services.model_store, session, digest)


@router.get("/controllers/{controller_id}/model-files/{digest}", response_class=StreamingResponse)
async def controller_download(controller_id: str, digest: str, request: Request, hub: HubDep,
                              session: SessionDep) -> StreamingResponse:
    """A controller's download, with its heartbeat key (``controller.model_cache``): a model file, else a batch
    job's input from the artifact store, only for a live attempt on this controller that takes it (more reads
    only when no model file has the digest)."""
    await admit_controller(hub, request.scope, controller_id)
    try:
        return await _file(hub.services.model_store, session, digest)
    except NotFound:
        artifact = await controller_artifact(hub, session, controller_id, digest)
        if artifact is None:
            raise
        return artifact


@router.delete("/model-files/{digest}", status_code=204)
async def delete(digest: str, user: CurrentUser, hub: HubDep, session: SessionDep) -> Response:
    """The uploader's own file, or any for an admin; 409 MODEL_FILE_IN_USE while a spec names it."""
    await delete_file(session, hub.services.model_store, digest, user.username, user.is_admin)
    return Response(status_code=204)


_READ = 1024**2


async def _file(store: ModelStore, session: SessionDep, digest: str) -> StreamingResponse:
    """The file opened before the answer starts: a delete that removes it later does not cut the download
    (the open file keeps its bytes), and one that removed it first is a 404."""
    row = await get_file(session, store, digest)
    try:
        handle = await asyncio.to_thread(open, store.path(row.digest), "rb")
    except FileNotFoundError:
        raise NotFound(f"model file {digest} is not in the store", code="MODEL_FILE_NOT_FOUND") from None
    size = os.fstat(handle.fileno()).st_size
    headers = {"X-Model-Digest": row.digest, "Content-Length": str(size),
               "Content-Disposition": f'attachment; filename="{row.name}"'}
    return StreamingResponse(_chunks(handle), media_type="application/octet-stream", headers=headers)


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, _READ):
            yield chunk
    finally:
        handle.close()
