"""What images each controller holds, as its heartbeats report them: in this replica's memory, never written.

``ImageSets`` keeps, per controller, the version of its image set and the ``image_key``s its images answer
to (tags, repository digests, ids), with the reverse index (key -> controllers) placement's image locality
and the prefetch loop read, and each image's size. A beat whose version is the one held costs nothing here;
the full list comes only when the set changed (``controller.inventory``). A controller whose list this
replica never got (polled, or its beats go to another replica) has no set here (``keys`` None), which is
not an empty one: placement does not take it to lack any image.

A set held here is only as good as the beats that keep it: ``keys`` answers None for a controller whose last
beat on this replica is older than ``grace`` (its beats go elsewhere now, or it is gone), a beat with no version
or another version than the one held drops the set until its list comes, and a controller no longer in the
database loses its set with the next placement snapshot (``retain``). A partial list (the controller's caps,
``Heartbeat.images_partial``) is taken as what the host holds: only its largest images are missing from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable

from hub.scheduler.placement import NO_IMAGES, image_key
from mmanager.wire import HeldImage

_NONE: frozenset[str] = frozenset()


def held_keys(image: HeldImage) -> set[str]:
    """Every ``image_key`` one held image answers to."""
    return {image_key(image.id), *(image_key(t) for t in image.tags), *(image_key(d) for d in image.digests)}


class ImageSets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # Seconds after a controller's last beat here that its set still counts (the heartbeat grace).
        self.grace = math.inf
        # When each controller's last beat reached this replica (``clock`` time).
        self._seen: dict[str, float] = {}
        # Called with a controller's id when its set changed: placement's view takes it in place.
        self.on_change: Callable[[str], None] | None = None
        self._versions: dict[str, str] = {}
        self._keys: dict[str, frozenset[str]] = {}
        self._holders: dict[str, set[str]] = {}
        self._sizes: dict[str, int] = {}

    def version(self, controller_id: str) -> str | None:
        return self._versions.get(controller_id)

    def keys(self, controller_id: str) -> frozenset[str] | None:
        """What the controller holds; None when it never reported (not the same as holding nothing), or its
        last beat here is older than the grace."""
        keys = self._keys.get(controller_id)
        if keys is not None and self.clock() - self._seen.get(controller_id, -math.inf) > self.grace:
            return None
        return keys

    def beat(self, controller_id: str, version: str | None, images: list[HeldImage] | None) -> None:
        """A beat from the controller reached this replica: its list when it carried one; without one, a
        version other than the one held (None included) means the set held is stale and is dropped."""
        self._seen[controller_id] = self.clock()
        if images is not None:
            self.update(controller_id, version, images)
        elif version != self._versions.get(controller_id) and controller_id in self._keys:
            self.forget(controller_id)

    def retain(self, controller_ids: Collection[str], before: float) -> None:
        """Drop the sets of controllers not among ``controller_ids`` (those in the database) whose last beat
        here came before ``before`` (``clock`` time: one that registered since is kept)."""
        for cid in [c for c in self._seen if c not in controller_ids and self._seen[c] < before]:
            self.forget(cid)
            del self._seen[cid]

    def holders(self, key: str) -> Iterable[str]:
        return self._holders.get(key, _NONE)

    def has(self, controller_id: str, key: str) -> bool:
        return key in (self.keys(controller_id) or NO_IMAGES)

    def size(self, key: str) -> int:
        """The image's size in bytes as a controller holding it reported it; 0 when none holds it."""
        return self._sizes.get(key, 0)

    def update(self, controller_id: str, version: str | None, images: list[HeldImage]) -> None:
        """A controller's full image list (a beat that carried one)."""
        keys: set[str] = set()
        for image in images:
            for key in held_keys(image):
                keys.add(key)
                self._sizes[key] = image.size
        self._replace(controller_id, frozenset(keys))
        if version is None:
            self._versions.pop(controller_id, None)
        else:
            self._versions[controller_id] = version

    def add(self, controller_id: str, keys: Iterable[str], size: int) -> bool:
        """Keys the hub knows a controller holds now (it had it pull them), ahead of its next listing, which
        replaces them (the version held is left as it is, so that listing comes). Only for a controller that
        reports its images: False for another (one image known would make it seem to lack all others)."""
        held = self._keys.get(controller_id)
        if held is None:
            return False
        added = frozenset(keys)
        for key in added:
            self._sizes[key] = size
        self._replace(controller_id, held | added)
        return True

    def forget(self, controller_id: str) -> None:
        self._replace(controller_id, None)
        self._versions.pop(controller_id, None)

    def _replace(self, controller_id: str, reported: frozenset[str] | None) -> None:
        before = self._keys.get(controller_id, NO_IMAGES)
        keys = reported if reported is not None else NO_IMAGES
        for key in before - keys:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(controller_id)
                if not holders:
                    del self._holders[key]
                    self._sizes.pop(key, None)
        for key in keys - before:
            self._holders.setdefault(key, set()).add(controller_id)
        was = self._keys.get(controller_id)
        if reported is None:
            self._keys.pop(controller_id, None)
        else:
            self._keys[controller_id] = reported
        if reported != was and self.on_change is not None:
            self.on_change(controller_id)
