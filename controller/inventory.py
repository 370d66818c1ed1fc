"""The images this host holds, as the heartbeats report them (``Heartbeat.images``).

``ImageInventory`` lists them (one Docker call) at most every ``MMANAGER_IMAGES_INTERVAL`` seconds, and at
once after a pull through this controller's runtime; between listings it answers the last one. Each listing
has a version, a digest of its content: a beat carries the full list only while the hub's last answer did
not name the current version, so an unchanged set costs a beat one short string and the hub no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from controller.errors import ControllerError
from controller.runtime import Runtime
from mmanager.wire import HeldImage

log = logging.getLogger(__name__)


def images_version(images: list[HeldImage]) -> str:
    """A digest of the set (order does not matter): equal sets have equal versions."""
    canonical = sorted([i.id, sorted(i.tags), sorted(i.digests), i.size] for i in images)
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()[:32]


class ImageInventory:
    def __init__(self, runtime: Runtime, interval: float, clock: Callable[[], float]) -> None:
        self.runtime = runtime
        self.interval = interval
        self.clock = clock
        self.images: list[HeldImage] | None = None
        self.version: str | None = None
        self._listed_at = -float("inf")
        self._pulls_seen = -1

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    async def current(self) -> tuple[str | None, list[HeldImage] | None]:
        """(version, images) as of the last listing, taken again first when it is due. A listing that fails
        keeps the previous one (None before the first): the hub keeps what it was told."""
        if not self.enabled:
            return None, None
        now = self.clock()
        if now - self._listed_at >= self.interval or self.runtime.pulls_done != self._pulls_seen:
            pulls = self.runtime.pulls_done
            try:
                images = await self.runtime.held_images()
            except ControllerError as exc:
                log.debug("images not listed for the heartbeat: %s", exc.message)
                return self.version, self.images
            self.images, self.version = images, images_version(images)
            self._listed_at, self._pulls_seen = now, pulls
        return self.version, self.images
