"""Placing one copy of a service and making its container: the placement decision and its hold, the
``creating`` registry row, the container's configuration and the controller's create.

Invariants:
- a ``container_registry`` row exists, marked ``creating``, from the moment a controller is chosen, so
  concurrent placements count it; it is removed if the create fails, so a failed create leaves neither
  container nor row behind;
- placements are decided one at a time against this process's in-memory view (``PlacementCache``), each
  decision and its hold in one synchronous step, so two concurrent creates never both take the last slot
  of a controller; the database stays the authority: a registry row is only inserted while its controller
  is healthy, enabled and not draining (a batch's rows together, those refused decided again elsewhere),
  and a placement that finds nothing looks again at a fresh snapshot;
- a GPU service with a ``cpu_fallback`` runs its CPU variant (that image and resources, no GPU) only when
  no GPU fits on a fresh snapshot; a new copy is made as that variant exactly when its spec has a fallback
  and its placement holds no GPU (``runs_fallback``); a copy is on a fallback exactly when its spec asks for
  a GPU and its row holds none (``on_fallback``: decided from the copy, so a copy left by a partial roll or
  by a spec whose fallback was cleared still reads as one), so the variant needs no column of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse

from hub.controller_client import MODEL_SYNC_CODES
from hub.db import Tx
from hub.errors import (
    ControllerRejected,
    ControllerUnavailable,
    HubError,
    InvalidRequest,
    NoFeasibleController,
    NotFound,
)
from hub.models import (
    ContainerRegistryModel,
    ControllerModel,
    OperationModel,
    ServiceModel,
    UserModel,
    new_id,
    utcnow,
)
from hub.scheduler import Placement, PlacementRequest, place
from hub.scheduler.placement import image_key
from hub.scheduler.snapshot import Held
from hub.schemas import Endpoint, ModelMount, ServiceSpec
from hub.services import registry_auth, secrets
from hub.services.lifecycle import sql
from hub.services.lifecycle.context import Lifecycle
from hub.services.model_files import presync, resolve_models
from hub.services.policy import check_policy
from mmanager.wire import ContainerCreate, ContainerCreated, HealthCheck, ModelFile

log = logging.getLogger(__name__)

def wire_check(spec: ServiceSpec) -> HealthCheck | None:
    """The spec's health check as the controller takes it, with the golden-inference probe it carries."""
    if spec.health_check is None:
        return None
    check = spec.health_check.model_dump()
    if spec.probe is not None:
        check["probe"] = spec.probe.model_dump()
    return HealthCheck.model_validate(check)


# Seconds a controller's create may take before the hub shows its pull's progress, and between two looks.
PULL_PROGRESS_AFTER = 1.0
# Docker's container states, as the service status a user sees.
_DOCKER_TO_STATUS = {"running": "running", "created": "starting", "restarting": "starting", "paused": "stopped"}
CREATE_ATTEMPTS = 3


def docker_status(state: str, desired: str) -> str:
    if state in _DOCKER_TO_STATUS:
        return _DOCKER_TO_STATUS[state]
    return "failed" if desired == "running" else "stopped"


def container_name(service: ServiceModel, epoch: int, controller_id: str) -> str:
    """Unique per Docker engine even when several controllers share one (tests, a dev box)."""
    where = re.sub(r"[^A-Za-z0-9_.-]", "-", controller_id)[:32]
    return f"mm-{service.name}-{service.id[:8]}-{epoch}-{where}"


def volume_name(owner: UserModel, volume: str) -> str:
    """The Docker volume behind a service's named volume: one per owner, so no user mounts another's data.

    The owner's id comes first and ends at the first ``-``, which makes the name
    unambiguous although usernames and volume names may both contain ``-``
    (``alice`` + ``x-data`` and ``alice-x`` + ``data`` are different volumes).
    """
    return f"mm-{owner.id}-{owner.username}-{volume}"


def endpoint_for(controller_url: str, ports: dict[str, int | None]) -> Endpoint:
    host = urlparse(controller_url).hostname or ""
    return Endpoint(host=host, ports={key.split("/")[0]: value for key, value in ports.items()})


