"""Pre-pulling onto likely failover targets, on the leading replica (docs/ARCHITECTURE.md, Image locality).

Every ``MMANAGER_PREFETCH_INTERVAL`` seconds ``Prefetcher`` reads the running services' copies (one read;
the specs only of those that want preparing: ``prefetch`` in the spec, or an image of at least
``MMANAGER_PREFETCH_MIN_IMAGE_BYTES`` as the heartbeats report its size), asks the pure planner
(``hub.scheduler.prefetch``) for each one's next ``MMANAGER_PREFETCH_TARGETS`` failover targets, and
prepares each target: the controller pulls the image unless its heartbeats say it holds it (``pull``, with
the service's registry credentials, opened for that pull only), and a ``prefetch`` service's model files are
synced into its cache (``prepare``, per (service, controller); ``hub.services.model_files.presync``).

Invariants: at most one pull runs per (controller, image), whichever services want that image there, and one
pre-sync per (service, controller), at most ``MAX_RUNNING`` tasks at once, off the loop's tick; a pull that
failed is not tried again on that controller for ``RETRY_AFTER`` seconds; a pull that succeeded is not
repeated while the controller's heartbeats catch up (``PULLED_KEPT``), and counts in the image sets at once,
so a failover right after it places by it. Nothing here deletes anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.db import Database, any_of
from hub.errors import HubError
from hub.metrics import HubMetrics
from hub.models import ContainerRegistryModel, ServiceModel
from hub.outage import DatabaseOutage
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

# (service id, controller id): a model pre-sync. (controller id, image key): an image pull.
Pair = tuple[str, str]
Pull = tuple[str, str]


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, HubError) else f"{type(exc).__name__}: {exc}"


class Prefetcher(LoopService):
    name = "prefetch"

    def __init__(self, db: Database, settings: HubSettings, client: ControllerClient, placement: PlacementCache,
                 images: ImageSets, metrics: HubMetrics, outage: DatabaseOutage | None = None) -> None:
        super().__init__(settings.prefetch_interval, jitter=0.1)
        # Where a pull or sync lost to the database being away is told (once per outage); None: each is logged.
        self.outage = outage
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
        # Running tasks: image pulls by (controller, image key), model pre-syncs by (service, controller).
        self._running: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        # Image pulls by (controller, image key): failed (not tried again until then), done (not repeated until
        # then, while the controller's heartbeats catch up).
        self._failed: dict[Pull, float] = {}
        self._pulled: dict[Pull, float] = {}
        # Model pre-syncs by (service, controller): the same.
        self._sync_failed: dict[Pair, float] = {}
        self._synced: dict[Pair, float] = {}
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
        self._failed = {k: until for k, until in self._failed.items() if until > now}
        self._pulled = {k: until for k, until in self._pulled.items() if until > now}
        self._sync_failed = {k: until for k, until in self._sync_failed.items() if until > now}
        self._synced = {k: until for k, until in self._synced.items() if until > now}
        for target in self.targets:
            if len(self._running) >= MAX_RUNNING:
                break
            pull = (target.controller_id, image_key(target.image_ref))
            if self.wanted(target, now) and len(self._running) < MAX_RUNNING:
                # One pull per (controller, image), whichever services want it there.
                self._start(("pull", *pull), self._pull(pull, target), target)
            pair = (target.service_id, target.controller_id)
            if (target.service_id in self._models and pair not in self._synced and pair not in self._sync_failed
                    and ("sync", *pair) not in self._running and len(self._running) < MAX_RUNNING):
                self._start(("sync", *pair), self._prepare(pair, target), target)

    def _start(self, key: tuple[str, str, str], work: Coroutine[Any, Any, None], target: PrefetchTarget) -> None:
        self._running[key] = asyncio.create_task(self._guarded(key, work), name=f"prefetch-{target.controller_id}")

    async def _guarded(self, key: tuple[str, str, str], work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self._running.pop(key, None)

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
        """Whether the target's controller needs the image pulled: it lacks it, and it was not just pulled
        there (nor failed to pull lately), for this service or another."""
        pull = (target.controller_id, image_key(target.image_ref))
        return (not target.image_present and pull not in self._failed and pull not in self._pulled
                and ("pull", *pull) not in self._running)

    async def _pull(self, pull: Pull, target: PrefetchTarget) -> None:
        try:
            await self.pull(target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed[pull] = time.monotonic() + RETRY_AFTER
            self.metrics.prefetch_pulls.labels("failed").inc()
            if not self._database_away(exc):
                log.warning("could not pull %s onto controller %s for service %s: %s", target.image_ref,
                            target.controller_id, target.service_id, _message(exc))
        else:
            self._pulled[pull] = max(self._pulled.get(pull, 0.0), time.monotonic() + PULLED_KEPT)

    async def _prepare(self, pair: Pair, target: PrefetchTarget) -> None:
        try:
            await self.prepare(target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._sync_failed[pair] = time.monotonic() + RETRY_AFTER
            if not self._database_away(exc):
                log.warning("could not sync the model files of service %s onto controller %s: %s",
                            target.service_id, target.controller_id, _message(exc))
        else:
            self._synced[pair] = time.monotonic() + PULLED_KEPT

    def _database_away(self, exc: BaseException) -> bool:
        return self.outage is not None and self.outage.failed(self.name, exc)

    async def pull(self, target: PrefetchTarget) -> None:
        """Pull ``target``'s image onto its controller (with the service's registry credentials)."""
        url = self.placement.urls.get(target.controller_id)
        if url is None:
            return
        started = time.monotonic()
        auth = registry_auth.opened(self.settings.sealer, self._sealed.get(target.service_id), target.service_id,
                                    target.image_ref)
        image: dict[str, Any] = await self.client.pull_image(target.controller_id, url, target.image_ref, auth)
        # Known at once, ahead of the controller's next listing: a failover right after places by it.
        keys = {image_key(target.image_ref), *map(image_key, image.get("tags") or ()),
                *([image_key(image["id"])] if image.get("id") else [])}
        if not self.images.add(target.controller_id, keys, int(image.get("size") or 0)):
            # It reports no images (polled): nothing will say it holds this one; not pulled again for long.
            self._pulled[(target.controller_id, image_key(target.image_ref))] = time.monotonic() + UNREPORTED_KEPT
        self.metrics.prefetch_pulls.labels("pulled").inc()
        log.info("pre-pulled %s onto %s for service %s (%s bytes, %.1f s)", target.image_ref,
                 target.controller_id, target.service_id, image.get("size"), time.monotonic() - started)

    async def prepare(self, target: PrefetchTarget) -> None:
        """Sync a ``prefetch`` service's model files into ``target.controller_id``'s cache (a sync of files it
        holds only marks them used): a failover there then waits for no transfer."""
        url = self.placement.urls.get(target.controller_id)
        if url is None:
            return
        spec = self._models.get(target.service_id)
        if spec is not None:
            synced = await presync(self.client, target.controller_id, url, spec, self.settings.model_sync_timeout)
            if synced is not None and synced.fetched:
                log.info("pre-synced %d model file(s) onto %s for service %s (%d bytes, %.1f s)",
                         len(synced.fetched), target.controller_id, target.service_id, synced.bytes, synced.seconds)
