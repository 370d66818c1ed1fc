"""Replacing one of a service's copies (replicas) by a new one at a new epoch, or adding one: the step every
move, update, rollback, scale-up, failover and recovery ends in (``Replacer.replace``).

Invariants:
- a new epoch is claimed in the transaction that holds the new copy's placement, conditionally on the
  epoch read, so two operations (maybe on two hub replicas) never both claim it and a placement that
  finds nothing uses no epoch up; every copy of a service has an epoch of its own;
- the new copy becomes a replica, and the one it replaces ``stale``, in one transaction that holds the
  service's row lock, so from then on every heartbeat of the old copy's controller tells it to stop it,
  even if the hub dies right after; a copy whose epoch was overtaken meanwhile is discarded instead;
- the service's own controller, container and endpoint are its primary copy's: a new copy takes them
  over only from the copy it replaces (or when the service has no other);
- a new spec (an update's, a rollback's: ``version``) is written only in a transaction that checked it
  against its owner's quotas under their row lock (``hold_quota``): the check when the change was asked
  holds nothing while its copy starts, and a create or another change may have grown the owner's use since;
  refused then, the new copy goes and the old ones keep serving;
- a create that an interrupted operation began (a ``creating`` row at the service's epoch) is finished
  at the same controller, where repeating it is idempotent, before any new one is placed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hub.db import Tx, insert_row
from hub.errors import Conflict, HubError, InvalidRequest, QuotaExceeded
from hub.models import (
    ContainerRegistryModel,
    ControllerModel,
    DeploymentHistoryModel,
    OperationModel,
    ServiceModel,
    utcnow,
)
from hub.schemas import ServiceSpec
from hub.services.lifecycle import sql
from hub.services.lifecycle.context import Lifecycle
from hub.services.lifecycle.deploy import Deployed, Deployer, Superseded, docker_status, settle_row
from hub.services.model_files import lock_files
from hub.services.quotas import hold_quota
from mmanager.wire import probe_failed

log = logging.getLogger(__name__)

# Seconds a failover's new copy is watched for its first passing probe after the move is recorded
# (outside the move's slot, so slow probes never slow a mass failover), by at most HEALTH_FOLLOWERS
# at once; beyond, its controller's heartbeats report its health.
FAILOVER_HEALTH_WAIT = 15.0
HEALTH_FOLLOWERS = 64


@dataclass(slots=True)
class Unfinished:
    """A service's registry rows of creates begun and never finished (``pending``), the healthy
    controllers they are on (``healthy``, by id), and its replicas (``serving``)."""

    pending: list[ContainerRegistryModel]
    healthy: dict[str, ControllerModel]
    serving: list[ContainerRegistryModel] = field(default_factory=list)


# A change of a service's sealed registry credentials or secrets: the new value, None when they are cleared.
Sealed = tuple[str | None]


@dataclass(slots=True)
class Replacement:
    """What a replace is asked: the service (with its owner) and the spec its new copy runs, under ``op``.

    ``exclude``: controllers not to place it on; ``target``: the one to place it on. ``version``: the
    deployment history's number a changed spec plans to take (None: the spec is the service's own).
    ``reason``: why it moves (recorded on the operation and in the history). Without ``wait_healthy``
    (failover) the new copy is recorded as soon as it runs. ``unfinished``: those rows, read already.
    ``replacing``: the id of the replica's row the new copy replaces (None: the primary's); with ``adding``
    it replaces none and is one more replica.
    """

    service: ServiceModel
    spec: ServiceSpec
    op: OperationModel
    exclude: frozenset[str] = field(default_factory=frozenset)
    target: str | None = None
    version: int | None = None
    reason: str | None = None
    wait_healthy: bool = True
    unfinished: Unfinished | None = None
    replacing: str | None = None
    adding: bool = False
    # False: one step of several (a rolling update, a scale-up); the caller ends ``op``.
    finish: bool = True
    # An update's new registry credentials (``Sealed``), stored with its spec; None: unchanged.
    registry_auth: Sealed | None = None
    # An update's new secrets (``Sealed``), stored with its spec; None: unchanged.
    secrets: Sealed | None = None
    # Only on a GPU, never the spec's CPU fallback (a move back from it).
    gpu_only: bool = False


async def read_unfinished(tx: Tx, service: ServiceModel, *, sqlite: bool) -> Unfinished:
    """Rows of ``service`` that are neither its current container nor superseded: creates begun by an
    operation that never finished (a heartbeat may already have seen them run); and of the controllers
    those rows are on, the healthy ones (only those: a failover of thousands must not read the fleet each).
    Rows and controllers as objects of no session, read with Core statements built once."""
    live = [ContainerRegistryModel(**row) for row in await tx.all(sql.LIVE_ROWS, {"service_id": service.id})]
    pending = [row for row in live if not row.serving]
    serving = sorted((row for row in live if row.serving), key=lambda row: row.epoch)
    if not pending:
        return Unfinished(pending, {}, serving)
    ids = sorted({row.controller_id for row in pending})
    healthy = [ControllerModel(**row) for row in await tx.all(sql.healthy_controllers(sqlite), {"ids": ids})]
    return Unfinished(pending, {c.id: c for c in healthy}, serving)


def _replaced(plan: Replacement, copies: Unfinished) -> ContainerRegistryModel | None:
    """The replica the new copy replaces: the one named, else the primary (the service's container)."""
    if plan.adding:
        return None
    for row in copies.serving:
        if row.id == plan.replacing or (plan.replacing is None and row.container_id == plan.service.container_id):
            return row
    return None


def _removable(stale: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of ``STALE_COPIES``, those whose controller answers now (the others are told on its next heartbeat)."""
    return [copy for copy in stale if copy["status"] == "healthy" and copy["container_id"] is not None]


def volumes_left(spec: ServiceSpec) -> list[str]:
    """The volumes a copy leaves on its controller when it moves: named volumes by name, host paths by path."""
    return sorted(spec.volumes)


def _moved_details(epoch: int, old_controller_id: str | None, controller: ControllerModel,
                   reason: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"epoch": epoch, "from_controller": old_controller_id, "to_controller": controller.id}
    if reason:
        details["reason"] = reason
    return details


async def claim_epoch_in(tx: Tx, service_id: str, seen: int, beside: bool = False) -> None:
    """Take the next epoch (``seen + 1``) in the caller's transaction, or fail if another operation
    (maybe on another hub replica) took it first. The service reads ``migrating`` meanwhile, unless the
    copy is made ``beside`` others that keep serving."""
    statement = sql.CLAIM_EPOCH_BESIDE if beside else sql.CLAIM_EPOCH
    if await tx.execute(statement, {"service_id": service_id, "seen": seen, "next_epoch": seen + 1,
                                    "updated_at": utcnow()}) != 1:
        raise Conflict("another operation changed the service meanwhile; retry", code="CONCURRENT_CHANGE")


class Replacer:
    def __init__(self, ctx: Lifecycle, deployer: Deployer) -> None:
        self.ctx = ctx
        self.deployer = deployer

    async def replace(self, plan: Replacement) -> ServiceModel:
        """Start a copy at a new epoch, wait until it runs (and is healthy, if it has a check),
        then retire the old one: no gap for a planned move.

        Without ``wait_healthy`` (failover: the old copy is gone anyway) the new copy is
        recorded as soon as it runs, whatever its check says; its probe is then followed for a
        short while (``follow_health``) so the service reads healthy as soon as it is, not a
        heartbeat later.
        """
        ctx, service, spec, op = self.ctx, plan.service, plan.spec, plan.op
        prior_status = service.status
        if plan.unfinished is None:
            async with ctx.db.transaction() as tx:
                plan.unfinished = await read_unfinished(tx, service, sqlite=ctx.db.is_sqlite)
        old = _replaced(plan, plan.unfinished)
        others = [row for row in plan.unfinished.serving if old is None or row.id != old.id]
        primary = service.container_id is None or not others or (
            old is not None and old.container_id == service.container_id)
        try:
            copy = await self._resume_or_deploy(plan, beside=not primary,
                                                spread=frozenset(row.controller_id for row in others))
        except HubError:
            await self._restore_status(service.id, prior_status)
            raise
        row, controller = copy.row, copy.controller
        healthy = False
        if plan.wait_healthy and spec.health_check is not None and row.container_id:
            try:
                await self.await_healthy(controller, row.container_id)
                healthy = True
            except HubError:
                await self.deployer.remove_container(controller.id, row.container_id)
                await sql.delete_row(ctx.db, row.id)
                await self._restore_status(service.id, prior_status)
                raise
        details = _moved_details(copy.epoch, old.controller_id if old is not None else None, controller,
                                 plan.reason)
        if not primary or plan.adding:
            details["replica"] = "added" if plan.adding else "replaced"
        if copy.image_pull is not None:
            details["image_pull"] = copy.image_pull
        if copy.model_sync is not None:
            details["model_sync"] = copy.model_sync
        if copy.fallback is not None:
            details.update(copy.fallback)
        if spec.volumes and old is not None and old.controller_id != controller.id:
            # Docker volumes (and host paths) are the server's own: the new copy starts with empty ones there.
            details["volumes_left_behind"] = volumes_left(spec)
        if copy.placement:
            details["placement"] = copy.placement
        ended = False
        try:
            async with ctx.db.transaction() as tx:
                if plan.version is not None:
                    # A new spec, held to the owner's quotas until it is written (the owner's row first: the
                    # order a create and a scale take the two locks in).
                    await hold_quota(tx, service.owner_id, service.name, ctx.settings, spec, spec.replicas, service.id)
                # Locked until commit: no other operation can claim an epoch between the check and the write.
                locked = await tx.first(sql.LOCK_SERVICE, {"service_id": service.id})
                if locked is None or locked["epoch"] != copy.epoch or not await settle_row(tx, row):
                    raise Superseded
                if plan.version is not None:
                    # A new spec: its model files held until it commits (a delete waits, then sees it).
                    await lock_files(tx, spec, sqlite=ctx.db.is_sqlite)
                if healthy:
                    # The gateways read the row: a copy whose probe passed is routed at once, not "starting".
                    await tx.execute(sql.FOLLOWED_ROW, {"row_id": row.id, "copy_id": row.container_id,
                                                        "updated_at": utcnow()})
                    row.health = "healthy"
                fresh = await self._finalize(tx, locked, plan, copy, healthy, primary, old.id if old else None)
                # The old copies whose controller answers now, read once: removed after the commit. None to
                # remove (a failover's is on a lost controller) and nothing to stop: the operation ends in
                # this transaction too.
                removable = _removable(await tx.all(sql.STALE_COPIES, {"service_id": service.id}))
                if removable and ctx.gateway is not None:
                    # Not fenced by their controllers' next heartbeats while the gateways may still send
                    # them requests: this move removes them once they no longer do.
                    await tx.execute(sql.DRAINING, {"of_service": service.id, "updated_at": utcnow()})
                if fresh.desired_state != "stopped" and not removable and plan.finish:
                    await ctx.ops.finish_in(tx, op, controller_id=controller.id, container_id=row.container_id,
                                            details={**details, "old_containers_removed": 0})
                    ended = True
        except Superseded:
            # A newer epoch was claimed meanwhile (another replica's move): it wins, ours goes.
            await self.deployer.discard(controller.id, row)
            raise Conflict("another operation changed the service meanwhile; retry",
                           code="CONCURRENT_CHANGE") from None
        except (InvalidRequest, QuotaExceeded):
            # A model file the new spec names was deleted meanwhile, or the owner's use grew past their quota
            # meanwhile: the copy made for it goes, the old ones keep serving.
            await self.deployer.discard(controller.id, row)
            await self._restore_status(service.id, prior_status)
            raise
        if ended:
            ctx.ops.finished(op)
        elif plan.finish or removable or fresh.desired_state == "stopped":
            await self._after_finalize(fresh, copy, op, details, removable, plan.finish)
        if not healthy and spec.health_check is not None and row.container_id and fresh.desired_state == "running":
            self._follow_health(fresh.id, copy.epoch, controller, row)
        return await ctx.reload(service.id) if fresh.desired_state == "stopped" else fresh

    async def _resume_or_deploy(self, plan: Replacement, beside: bool, spread: frozenset[str]) -> Deployed:
        """Finish a create that an interrupted operation began, or claim a new epoch and deploy (on a
        controller none of ``spread`` while another fits).

        A ``creating`` row at the service's current epoch is the create of an
        operation that did not finish (its hub stopped): repeating that create is
        idempotent on the controller, so the container is made at most once.
        """
        ctx, service, spec = self.ctx, plan.service, plan.spec
        unfinished = plan.unfinished
        assert unfinished is not None  # read by replace()
        for row in unfinished.pending:
            controller = unfinished.healthy.get(row.controller_id)
            usable = (
                row.epoch == service.epoch and controller is not None and row.controller_id not in plan.exclude
                and (plan.target is None or row.controller_id == plan.target)
                # A GPU-only move finishes no create that holds no GPU (a CPU fallback's).
                and not (plan.gpu_only and not row.gpu_devices)
            )
            if usable and controller is not None:
                try:
                    config = self.deployer.container_config(service, spec, row.epoch,
                                                            tuple(str(g) for g in row.gpu_devices), row.container_name)
                    created = await ctx.client.create(controller.id, controller.url, config)
                except HubError as exc:
                    log.warning("could not resume the create of %s on %s: %s", service.id, controller.id, exc.message)
                else:
                    return Deployed.made(row, controller, created)
            # Its container, if the controller made one, has no row now: the controller removes it as an orphan.
            await sql.delete_row(ctx.db, row.id)
        # The next epoch is claimed in the transaction that holds the placement's row: no epoch is used
        # up when nothing can run the service, and a move costs one transaction less.
        epoch = service.epoch + 1

        async def claim(tx: Tx) -> None:
            await claim_epoch_in(tx, service.id, service.epoch, beside)

        first = await self.deployer.reserve(service, spec, plan.exclude, plan.target, epoch, claim, spread,
                                            gpu_only=plan.gpu_only)
        return await self.deployer.deploy(service, spec, epoch, plan.exclude, plan.target, first=first, spread=spread,
                                          op=plan.op, gpu_only=plan.gpu_only)

    async def await_healthy(self, controller: ControllerModel, container_id: str,
                             timeout: float | None = None, backoff: bool = False) -> None:
        """Wait until the controller's probe passes on the new container (asking every 0.25 s, or,
        with ``backoff``, so for 2 s and then ever less often, up to every 2 s)."""
        timeout = timeout or self.ctx.settings.health_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        last = "unknown"
        pause = 0.25
        slow_after = asyncio.get_running_loop().time() + 2.0
        if backoff:
            await asyncio.sleep(pause)  # a container that just started has not passed a probe yet
        while asyncio.get_running_loop().time() < deadline:
            info = await self.ctx.client.inspect(controller.id, controller.url, container_id)
            last = f"{info.status}/{info.health}"
            if info.status == "running" and info.health == "healthy":
                return
            if info.status == "running" and probe_failed(info.health_detail):
                # Final until it starts again: no use waiting out the timeout.
                raise Conflict(f"the new container failed its golden-inference probe: {info.health_detail}; "
                               "the old one keeps serving", {"health_detail": info.health_detail},
                               code="PROBE_FAILED")
            if info.health_detail:
                last = f"{last}: {info.health_detail}"
            await asyncio.sleep(pause)
            if backoff and asyncio.get_running_loop().time() > slow_after:
                pause = min(pause * 2, 2.0)
        raise Conflict(
            f"the new container did not pass its health check within {timeout:g}s ({last}); "
            "the old one keeps serving",
            code="HEALTH_CHECK_FAILED",
        )

    def _follow_health(self, service_id: str, epoch: int, controller: ControllerModel,
                       row: ContainerRegistryModel) -> None:
        """Record the new copy healthy when its probe first passes, if that is within
        FAILOVER_HEALTH_WAIT; in a task of its own, at most HEALTH_FOLLOWERS at once (beyond, and
        after, its controller's heartbeats report its health)."""
        ctx = self.ctx
        if len(ctx.followers) >= HEALTH_FOLLOWERS or row.container_id is None:
            return
        container_id = row.container_id

        async def follow() -> None:
            await self.await_healthy(controller, container_id, FAILOVER_HEALTH_WAIT, backoff=True)
            now = utcnow()
            async with ctx.db.transaction() as tx:
                # Each statement only its own values: on SQLite, SQLAlchemy would SET a value named after a column.
                await tx.execute(sql.FOLLOWED_SERVICE, {"service_id": service_id, "at_epoch": epoch,
                                                        "copy_id": container_id, "updated_at": now})
                await tx.execute(sql.FOLLOWED_ROW, {"row_id": row.id, "copy_id": container_id, "updated_at": now})

        ctx.spawn(follow(), ctx.followers)

    @staticmethod
    async def _finalize(tx: Tx, locked: Mapping[str, Any], plan: Replacement, copy: Deployed,
                        healthy: bool, primary: bool, replaced: str | None) -> ServiceModel:
        """Make the new copy a replica (the primary one if ``primary``) and the one it replaces
        (``replaced``, a row id), with any create left unfinished, stale, in the caller's transaction, which
        holds the service's row lock (``locked``, the row as it read it); the service as it now is, an
        object of no session."""
        now = utcnow()
        row, controller, op = copy.row, copy.controller, plan.op
        changes: dict[str, Any] = {
            "epoch": copy.epoch, "spec": plan.spec.model_dump(mode="json"), "version": locked["version"],
            "updated_at": now,
        }
        if primary:
            changes.update({
                "controller_id": controller.id, "container_id": row.container_id, "gpu_devices": row.gpu_devices,
                "health": "healthy" if healthy else row.health or "unknown",
                "health_detail": None if healthy else row.health_detail,
                "status": docker_status(copy.status, "running"), "endpoint": row.endpoint, "status_message": None,
            })
        if plan.version is not None:
            # Numbered here, under the service's row lock: two redeploys that planned the same number
            # (concurrent calls, or two replicas) get consecutive ones.
            latest = await tx.first(sql.LATEST_VERSION, {"service_id": locked["id"]})
            changes["version"] = version = max(plan.version, ((latest or {}).get("latest") or 0) + 1)
            await insert_row(tx, DeploymentHistoryModel(
                service_id=locked["id"], version=version, spec=changes["spec"], image=plan.spec.image,
                reason=plan.reason or op.operation, actor=op.actor, created_at=now,
            ))
        await tx.execute(sql.FINALIZE if primary else sql.FINALIZE_BESIDE, {**changes, "service_id": locked["id"]})
        await tx.execute(sql.RETIRE_REPLACED, {"of_service": locked["id"], "keep_row": row.id,
                                               "replaced_row": replaced or "", "updated_at": now})
        if plan.registry_auth is not None:
            changes["registry_auth_sealed"] = plan.registry_auth[0]
            await tx.execute(sql.SET_REGISTRY_AUTH, {"service_id": locked["id"], "sealed": plan.registry_auth[0],
                                                     "updated_at": now})
        if plan.secrets is not None:
            changes["secrets_sealed"] = plan.secrets[0]
            await tx.execute(sql.SET_SECRETS, {"service_id": locked["id"], "sealed": plan.secrets[0], "updated_at": now})
        fresh = ServiceModel(**{**dict(locked), **changes})
        fresh.owner = plan.service.owner
        return fresh

    async def _after_finalize(self, fresh: ServiceModel, copy: Deployed, op: OperationModel,
                              details: dict[str, Any], removable: list[Mapping[str, Any]], finish: bool) -> None:
        """Retire the old copies (``removable``: those on controllers that answer), keep a stopped service
        stopped, and close the operation (unless the caller ends it: not ``finish``)."""
        ctx, row, controller = self.ctx, copy.row, copy.controller
        if removable and ctx.gateway is not None:
            # No request lost: the gateways route to the new copy, and have let the old ones finish theirs.
            details["gateways_drained"] = await ctx.gateway.drained(
                fresh.id, row.container_id if fresh.desired_state == "running" else None,
                [c["container_id"] for c in removable], ctx.settings.gateway_drain_timeout)
        details = {**details, "old_containers_removed": await self._retire_stale(removable)}
        if fresh.desired_state == "stopped":
            await ctx.client.action(controller.id, controller.url, row.container_id or "", "stop", epoch=copy.epoch)
            async with ctx.db.session() as session:
                stopped = await session.get(ServiceModel, fresh.id)
                assert stopped is not None
                stopped.status, stopped.endpoint = "stopped", None
        if finish:
            await ctx.ops.finish(op, controller_id=controller.id, container_id=row.container_id, details=details)

    async def _restore_status(self, service_id: str, prior: str) -> None:
        """After a failed move the old copy (if any) keeps serving; say what the service is."""
        async with self.ctx.db.session() as session:
            fresh = await session.get(ServiceModel, service_id)
            if fresh is None:
                return
            if fresh.container_id is None:
                fresh.status = "lost" if fresh.desired_state == "running" else "stopped"
            elif prior in ("migrating", "pending"):
                fresh.status = "lost"
            else:
                fresh.status = prior

    async def _retire_stale(self, removable: list[Mapping[str, Any]]) -> int:
        """Remove superseded copies on controllers that answer (``_removable``); the others are told on their
        next heartbeat."""
        removed = 0
        for copy in removable:
            row_id, controller_id, container_id = copy["id"], copy["controller_id"], copy["container_id"]
            if await self.deployer.remove_container(controller_id, container_id):
                removed += 1
                await sql.delete_row(self.ctx.db, row_id)
        return removed