def runs_fallback(spec: ServiceSpec | Mapping[str, Any], gpus: Any) -> bool:
    """Does a copy holding ``gpus`` run ``spec`` (a spec, or one as stored)'s CPU variant? (A GPU placement
    always holds a GPU.)"""
    fallback = spec.cpu_fallback if isinstance(spec, ServiceSpec) else spec.get("cpu_fallback")
    return fallback is not None and not gpus


def on_fallback(spec: ServiceSpec | Mapping[str, Any], gpus: Any) -> bool:
    """Does a serving copy holding ``gpus`` run without the GPU its ``spec`` (a spec, or one as stored) asks
    for, that is a CPU variant (``running_spec``), whatever the spec says of its fallback now?"""
    if isinstance(spec, ServiceSpec):
        wants = spec.resources.gpu_required
    else:
        wants = bool((spec.get("resources") or {}).get("gpu_required"))
    return wants and not gpus


def running_spec(spec: ServiceSpec, gpus: Any) -> ServiceSpec:
    """The spec a copy holding ``gpus`` runs: ``spec``, or its CPU variant (its image and resources, its
    command if it names one, its env over the spec's, its own probe or none, the server type no longer
    forced to ``gpu``)."""
    if not runs_fallback(spec, gpus):
        return spec
    fallback = spec.cpu_fallback
    assert fallback is not None
    return spec.model_copy(update={
        "image": fallback.image, "resources": fallback.resources,
        "command": fallback.command if fallback.command is not None else spec.command,
        "env": {**spec.env, **fallback.env} if fallback.env else spec.env, "probe": fallback.probe,
        "server_type": None if spec.server_type == "gpu" else spec.server_type, "cpu_fallback": None})


def fallback_details(decision: Placement) -> dict[str, Any]:
    """What an operation says of a copy placed as the CPU fallback: why no GPU fitted."""
    codes = sorted({r.code for r in decision.gpu_rejections})
    return {"fallback": "cpu", "fallback_reason": f"no GPU fits ({', '.join(codes) or 'no GPU controller'})",
            "gpu_rejections": [r.as_dict() for r in decision.gpu_rejections]}


@dataclass(slots=True)
class Reserved:
    """A placement held: its ``creating`` row (committed), the controller it is on and its hold in the view;
    ``fallback``: the operation's details when it is the CPU fallback (``fallback_details``)."""

    row: ContainerRegistryModel
    controller: ControllerModel
    held: Held
    fallback: dict[str, Any] | None = None


@dataclass(slots=True)
class Deployed:
    """A copy made: its row (container id and name, status and endpoint set), its controller and Docker's
    status; ``image_pull``, the pull its controller made first (for the operation's details), if any;
    ``placement``: why that controller beyond its load (``Placement.reason``: "image present"), if anything."""

    row: ContainerRegistryModel
    controller: ControllerModel
    status: str
    image_pull: dict[str, Any] | None = None
    # Placed as the CPU fallback: why (``fallback_details``).
    fallback: dict[str, Any] | None = None
    placement: str = ""
    # The controller's sync of the spec's model files before the create, when it fetched any.
    model_sync: dict[str, Any] | None = None

    @classmethod
    def made(cls, row: ContainerRegistryModel, controller: ControllerModel, created: ContainerCreated,
             fallback: dict[str, Any] | None = None) -> Deployed:
        """What the controller's create made, recorded on the copy's row (not yet written)."""
        row.container_id, row.container_name, row.status = created.container_id, created.name, created.status
        row.endpoint = endpoint_for(controller.url, created.ports).model_dump()
        pulled = created.image_pull.model_dump() if created.image_pull is not None else None
        return cls(row, controller, created.status, pulled, fallback)

    @property
    def epoch(self) -> int:
        return self.row.epoch


class LookAgain(Exception):
    """Raised inside a transaction to roll it back: the in-memory view found no place; look at a fresh one."""


class Superseded(Exception):
    """Raised inside a transaction to roll it back: another operation completed the service first."""


