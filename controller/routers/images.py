"""``/images``: what is on this host's daemon. Image names may hold '/' and ':', hence ``{name:path}``."""

from __future__ import annotations

from fastapi import APIRouter

from controller.deps import RuntimeDep
from controller.schemas import ImageDetail, ImageList, ImagePull, ImagePullResult, ImageRemoved, ImagesPruned
from mmanager.wire import ImagePullProgress

router = APIRouter(prefix="/images", tags=["images"])


@router.post("/pull", response_model=ImagePullResult)
async def pull(body: ImagePull, runtime: RuntimeDep) -> ImagePullResult:
    image = await runtime.pull_image(body.image, body.auth)
    return ImagePullResult(message=f"pulled {body.image}", image=image)


@router.post("/prune", response_model=ImagesPruned)
async def prune(runtime: RuntimeDep) -> ImagesPruned:
    deleted, reclaimed = await runtime.prune_images()
    return ImagesPruned(images_deleted=deleted, space_reclaimed=reclaimed)


@router.get("/pulls", response_model=list[ImagePullProgress])
async def pulls(runtime: RuntimeDep) -> list[ImagePullProgress]:
    """The pulls of missing images that creates are waiting for now, with their progress."""
    return runtime.pull_progress()


@router.get("", response_model=ImageList)
async def list_images(runtime: RuntimeDep) -> ImageList:
    return ImageList(images=await runtime.list_images())


@router.get("/{name:path}", response_model=ImageDetail)
async def inspect(name: str, runtime: RuntimeDep) -> ImageDetail:
    return await runtime.inspect_image(name)


@router.delete("/{name:path}", response_model=ImageRemoved)
async def remove(name: str, runtime: RuntimeDep, force: bool = False) -> ImageRemoved:
    deleted = await runtime.remove_image(name, force)
    return ImageRemoved(message=f"removed {name}", deleted=deleted)
