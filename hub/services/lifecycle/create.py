"""Creating a service: its row, its first history entry, its create operation and the placement of all its
replicas (one batch) in one transaction, then their containers, settled together.

Invariant: an owner's services never pass their quotas (hub.services.quotas: replicas, GPUs, memory), whatever
the concurrency: creates count and insert under the owner's ``users`` row lock; a create that fails
removes its service, so it holds no quota (except an acknowledged ``?wait=false`` create that only lacked
a controller: it stays, ``lost``, for the reconciler to finish). A create that waits (or one whose caller
``watch``es its operation instead), of a service with a golden-inference probe, waits for the probe's
verdict too: a wrong answer fails it (``PROBE_FAILED``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from hub.db import Tx, insert_row
from hub.errors import (
    Conflict,
    ControllerRejected,
    ControllerUnavailable,
    HubError,
    InvalidRequest,
    NoFeasibleController,
    NotFound,
)
from hub.models import DeploymentHistoryModel, OperationModel, ServiceModel, UserModel, new_id, utcnow
from hub.schemas import ServiceSpec
from hub.services import registry_auth, secrets
from hub.services.catalog import model_spec
from hub.services.lifecycle import sql
from hub.services.lifecycle.context import Lifecycle
from hub.services.lifecycle.deploy import (
    Deployed,
    Deployer,
    Reserved,
    Superseded,
    docker_status,
    settle_rows,
)
from hub.services.model_files import lock_files
from hub.services.operations import Running, progress_of
from hub.services.quotas import hold_quota
from mmanager.wire import probe_failed

# Seconds between two asks for a golden-inference probe's verdict.
VERDICT_POLL = 0.25


class Creator:
    def __init__(self, ctx: Lifecycle, deployer: Deployer) -> None:
        self.ctx = ctx
        self.deployer = deployer

    async def create(self, user: UserModel, username: str, repo: str, spec: ServiceSpec,
                     wait: bool = True, watch: bool = False) -> ServiceModel | OperationModel:
        """``wait`` False answers the running operation at once; ``watch`` (with it): its caller follows the
        operation to its end, so it runs as a create that waits would (a failure removes the service, a
        probe's verdict ends it), only in the background."""
        ctx = self.ctx
        owner = user
        if username != user.username:
            if not user.is_admin:
                raise NotFound(f"user {username!r} not found", code="USER_NOT_FOUND")
            async with ctx.db.session() as session:
                found = await session.scalar(sql.OWNER_BY_NAME, {"username": username})
            if found is None:
                raise NotFound(f"user {username!r} not found", code="USER_NOT_FOUND")
            owner = found
        # Taken first: model_spec makes a new spec, and the spec's dump never holds the credentials or secrets.
        auth, given = spec.registry_auth, spec.secrets
        if spec.model is not None:
            spec = await model_spec(ctx.db, spec)
        self.deployer.check_policy(spec)
        spec = await self.deployer.check_models(spec)
        check_replicas(spec.replicas, ctx.settings.max_replicas)
        if given:
            secrets.check_env(spec, given)
        # Sealed for this service and the registry of the image it runs (the model type's, for one made so).
        service_id = new_id()
        sealed = registry_auth.seal(ctx.settings.sealer, auth, service_id, spec.image) if auth else None
        sealed_secrets = secrets.seal(ctx.settings.sealer, given, service_id)
        now = utcnow()
        # Each copy has an epoch of its own: the service's is the last one given.
        service = ServiceModel(
            id=service_id, name=spec.name, owner_id=owner.id, repo=repo, spec=spec.model_dump(mode="json"), version=1,
            desired_state="running", status="pending", status_message=None, controller_id=None, container_id=None,
            epoch=spec.replicas, endpoint=None, gpu_devices=[], health="unknown", replicas=spec.replicas,
            created_at=now, updated_at=now, registry_auth_sealed=sealed,
            secrets_sealed=sealed_secrets,
        )
        service.owner = owner
        # The quota holds across replicas through the owner's row lock (NO KEY UPDATE, so inserts that
        # only reference the user are not held up), taken before the count and held until the new
        # service is committed. The per-owner asyncio lock in front of it keeps a burst of one owner's
        # creates from each holding a pooled connection while waiting on that row, and serialises them
        # on SQLite (single replica only), whose driver begins the transaction at the first write, too
        # late to cover the count.
        #
        # One transaction: the service, its first history entry, the running create operation and the
        # placement's ``creating`` registry row. So the operation is durable before the controller is
        # touched, a pending service is never seen without its running create (or the reconciler would
        # take it for an interrupted one and start it a second time), and a create interrupted after the
        # commit is finished by the reconciler at the same controller, idempotently (``Replacer``).
        op: OperationModel | None = None

        async def write_first(tx: Tx) -> None:
            nonlocal op
            await lock_files(tx, spec, sqlite=ctx.db.is_sqlite)
            clash = await hold_quota(tx, owner.id, spec.name, ctx.settings, spec, spec.replicas)
            if clash is not None:
                raise Conflict(f"service {spec.name!r} already exists (id {clash})", code="SERVICE_EXISTS")
            await insert_row(tx, service)
            await insert_row(tx, DeploymentHistoryModel(
                service_id=service.id, version=1, spec=service.spec, image=spec.image,
                reason="create", actor=user.username, created_at=now,
            ))
            details: dict[str, Any] = {"epoch": 1, "version": 1}
            if spec.replicas > 1:
                details["replicas"] = spec.replicas
            op = ctx.ops.new("create", user.username, service_id=service.id, details=details)
            await insert_row(tx, op)

        async with ctx.owner_locks[owner.id]:
            # The placements' rows in the same transaction: it fails (and rolls all of it back) when nothing
            # could run the service.
            first = await self.deployer.reserve_many(service, spec, frozenset(), None,
                                                     list(range(1, spec.replicas + 1)), write_first)
        assert op is not None
        # Running from the commit on, also while a background create waits for its task to start.
        work = self._run(ctx.ops.running(op), service, spec, background=not wait,
                         acknowledged=not wait and not watch, first=first)
        if not wait:
            ctx.spawn(work)
            return op
        return await work

    async def _run(self, running: Running, service: ServiceModel, spec: ServiceSpec, background: bool,
                   acknowledged: bool, first: list[Reserved]) -> ServiceModel:
        """``background``: run after the answer (someone may have finished the service meanwhile).
        ``acknowledged``: the caller already has its 202 and does not watch the operation, so a create that
        fails only because controllers are unreachable or full right now is kept (status ``lost``) for the
        reconciler to finish; bad input (an unknown image) still removes it. ``first``: the placement the
        create's transaction committed."""
        ctx = self.ctx
        async with ctx.service_locks[service.id], running as op:
            if background:
                current = await ctx.reload_or_none(service.id)
                if current is None or current.status != "pending" or current.epoch != service.epoch:
                    # Finished (or deleted) by someone else meanwhile: nothing left to do here.
                    await ctx.ops.finish(op, None if current else "service was deleted",
                                         details={"completed_elsewhere": True})
                    if current is None:
                        raise NotFound(f"service {service.id!r} not found", code="SERVICE_NOT_FOUND")
                    return current
            verified = False
            try:
                copies = await self._deploy_all(service, spec, first, op)
                if spec.probe is not None and not acknowledged:
                    verified = await self._verdicts(copies)
            except HubError as exc:
                if acknowledged and isinstance(exc, ControllerUnavailable | NoFeasibleController):
                    async with ctx.db.session() as session:
                        kept = await session.get(ServiceModel, service.id)
                        if kept is not None:
                            kept.status, kept.status_message = "lost", f"{exc.code}: {exc.message}"
                    await ctx.ops.finish(op, f"{exc.code}: {exc.message}; the reconciler retries it")
                    raise
                async with ctx.db.session() as session:
                    await session.execute(sql.DELETE_SERVICE, {"service_id": service.id})
                ctx.service_locks.pop(service.id, None)
                raise  # the operation ends with the error (``running``)
            copy = copies[0]
            row, controller = copy.row, copy.controller
            settled = {
                "controller_id": controller.id, "container_id": row.container_id, "gpu_devices": row.gpu_devices,
                "status": docker_status(copy.status, "running"), "endpoint": row.endpoint,
                "status_message": None, "updated_at": utcnow(),
            }
            # One transaction: the containers on their rows, the service pointing at the first, the operation
            # ended. The service's UPDATE is conditional (its epoch, no container yet), as good as its row lock.
            try:
                async with ctx.db.transaction() as tx:
                    if not await settle_rows(tx, [made.row for made in copies], ctx.db.is_sqlite):
                        raise Superseded
                    settled["health"] = "healthy" if verified else row.health or "unknown"
                    if verified:
                        # Seen passing: routed at once, not a heartbeat later.
                        for made in copies:
                            await tx.execute(sql.FOLLOWED_ROW, {"row_id": made.row.id, "copy_id": made.row.container_id,
                                                                "updated_at": utcnow()})
                    if await tx.execute(sql.SETTLE_CREATED, {**settled, "service_id": service.id,
                                                             "at_epoch": service.epoch}) != 1:
                        raise Superseded
                    done: dict[str, Any] = {"replicas_made": len(copies), "progress": progress_of(
                        len(copies), spec.replicas, "replicas", f"{len(copies)} of {spec.replicas} replicas made"),
                    } if spec.replicas > 1 else {}
                    pulls = [made.image_pull for made in copies if made.image_pull is not None]
                    if pulls:
                        done["image_pull"] = pulls[0] if len(pulls) == 1 else pulls
                    synced = [made.model_sync for made in copies if made.model_sync is not None]
                    if synced:
                        done["model_sync"] = synced[0] if len(synced) == 1 else synced
                    fell = [made.fallback for made in copies if made.fallback is not None]
                    if fell:
                        # Why no GPU fitted (the first such copy's reasons); with replicas, how many fell back.
                        done.update(fell[0])
                        if spec.replicas > 1:
                            done["fallback_replicas"] = len(fell)
                    if copies[0].placement:
                        done["placement"] = copies[0].placement
                    await ctx.ops.finish_in(
                        tx, op, controller_id=controller.id, container_id=row.container_id, details=done or None)
            except Superseded:
                # Someone else finished (or deleted) this service meanwhile: ours would be a second copy.
                for made in copies:
                    await self.deployer.discard(made.controller.id, made.row)
                await ctx.ops.finish(op, "SUPERSEDED: another operation completed this service first")
                raise Conflict("another operation completed this service first", code="CONCURRENT_CHANGE") from None
            ctx.ops.finished(op)
            for key, value in settled.items():
                setattr(service, key, value)
            return service

    async def _verdicts(self, copies: list[Deployed]) -> bool:
        """Wait for the golden-inference probe of every copy made: True once all passed; False when one
        gave no verdict within ``MMANAGER_HEALTH_TIMEOUT`` (the create goes on; the status read shows it
        later). A wrong answer raises 409 ``PROBE_FAILED`` with it, the copies made removed (the caller
        removes the service)."""
        ctx = self.ctx
        deadline = asyncio.get_running_loop().time() + ctx.settings.health_timeout

        async def verdict(copy: Deployed) -> bool:
            controller, container_id = copy.controller, copy.row.container_id
            if container_id is None:
                return False
            while asyncio.get_running_loop().time() < deadline:
                try:
                    info = await ctx.client.inspect(controller.id, controller.url, container_id)
                except (ControllerUnavailable, ControllerRejected):
                    return False  # no verdict to be had from there now: the heartbeats bring it
                if info.status == "running" and info.health == "healthy":
                    return True
                if info.status == "running" and probe_failed(info.health_detail):
                    raise Conflict(f"the service failed its golden-inference probe: {info.health_detail}",
                                   {"health_detail": info.health_detail, "container_id": container_id},
                                   code="PROBE_FAILED")
                await asyncio.sleep(VERDICT_POLL)
            return False

        waits = [asyncio.ensure_future(verdict(copy)) for copy in copies]
        try:
            return all(await asyncio.gather(*waits))
        except HubError:
            for wait in waits:
                wait.cancel()
            for made in copies:
                await self.deployer.discard(made.controller.id, made.row)
            raise

    async def _deploy_all(self, service: ServiceModel, spec: ServiceSpec, placed: list[Reserved],
                          op: OperationModel | None = None) -> list[Deployed]:
        """Make the containers of the placed replicas: those on one controller one after the other, lowest
        epoch first (a controller refuses an epoch older than one it has seen), the controllers side by side
        (``making`` bounds how many, with every other create's).
        The copies made, in epoch order; a replica that could not be made anywhere is left to the reconciler,
        which makes the missing ones; none made: the first error."""
        by_controller: dict[str, list[Reserved]] = {}
        for held in placed:
            by_controller.setdefault(held.row.controller_id, []).append(held)
        made: list[Deployed] = []
        errors: list[HubError] = []
        # A copy its controller could not make is placed again away from its siblings while another fits.
        siblings = frozenset(by_controller)
        if op is not None and len(placed) > 1:
            self.ctx.ops.expect_steps(op)  # its progress counts replicas; a pull shows under image_pull

        async def on(queue: list[Reserved]) -> None:
            for held in sorted(queue, key=lambda h: h.row.epoch):
                try:
                    async with self.ctx.making:
                        made.append(await self.deployer.deploy(service, spec, held.row.epoch, first=held,
                                                               spread=siblings, op=op))
                except HubError as exc:
                    errors.append(exc)
                    continue
                if op is not None and len(placed) > 1:
                    await self.ctx.ops.advance(op, len(made), len(placed), "replicas",
                                               f"replica {len(made)} of {len(placed)} made")

        await asyncio.gather(*(on(queue) for queue in by_controller.values()))
        if not made:
            raise errors[0]
        return sorted(made, key=lambda copy: copy.epoch)


def check_replicas(replicas: int, cap: int) -> None:
    if replicas > cap:
        raise InvalidRequest(f"replicas={replicas} is above this hub's cap of {cap} (MMANAGER_MAX_REPLICAS)",
                             {"replicas": replicas, "max_replicas": cap}, code="TOO_MANY_REPLICAS")