def _settled(row: ContainerRegistryModel) -> dict[str, Any]:
    return {"row_id": row.id, "container_id": row.container_id, "container_name": row.container_name,
            "status": row.status, "endpoint": row.endpoint, "updated_at": utcnow()}


async def settle_row(tx: Tx, row: ContainerRegistryModel) -> bool:
    """Record the created container on its reserved row, unless the row was superseded meanwhile.

    An explicit UPDATE rather than a merge: a merge would write back the row's old
    ``updated_at`` and could un-stale a row another operation retired. What a
    heartbeat already recorded on the row (its health) is kept and copied onto ``row``.
    """
    found = await tx.first(sql.SETTLE_ROW, _settled(row))
    if found is None:
        return False
    row.health = found["health"]
    return True


async def settle_rows(tx: Tx, rows: list[ContainerRegistryModel], sqlite: bool) -> bool:
    """``settle_row`` for each of ``rows``, False if any was superseded meanwhile. A batch: the UPDATE for
    each row in one round trip, then one read of them all (the rows it updated stay locked until the
    transaction ends, so what the read finds is what the UPDATE left)."""
    if len(rows) == 1:
        return await settle_row(tx, rows[0])
    await tx.executemany(sql.SETTLE_EACH, [_settled(row) for row in rows])
    found = {r["id"]: r for r in await tx.all(sql.batch_rows(sqlite), {"ids": [row.id for row in rows]})}
    for row in rows:
        read = found.get(row.id)
        if read is None or read["status"] == "stale" or read["container_id"] != row.container_id:
            return False
        row.health = read["health"]
    return True


async def _insert_rows_if_placeable(tx: Tx, rows: list[ContainerRegistryModel], sqlite: bool) -> set[str]:
    """Insert each registry row only while its controller is healthy, enabled and not draining (the database
    has the last word on a decision made from the in-memory view); the ids of the rows inserted. One row:
    one statement. A batch: the same statement for each row in one round trip, then one read of which are
    there (a refusal is rare; it must still be known row by row)."""
    values = [{**{key: getattr(row, key) for key in sql.ROW_COLUMNS}, "place_on": row.controller_id} for row in rows]
    if len(rows) == 1:
        return {rows[0].id} if await tx.execute(sql.INSERT_ROW_IF_PLACEABLE, values[0]) == 1 else set()
    await tx.executemany(sql.INSERT_ROW_IF_PLACEABLE, values)
    found = await tx.all(sql.batch_rows(sqlite), {"ids": [row.id for row in rows]})
    return {r["id"] for r in found}


def placement_request(spec: ServiceSpec, exclude: frozenset[str] = frozenset()) -> PlacementRequest:
    """What placing ``spec`` (its main variant) asks (also the prefetch loop's question)."""
    return PlacementRequest(
        memory=spec.resources.memory_bytes,
        cpu=spec.resources.cpu_limit or 0.0,
        gpu_count=spec.resources.gpu_count,
        server_type=spec.server_type,
        gpu_model=spec.resources.gpu_model,
        gpu_min_memory=spec.resources.gpu_min_memory_bytes,
        gpu_memory=spec.resources.gpu_memory_bytes,
        exclude=exclude,
        golden_probe=spec.probe is not None,
        image=image_key(spec.image),
    )


def _fallback_request(spec: ServiceSpec, exclude: frozenset[str]) -> PlacementRequest | None:
    """The placement of ``spec``'s CPU variant, if it has one: its resources, on any server type but the
    one it pins other than ``gpu``."""
    if spec.cpu_fallback is None:
        return None
    resources = spec.cpu_fallback.resources
    return PlacementRequest(
        memory=resources.memory_bytes, cpu=resources.cpu_limit or 0.0,
        server_type=None if spec.server_type == "gpu" else spec.server_type,
        exclude=exclude, golden_probe=spec.cpu_fallback.probe is not None,
        image=image_key(spec.cpu_fallback.image))


