"""Which controllers to prepare for a service's failover before it happens: pure, like placement.

A service is prepared when its spec says ``prefetch`` or its image is at least ``min_image_bytes`` (0: that
rule off). Its targets are the controllers its failover would pick next: placement itself (``place``, the
same function a failover calls), asked with the controllers the service runs on excluded, then, for each
further target, those chosen before excluded too. A target says whether it holds the image already (the
placement's ``IMAGE_PRESENT`` reason): the caller pulls onto the others and skips those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from hub.scheduler.placement import IMAGE_PRESENT, Placement, PlacementRequest


@dataclass(frozen=True)
class PrefetchCandidate:
    """A running service: ``request`` is its placement request with the controllers it runs on in ``exclude``
    and its image (``image_key``) in ``image``; ``image_ref`` is the image as its spec names it."""

    service_id: str
    request: PlacementRequest
    image_ref: str
    prefetch: bool = False


@dataclass(frozen=True)
class PrefetchTarget:
    service_id: str
    controller_id: str
    image_ref: str
    image_present: bool


def wants_prefetch(prefetch: bool, image_bytes: int, min_image_bytes: int) -> bool:
    return prefetch or (min_image_bytes > 0 and image_bytes >= min_image_bytes)


def plan_prefetch(candidates: Iterable[PrefetchCandidate], place: Callable[[PlacementRequest], Placement], *,
                  targets: int = 1, image_size: Callable[[str], int] = lambda _: 0,
                  min_image_bytes: int = 0) -> list[PrefetchTarget]:
    """The next ``targets`` failover targets of every candidate that wants preparing, in order."""
    out: list[PrefetchTarget] = []
    for c in candidates:
        image = c.request.image
        if image is None or not wants_prefetch(c.prefetch, image_size(image), min_image_bytes):
            continue
        request = c.request
        for _ in range(targets):
            decision = place(request)
            if decision.controller_id is None:
                break
            out.append(PrefetchTarget(c.service_id, decision.controller_id, c.image_ref,
                                      decision.reason == IMAGE_PRESENT))
            request = replace(request, exclude=request.exclude | {decision.controller_id})
    return out
