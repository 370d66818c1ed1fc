"""The admin image API (docs/API.md, Images): a controller's images, pulls and prunes (hub.services.images)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from hub.deps import AdminUser, HubDep, SessionDep
from hub.errors import HubError
from hub.schemas import ControllerImagesOut, ImageOutcome, ImagePruneIn, ImagePullIn
from hub.services import images
from hub.services.controllers import get_controller

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/controllers/{controller_id}/images", response_model=ControllerImagesOut)
async def controller_images(controller_id: str, _: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    controller = await get_controller(session, controller_id)
    try:
        listed = await hub.client.images(controller.id, controller.url)
    except HubError as exc:
        return ControllerImagesOut(controller_id=controller.id, ok=False, images=[],
                                   error={"code": exc.code, "message": exc.message})
    return ControllerImagesOut(controller_id=controller.id, images=listed)


@router.post("/images/pull", response_model=list[ImageOutcome])
async def pull_image(body: ImagePullIn, _: AdminUser, hub: HubDep) -> Any:
    controllers = await images.named_controllers(hub.db, body.controllers)
    return await images.pull(hub.client, controllers, body.image, body.registry_auth)


@router.post("/images/prune", response_model=list[ImageOutcome])
async def prune_images(body: ImagePruneIn, _: AdminUser, hub: HubDep) -> Any:
    controllers = await images.named_controllers(hub.db, body.controllers)
    return await images.prune(hub.client, controllers)
