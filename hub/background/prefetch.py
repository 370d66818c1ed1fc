"""Pre-pulling onto likely failover targets, on the leading replica (docs/ARCHITECTURE.md, Image locality).

Every ``MMANAGER_PREFETCH_INTERVAL`` seconds ``Prefetcher`` reads the running services' copies (one read;
the specs only of those that want preparing: ``prefetch`` in the spec, or an image of at least
``MMANAGER_PREFETCH_MIN_IMAGE_BYTES`` as the heartbeats report its size), asks the pure planner
(``hub.scheduler.prefetch``) for each one's next ``MMANAGER_PREFETCH_TARGETS`` failover targets, and
prepares each (service, controller) pair in ``prepare``: the controller pulls the image unless its
heartbeats say it holds it (with the service's registry credentials, opened for that pull only), and a
``prefetch`` service's model files are synced into its cache (``hub.services.model_files.presync``).

Invariants: at most one preparation runs per pair, at most ``MAX_RUNNING`` at once, off the loop's tick; a
pull that failed is not tried again on that controller for ``RETRY_AFTER`` seconds; a pull that succeeded
is not repeated while the controller's heartbeats catch up (``PULLED_KEPT``), and counts in the image sets at
once, so a failover right after it places by it. Nothing here deletes anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database, any_of
from hub.errors import HubError
from hub.metrics import HubMetrics
from hub.models import ContainerRegistryModel, ServiceModel
from hub.scheduler.placement import image_key
from hub.scheduler.prefetch import PrefetchCandidate, PrefetchTarget, plan_prefetch, wants_prefetch
from hub.scheduler.snapshot import PlacementCache
from hub.schemas import ServiceSpec
from hub.services import registry_auth
from hub.services.lifecycle.deploy import placement_request
from hub.services.locality import ImageSets
from hub.services.model_files import presync
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

# Preparations running at once (each a pull on one controller).
MAX_RUNNING = 4
# Seconds before a failed pull onto a controller is tried again.
RETRY_AFTER = 600.0
# Seconds a pull that succeeded counts as done while the controller's next heartbeats list the image.
PULLED_KEPT = 120.0
# The same, for a controller that reports no images (nothing will ever list it there).
UNREPORTED_KEPT = 3600.0

_R = ContainerRegistryModel.__table__
_S = ServiceModel.__table__
_COPIES = (select(_R.c.service_id, _R.c.controller_id, _R.c.image,
                  _S.c.spec["prefetch"].as_boolean().label("prefetch"))
           .join(_S, _S.c.id == _R.c.service_id)
           .where(_S.c.desired_state == "running", _R.c.status != "stale"))

Pair = tuple[str, str]


class Prefetcher(LoopService):
    name = "prefetch"

    def __init__(self, db: Database, settings: HubSettings, client: ControllerClient, placement: PlacementCache,
                 images: ImageSets, metrics: HubMetrics) -> None:
        super().__init__(settings.prefetch_interval, jitter=0.1)
        self.db = db
        self.settings = settings
        self.client = client
        self.placement = placement
        self.images = images
        self.metrics = metrics
        self._specs = (select(_S.c.id, _S.c.spec, _S.c.registry_auth_sealed)
                       .where(any_of(_S.c.id, "ids", sqlite=db.is_sqlite)))
        # Each candidate's registry credentials, sealed (opened only for its pull).
        self._sealed: dict[str, str | None] = {}
        # The specs of ``prefetch`` services that name model files: their targets sync those files too.
        self._models: dict[str, ServiceSpec] = {}
        self._running: dict[Pair, asyncio.Task[None]] = {}
        self._failed: dict[Pair, float] = {}
        self._pulled: dict[Pair, float] = {}
        # The targets of the last pass.
        self.targets: list[PrefetchTarget] = []

    async def stop(self) -> None:
        await super().stop()
        running, self._running = list(self._running.values()), {}
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def run_once(self) -> None:
        self.targets = await self.plan()
        now = time.monotonic()
        self._failed = {pair: until for pair, until in self._failed.items() if until > now}
        self._pulled = {pair: until for pair, until in self._pulled.items() if until > now}
        for target in self.targets:
            pair = (target.service_id, target.controller_id)
            if len(self._running) >= MAX_RUNNING:
                break
            if pair in self._running or not self.wanted(target, now):
                continue
            task = asyncio.create_task(self._prepare(pair, target), name=f"prefetch-{target.controller_id}")
            self._running[pair] = task

    async def plan(self) -> list[PrefetchTarget]:
        """The targets of every service that wants preparing, from the placement view as it is now."""
        min_bytes = self.settings.prefetch_min_image_bytes
        copies: dict[str, tuple[set[str], str, bool]] = {}
        for r in await self.db.all(_COPIES, {}):
            on, _, _ = copies.setdefault(r["service_id"], (set(), r["image"], bool(r["prefetch"])))
            on.add(r["controller_id"])
        wanted = [sid for sid, (_, image, prefetch) in copies.items()
                  if wants_prefetch(prefetch, self.images.size(image_key(image)), min_bytes)]
        if not wanted:
            return []
        candidates = []
        self._sealed, self._models = {}, {}
        for r in await self.db.all(self._specs, {"ids": wanted}):
            try:
                spec = ServiceSpec.model_validate(r["spec"])
            except ValidationError:
                continue
            self._sealed[r["id"]] = r["registry_auth_sealed"]
            if spec.prefetch and spec.models:
                self._models[r["id"]] = spec
            request = placement_request(spec, frozenset(copies[r["id"]][0]))
            candidates.append(PrefetchCandidate(r["id"], request, spec.image, spec.prefetch))
        index = await self.placement.index()
        return plan_prefetch(candidates, index.place, targets=self.settings.prefetch_targets,
                             image_size=self.images.size, min_image_bytes=min_bytes)

    def wanted(self, target: PrefetchTarget, now: float) -> bool:
        """Whether the pair has anything to prepare: an image the controller lacks and was not just pulled
        (nor failed to pull lately)."""
        pair = (target.service_id, target.controller_id)
        lacking = not target.image_present or target.service_id in self._models
        return lacking and pair not in self._failed and pair not in self._pulled

    async def _prepare(self, pair: Pair, target: PrefetchTarget) -> None:
        try:
            await self.prepare(target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed[pair] = time.monotonic() + RETRY_AFTER
            self.metrics.prefetch_pulls.labels("failed").inc()
            message = exc.message if isinstance(exc, HubError) else f"{type(exc).__name__}: {exc}"
            log.warning("could not prepare controller %s for service %s: %s", target.controller_id,
                        target.service_id, message)
        else:
            self._pulled[pair] = max(self._pulled.get(pair, 0.0), time.monotonic() + PULLED_KEPT)
        finally:
            self._running.pop(pair, None)

    async def prepare(self, target: PrefetchTarget) -> None:
        """Make ``target.controller_id`` ready to take ``target.service_id`` over: its image pulled, and a
        ``prefetch`` service's model files synced into its cache."""
        url = self.placement.urls.get(target.controller_id)
        if url is None:
            return
        if not target.image_present:
            started = time.monotonic()
            auth = registry_auth.opened(self.settings.sealer, self._sealed.get(target.service_id), target.service_id,
                                        target.image_ref)
            image: dict[str, Any] = await self.client.pull_image(target.controller_id, url, target.image_ref, auth)
            # Known at once, ahead of the controller's next listing: a failover right after places by it.
            keys = {image_key(target.image_ref), *map(image_key, image.get("tags") or ()),
                    *([image_key(image["id"])] if image.get("id") else [])}
            if not self.images.add(target.controller_id, keys, int(image.get("size") or 0)):
                # It reports no images (polled): nothing will say it holds this one; not pulled again for long.
                self._pulled[(target.service_id, target.controller_id)] = time.monotonic() + UNREPORTED_KEPT
            self.metrics.prefetch_pulls.labels("pulled").inc()
            log.info("pre-pulled %s onto %s for service %s (%s bytes, %.1f s)", target.image_ref,
                     target.controller_id, target.service_id, image.get("size"),
                     time.monotonic() - started)
        spec = self._models.get(target.service_id)
        if spec is not None:
            # Its model files into the target's cache too (a sync of files it holds only marks them used):
            # a failover there then waits for no transfer.
            synced = await presync(self.client, target.controller_id, url, spec, self.settings.model_sync_timeout)
            if synced is not None and synced.fetched:
                log.info("pre-synced %d model file(s) onto %s for service %s (%d bytes, %.1f s)",
                         len(synced.fetched), target.controller_id, target.service_id, synced.bytes, synced.seconds)
