"""The images this host holds, as the heartbeats report them (``Heartbeat.images``).

``ImageInventory`` lists them (one Docker call) in a background task, at most one at a time: every
``MMANAGER_IMAGES_INTERVAL`` seconds, and at once after this controller's runtime pulled, removed or pruned an
image (``Runtime.pulls_done`` moves). A beat only reads the last listing (``version``, ``images``) and asks for
the next one (``refresh``); it never waits for Docker's image list, so a slow listing cannot delay a beat. A
listing that fails or takes longer than ``LIST_BUDGET`` keeps the previous one and is taken again on the
interval, not on every beat.

Each listing has a version, a digest of its content: a beat carries the full list only while the hub's last
answer did not name the current version, so an unchanged set costs a beat one short string and the hub no work.
The list is capped (``MAX_IMAGES`` images, about ``max_bytes`` of JSON; the largest images are kept, they are
the ones whose pull costs most) and then marked ``partial``: the hub takes it as what the host holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable

from controller.errors import ControllerError
from controller.runtime import Runtime
from mmanager.wire import MAX_HELD_IMAGES, HeldImage

log = logging.getLogger(__name__)

# Seconds one listing may take before it is given up (the previous one stays).
LIST_BUDGET = 30.0
# The most images one beat lists, and about how many bytes of JSON they may take: a beat must stay well under
# the hub's body limit (MMANAGER_MAX_HEARTBEAT_BYTES, 8 MiB by default) beside its containers and audit events.
MAX_IMAGES = MAX_HELD_IMAGES
MAX_IMAGE_BYTES = 2 * 1024**2


def images_version(images: list[HeldImage]) -> str:
    """A digest of the set (order does not matter): equal sets have equal versions."""
    canonical = sorted([i.id, sorted(i.tags), sorted(i.digests), i.size] for i in images)
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()[:32]


def _json_size(image: HeldImage) -> int:
    """About the bytes one image takes in a heartbeat's JSON."""
    return 48 + len(image.id) + sum(len(t) + 3 for t in image.tags) + sum(len(d) + 3 for d in image.digests)


def capped(images: list[HeldImage], count: int, max_bytes: int) -> tuple[list[HeldImage], bool]:
    """The largest images that fit ``count`` and ``max_bytes``, and whether any was left out."""
    ordered = sorted(images, key=lambda i: (-i.size, i.id))
    kept: list[HeldImage] = []
    total = 0
    for image in ordered[:count]:
        total += _json_size(image)
        if total > max_bytes:
            break
        kept.append(image)
    return kept, len(kept) < len(images)


class ImageInventory:
    def __init__(self, runtime: Runtime, interval: float, clock: Callable[[], float], *,
                 max_images: int = MAX_IMAGES, max_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.runtime = runtime
        self.interval = interval
        self.clock = clock
        self.max_images = max_images
        # Lowered when the hub refused a beat that carried the list as too large (``shrink``).
        self.max_bytes = max_bytes
        self.images: list[HeldImage] | None = None
        self.version: str | None = None
        # The last listing left images out (the caps).
        self.partial = False
        self._listed_at = -float("inf")
        self._pulls_seen = -1
        self._all: list[HeldImage] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def listing(self) -> bool:
        return self._task is not None

    def refresh(self) -> None:
        """Start a listing in the background when one is due and none is under way; never waits for it."""
        if not self.enabled or self._task is not None:
            return
        if self.clock() - self._listed_at < self.interval and self.runtime.pulls_done == self._pulls_seen:
            return
        self._task = asyncio.get_running_loop().create_task(self._list(), name="image-listing")

    async def current(self) -> tuple[str | None, list[HeldImage] | None]:
        """A listing taken now when one is due (for callers that may wait), then the last one."""
        self.refresh()
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.version, self.images

    def shrink(self) -> None:
        """The hub refused a beat that carried the list as too large: later lists take half the bytes."""
        self.max_bytes //= 2
        if self._all is not None:
            self._set(self._all)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _list(self) -> None:
        started, pulls = self.clock(), self.runtime.pulls_done
        try:
            images = await asyncio.wait_for(self.runtime.held_images(), LIST_BUDGET)
        except TimeoutError:
            log.debug("images not listed for the heartbeat: Docker did not list them within %g s", LIST_BUDGET)
        except ControllerError as exc:
            log.debug("images not listed for the heartbeat: %s", exc.message)
        else:
            self._all = images
            self._set(images)
        finally:
            # A listing that failed is taken again on the interval, not on every beat.
            self._listed_at, self._pulls_seen = started, pulls
            self._task = None

    def _set(self, images: list[HeldImage]) -> None:
        kept, self.partial = capped(images, self.max_images, self.max_bytes)
        if self.partial:
            log.debug("the heartbeats list %d of this host's %d images (the largest)", len(kept), len(images))
        self.images, self.version = kept, images_version(kept)
