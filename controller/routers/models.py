"""``/models``: this controller's model-file cache (``controller.model_cache``): what it holds, and a sync the
hub asks for ahead of a create (a service's likely failover target, before it is needed)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from controller.model_cache import ModelCache
from mmanager.wire import ModelsSynced, ModelSync

router = APIRouter(prefix="/models", tags=["models"])


def get_models(request: Request) -> ModelCache:
    return request.app.state.containers.models


ModelsDep = Annotated[ModelCache, Depends(get_models)]


@router.post("/sync", response_model=ModelsSynced)
async def sync(body: ModelSync, models: ModelsDep) -> ModelsSynced:
    return await models.sync(body.digests)


@router.get("")
async def cached(models: ModelsDep) -> dict[str, Any]:
    files = await asyncio.to_thread(models.cached)
    in_use = await models.mounted()
    return {"cache_bytes": models.limit, "used_bytes": sum(size for _, size in files),
            "files": [{"digest": digest, "bytes": size, "in_use": digest.removeprefix("sha256:") in in_use}
                      for digest, size in files]}