def _new_row(service: ServiceModel, spec: ServiceSpec, epoch: int, decision: Placement,
             request: PlacementRequest) -> ContainerRegistryModel:
    assert decision.controller_id is not None
    now = utcnow()
    return ContainerRegistryModel(
        id=new_id(),
        service_id=service.id,
        controller_id=decision.controller_id,
        container_id=None,
        container_name=container_name(service, epoch, decision.controller_id),
        image=spec.cpu_fallback.image if decision.fallback and spec.cpu_fallback else spec.image,
        status="creating",
        epoch=epoch,
        health="unknown",
        health_restarts=0,
        memory_bytes=request.memory,
        cpu_limit=request.cpu,
        gpu_devices=list(decision.gpu_devices),
        serving=False,
        endpoint=None,
        created_at=now,
        updated_at=now,
    )


def model_mount(model: ModelMount) -> str:
    """Where the container sees a model file. Every accepted spec has its mounts filled in
    (``resolve_models``: ``MODEL_DIR/<the file's name>``); one that has not is refused, not guessed at."""
    if model.mount is None:
        raise InvalidRequest(f"model file {model.digest} has no mount: the spec was not checked against the "
                             "store", {"digest": model.digest}, code="MODEL_FILE_NOT_FOUND")
    return model.mount


