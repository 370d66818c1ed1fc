"""The admin image API: list a controller's images, pull an image onto chosen controllers, prune their
unused images. Each call reaches each named controller once, all at once; one controller's failure is its
own outcome, not the call's. Invariant: every controller named exists before any is asked (404
``CONTROLLER_NOT_FOUND`` otherwise, and nothing is done), and a pull's credentials go to the controllers
for that pull only: never stored, logged or answered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import HubError, InvalidRequest
from hub.models import ControllerModel
from hub.schemas import ImageOutcome, RegistryAuthIn
from hub.services.controllers import get_controller
from mmanager.wire import RegistryAuth


async def named_controllers(db: Database, ids: list[str]) -> list[ControllerModel]:
    """The controllers ``ids`` names, in its order; 404 for the first unknown one, 422 for one named twice."""
    if len(set(ids)) != len(ids):
        raise InvalidRequest("a controller is named more than once", {"controllers": ids})
    async with db.session() as session:
        return [await get_controller(session, cid) for cid in ids]


async def _each(controllers: list[ControllerModel],
                call: Callable[[ControllerModel], Awaitable[ImageOutcome]]) -> list[ImageOutcome]:
    async def one(controller: ControllerModel) -> ImageOutcome:
        try:
            return await call(controller)
        except HubError as exc:
            return ImageOutcome(controller_id=controller.id, ok=False,
                                error={"code": exc.code, "message": exc.message, "details": exc.details})

    return list(await asyncio.gather(*(one(c) for c in controllers)))


async def pull(client: ControllerClient, controllers: list[ControllerModel], image: str,
               auth: RegistryAuthIn | None) -> list[ImageOutcome]:
    """Each controller pulls ``image`` (logged in with ``auth``); per controller, the image or the error."""
    wire = RegistryAuth(username=auth.username, password=auth.password) if auth is not None else None

    async def one(controller: ControllerModel) -> ImageOutcome:
        pulled = await client.pull_image(controller.id, controller.url, image, wire)
        return ImageOutcome(controller_id=controller.id, ok=True, image=pulled)

    return await _each(controllers, one)


async def prune(client: ControllerClient, controllers: list[ControllerModel]) -> list[ImageOutcome]:
    """Each controller removes its unused images (Docker's dangling ones: untagged, and no container,
    running or stopped, uses them); per controller, what went and the bytes freed, or the error."""

    async def one(controller: ControllerModel) -> ImageOutcome:
        deleted, reclaimed = await client.prune_images(controller.id, controller.url)
        return ImageOutcome(controller_id=controller.id, ok=True, images_deleted=deleted, space_reclaimed=reclaimed)

    return await _each(controllers, one)