class Deployer:
    """Places copies and makes their containers."""

    def __init__(self, ctx: Lifecycle) -> None:
        self.ctx = ctx
        # Rows held as a CPU fallback so far (a hint for ``GpuReturn``: it looks again when this grows).
        self.fallbacks_placed = 0

    def check_policy(self, spec: ServiceSpec) -> None:
        """The spec policy (``mmanager.policy``), checked before anything is written; controllers check again.
        A golden-inference probe is sent to the health check's port: refused without a check."""
        check_policy(self.ctx.settings.spec_policy, spec)

    async def check_models(self, spec: ServiceSpec) -> ServiceSpec:
        """The spec's model files found in the store, their mounts filled in (``resolve_models``); refused
        before anything is written when one is missing. Nothing is read for a spec without models."""
        return await resolve_models(self.ctx.db, self.ctx.model_store, spec)

    def _decide(self, request: PlacementRequest, target: str | None, final: bool,
                spread: frozenset[str] = frozenset(),
                fallback: PlacementRequest | None = None) -> tuple[Placement, Held, PlacementRequest]:
        """Decide where from the view, and hold it there, in one synchronous step (no other placement
        sees the view in between): on none of ``spread`` (the controllers holding the service's other
        replicas) while another fits. Nothing found: ``LookAgain`` (the caller takes a fresh snapshot,
        outside its transaction: waiting for one while holding a pooled connection could starve the
        pool), or, on a fresh one (``final``), the CPU ``fallback`` if one fits, else the error. Returns
        the decision, its hold and the request it placed (``fallback`` when it did)."""
        placement = self.ctx.placement
        index = placement.current
        # The CPU variant only on a fresh snapshot: a GPU the in-memory view has not seen freed wins.
        cpu = fallback if final else None
        if target is not None:
            view = index.get(target)
            if view is None:
                if final:
                    raise NotFound(f"controller {target!r} not found", code="CONTROLLER_NOT_FOUND")
                raise LookAgain
            # Never the CPU fallback on a named controller: the user asked for that server to run the
            # service, not for a variant of it.
            decision = place([view], request)
            if not decision.placed and final and fallback is not None and request.wants_gpu:
                raise NoFeasibleController(
                    f"no GPU fits on controller {target!r}, and a move to a named controller never takes the "
                    "CPU fallback", {"rejections": [r.as_dict() for r in decision.rejections],
                                     "cpu_fallback": "not for a named controller"})
        else:
            spread_out = index.place(replace(request, exclude=request.exclude | spread)) if spread else None
            decision = spread_out if spread_out is not None and spread_out.placed else index.place(request, cpu)
            if decision.fallback and spread and cpu is not None:
                apart = index.place(replace(cpu, exclude=cpu.exclude | spread))
                if apart.placed:
                    decision = replace(apart, fallback=True, gpu_rejections=decision.gpu_rejections)
        if decision.placed:
            used = cpu if decision.fallback and cpu is not None else request
            return decision, placement.hold(decision, used), used
        if final:
            details: dict[str, Any] = {"rejections": [r.as_dict() for r in decision.rejections]}
            if decision.fallback_rejections:
                details["cpu_fallback_rejections"] = [r.as_dict() for r in decision.fallback_rejections]
            raise NoFeasibleController("no controller can run this service", details)
        raise LookAgain

    async def _hold_rows(self, tx: Tx, service: ServiceModel, spec: ServiceSpec, epochs: list[int],
                         exclude: frozenset[str], target: str | None, final: bool,
                         spread: frozenset[str] = frozenset(), gpu_only: bool = False) -> list[Reserved]:
        """Choose a controller for each of ``epochs``, each on none of the others (nor of ``spread``) while
        another fits, and insert their ``creating`` rows in the caller's transaction, all decided first and
        inserted together; the rows the database refused are decided again without their controllers. On
        any error, every hold is released; on success the holds are the caller's to release if its
        transaction does not commit (it calls ``placement.committed`` when it did). The caller has awaited
        ``placement.index()`` just before (outside the transaction). ``gpu_only``: never the CPU fallback."""
        placement = self.ctx.placement
        sqlite = self.ctx.db.is_sqlite
        refused: set[str] = set()
        placed: list[Reserved] = []
        batch: list[tuple[ContainerRegistryModel, Held, dict[str, Any] | None]] = []
        taken = set(spread)
        todo = epochs
        try:
            for _ in range(CREATE_ATTEMPTS):
                batch = []
                request = placement_request(spec, exclude | refused)
                fallback = None if gpu_only else _fallback_request(spec, exclude | refused)
                for epoch in todo:
                    decision, held, used = self._decide(request, target, final, frozenset(taken), fallback)
                    why = fallback_details(decision) if decision.fallback else None
                    batch.append((_new_row(service, spec, epoch, decision, used), held, why))
                    taken.add(held.controller_id)
                inserted = await _insert_rows_if_placeable(tx, [row for row, _, _ in batch], sqlite)
                todo = []
                for row, held, why in batch:
                    if row.id in inserted:
                        controller = ControllerModel(id=row.controller_id, url=placement.urls[row.controller_id])
                        placed.append(Reserved(row, controller, held, why))
                        if why is not None:
                            self.fallbacks_placed += 1
                        continue
                    placement.release(held)
                    placement.unfit(row.controller_id)
                    refused.add(row.controller_id)
                    taken.discard(row.controller_id)
                    todo.append(row.epoch)
                batch = []
                if not todo:
                    return sorted(placed, key=lambda r: r.row.epoch)
        except BaseException:
            for _, held, _ in batch:
                placement.release(held)
            for reserved in placed:
                placement.release(reserved.held)
            raise
        for reserved in placed:
            placement.release(reserved.held)
        raise NoFeasibleController("no controller can run this service (each chosen one was refused)",
                                   {"refused": sorted(refused)})

    async def reserve(self, service: ServiceModel, spec: ServiceSpec, exclude: frozenset[str],
                      target: str | None, epoch: int,
                      write_first: Callable[[Tx], Awaitable[None]] | None = None,
                      spread: frozenset[str] = frozenset(), gpu_only: bool = False) -> Reserved:
        """Choose a controller and hold a registry row on it (committed when this returns), in one
        transaction with what ``write_first`` writes (run again if a fresh view must be taken)."""
        return (await self.reserve_many(service, spec, exclude, target, [epoch], write_first, spread,
                                        gpu_only))[0]

    async def reserve_many(self, service: ServiceModel, spec: ServiceSpec, exclude: frozenset[str],
                           target: str | None, epochs: list[int],
                           write_first: Callable[[Tx], Awaitable[None]] | None = None,
                           spread: frozenset[str] = frozenset(), gpu_only: bool = False) -> list[Reserved]:
        """One placement batch: a registry row for each of ``epochs``, each on a controller holding none of
        the others (nor any of ``spread``) while another fits, all committed in one transaction with what
        ``write_first`` writes (run again if a fresh view must be taken)."""
        placement = self.ctx.placement
        for final in (False, True):
            await placement.index(fresh=final)
            reserved: list[Reserved] = []
            try:
                async with self.ctx.db.transaction() as tx:
                    if write_first is not None:
                        await write_first(tx)
                    reserved = await self._hold_rows(tx, service, spec, epochs, exclude, target, final, spread,
                                                     gpu_only)
            except LookAgain:
                for held in reserved:
                    placement.release(held.held)
                continue
            except BaseException:
                for held in reserved:
                    placement.release(held.held)
                raise
            for held in reserved:
                placement.committed(held.held)
            return reserved
        raise AssertionError("unreachable: a fresh look decides or raises")

    async def deploy(self, service: ServiceModel, spec: ServiceSpec, epoch: int,
                     exclude: frozenset[str] = frozenset(), target: str | None = None,
                     first: Reserved | None = None, spread: frozenset[str] = frozenset(),
                     op: OperationModel | None = None, gpu_only: bool = False) -> Deployed:
        """Place and create-and-start one container; on failure nothing stays reserved.

        ``first``: a placement already held (the create's, made in its first transaction).
        A controller that cannot be reached is skipped and the next best one tried. ``op``: the operation
        that shows the controller's pull of the image while the create waits for it.
        """
        ctx = self.ctx
        tried: set[str] = set()
        last_error: HubError | None = None
        for attempt in range(CREATE_ATTEMPTS):
            if attempt == 0 and first is not None:
                reserved = first
            else:
                try:
                    reserved = await self.reserve(service, spec, exclude | tried, target, epoch, spread=spread,
                                                  gpu_only=gpu_only)
                except NoFeasibleController:
                    if last_error is not None:
                        raise last_error from None
                    raise
            row, controller = reserved.row, reserved.controller
            synced = None
            try:
                if spec.models:
                    # First, with its own long timeout: the create's then covers only the container.
                    synced = await presync(ctx.client, controller.id, controller.url, spec,
                                           ctx.settings.model_sync_timeout)
                created = await self._create(
                    controller, self.container_config(service, spec, epoch, reserved.held.gpus, row.container_name),
                    op)
            except BaseException as exc:
                # Whatever ended it (a refusal, a bug, a cancel), nothing stays reserved for it.
                ctx.placement.release(reserved.held)
                if not isinstance(exc, Exception):
                    raise  # cancelled: the row stays ``creating`` for the reconciler, as an interrupted create's
                await sql.delete_row(ctx.db, row.id)
                if not isinstance(exc, HubError):
                    raise
                # Unreachable, or full after all (another replica took its last slot meanwhile, or
                # containers the hub does not know of), or its pull of the image failed (the registry
                # unreachable from there, or lacking the image), or its sync of a model file failed: the
                # next best controller is tried. When none is left, the last refusal is the answer (a
                # pull's names the image and the registry).
                full = isinstance(exc, ControllerRejected) and exc.code == "CAPACITY_EXCEEDED"
                pull = isinstance(exc, ControllerRejected) and exc.code in ("IMAGE_PULL_FAILED", *MODEL_SYNC_CODES)
                if (isinstance(exc, ControllerUnavailable) or full or pull) and target is None:
                    tried.add(controller.id)
                    if full:
                        ctx.placement.unfit(controller.id)
                    elif not pull:
                        ctx.placement.avoid(controller.id)
                    last_error = exc
                    continue
                raise
            made = Deployed.made(row, controller, created, reserved.fallback)
            made.placement = reserved.held.reason
            if synced is not None and synced.fetched:
                made.model_sync = {"files": len(synced.fetched), "bytes": synced.bytes, "seconds": synced.seconds,
                                   "controller_id": controller.id}
            return made
        assert last_error is not None
        raise last_error

    async def _create(self, controller: ControllerModel, config: ContainerCreate,
                      op: OperationModel | None) -> ContainerCreated:
        """The controller's create. One still waiting after PULL_PROGRESS_AFTER seconds is most likely
        pulling the image: from then until it answers, ``op``'s ``details.image_pull`` shows the pull's
        progress as the controller reports it. A create answered sooner costs one timer, nothing more."""
        create = self.ctx.client.create(controller.id, controller.url, config)
        if op is None:
            return await create
        stop = asyncio.Event()
        watching: list[asyncio.Task[None]] = []

        def watch() -> None:
            watching.append(asyncio.create_task(self._show_pull(controller, config.image, op, stop)))

        timer = asyncio.get_running_loop().call_later(PULL_PROGRESS_AFTER, watch)
        try:
            return await create
        finally:
            timer.cancel()
            stop.set()
            # Cancelled, not awaited: the answer does not wait on a look in flight. A write of progress that
            # still lands is harmless: ``progress`` writes only while the operation runs, and its end
            # rewrites the details without the progress.
            for task in watching:
                task.cancel()

    async def _show_pull(self, controller: ControllerModel, image: str, op: OperationModel,
                         stop: asyncio.Event) -> None:
        """Until ``stop``: ask the controller how its pull of ``image`` goes, and write it into ``op``."""
        ctx = self.ctx
        while not stop.is_set():
            try:
                pulls = await ctx.client.image_pulls(controller.id, controller.url, timeout=3 * PULL_PROGRESS_AFTER)
                found = next((pull for pull in pulls if pull.image == image), None)
                if found is not None and not stop.is_set():
                    await ctx.ops.pulling(op, controller.id, found.model_dump(), f"pulling {image} on {controller.id}")
            except Exception as exc:  # progress is a courtesy: the create's own answer must not wait on it
                log.debug("no pull progress from %s for operation %s: %s", controller.id, op.id, exc)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PULL_PROGRESS_AFTER)

    def container_config(self, service: ServiceModel, spec: ServiceSpec, epoch: int,
                         gpus: tuple[str, ...], name: str) -> ContainerCreate:
        spec = running_spec(spec, gpus)
        return ContainerCreate(
            name=name,
            image=spec.image,
            command=spec.command,
            # The secrets opened for this create only (SecretsUnavailable: no container without them).
            environment={**spec.env, **secrets.opened(self.ctx.settings.sealer, service.secrets_sealed, service.id)},
            ports={(k if "/" in k else f"{k}/tcp"): v for k, v in spec.ports.items()},
            # A source that is a path passed the spec policy's host-path allow-list (check_policy).
            volumes={(source if source.startswith("/") else volume_name(service.owner, source)):
                     {"bind": path, "mode": "ro" if source.startswith("/") else "rw"}
                     for source, path in spec.volumes.items()},
            memory_limit=spec.resources.memory_limit,
            cpu_limit=spec.resources.cpu_limit,
            restart_policy=spec.restart_policy,
            labels=dict(spec.labels),
            service_id=service.id,
            epoch=epoch,
            gpu_count=len(gpus),
            gpu_device_ids=list(gpus) or None,
            gpu_memory=spec.resources.gpu_memory_bytes or None,
            health_check=wire_check(spec),
            cap_add=list(spec.cap_add) or None,
            registry_auth=registry_auth.opened(self.ctx.settings.sealer, service.registry_auth_sealed, service.id,
                                               spec.image),
            models=[ModelFile(digest=m.digest, mount=model_mount(m)) for m in spec.models],
        )

    async def discard(self, controller_id: str, row: ContainerRegistryModel) -> None:
        """Remove a container we made but must not keep, and its row (else its heartbeat removes it)."""
        if row.container_id:
            await self.remove_container(controller_id, row.container_id)
        await sql.delete_row(self.ctx.db, row.id)

    async def remove_container(self, controller_id: str, container_id: str) -> bool:
        async with self.ctx.db.session() as session:
            controller = await session.get(ControllerModel, controller_id)
        if controller is None:
            return False
        try:
            await self.ctx.client.action(controller.id, controller.url, container_id, "delete", force="true")
            return True
        except ControllerRejected as exc:
            return exc.status_code == 404
        except HubError as exc:
            log.warning("could not remove old container %s on %s: %s", container_id, controller_id, exc.message)
            return False
