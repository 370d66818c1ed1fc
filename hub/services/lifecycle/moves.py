"""Moving a service to new copies: what a user asks (update, rollback, migrate: ``redeploy``; a change of
``replicas``: ``scale``) and what the reconciler asks (failover, drain, an unhealthy copy, a missing
replica, recovery of an interrupted operation: ``move``).

Invariants: every move is one operation under the service's lock whose copies are made by
``Replacer.replace``; a spec it deploys passed the spec policy when the move was asked (a rollback's too:
the policy may have tightened since that version ran). An update or rollback of several replicas rolls:
one replica at a time, each new one serving (healthy) before the one it replaces goes; one such roll per
service at a time. A scale-down removes the copies on the least-loaded controllers, each only after the
gateways stopped sending it requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.db import Tx, any_of, insert_row
from hub.errors import Conflict, InvalidRequest, NoFeasibleController, NotFound
from hub.models import ContainerRegistryModel, ControllerModel, OperationModel, ServiceModel, UserModel, utcnow
from hub.scheduler.reconcile import UNSETTLED
from hub.schemas import ServicePatch, ServiceSpec
from hub.services.controllers import get_controller
from hub.services.lifecycle import sql
from hub.services.lifecycle.context import Lifecycle
from hub.services.lifecycle.create import check_replicas
from hub.services.lifecycle.deploy import Deployer, on_fallback
from hub.services.lifecycle.reads import get_for
from hub.services.lifecycle.replace import Replacement, Replacer, Sealed, read_unfinished, volumes_left
from hub.services.operations import progress_of
from hub.services.quotas import hold_quota
from hub.services.registry_auth import check_host, seal
from hub.services.secrets import check_env
from hub.services.secrets import names as secret_names
from hub.services.secrets import same as same_secrets
from hub.services.secrets import seal as seal_secrets
from mmanager.logs import bind_request_id

# Spec fields only the gateways act on: a change of these alone starts no new container.
GATEWAY_ONLY = frozenset({"private", "rate_limit_per_minute", "max_body_size", "idle_timeout"})
# Spec fields only the hub's own loops act on (the pre-pull, hub.background.prefetch): none either.
HUB_ONLY = frozenset({"prefetch"})
# Operations that roll a new spec over the replicas: one at a time per service.
ROLLING = ("update", "rollback")
_ROLLING_NOW = (select(OperationModel.id).where(
    OperationModel.service_id == bindparam("service_id"),
    or_(*(OperationModel.operation == operation for operation in ROLLING)),
    or_(OperationModel.status == "pending", OperationModel.status == "running")).limit(1))
# Where a scale-down looks first: the least-loaded controllers' copies.
_LOADS = select(ControllerModel.id, ControllerModel.load_percentage, ControllerModel.containers_running)
# A replica of a service, on the controller a reconciler's move takes it off.
_REPLICA_ROW = (select(ContainerRegistryModel.id).where(
    ContainerRegistryModel.id == bindparam("row_id"), ContainerRegistryModel.service_id == bindparam("service_id"),
    ContainerRegistryModel.controller_id == bindparam("controller_id"), ContainerRegistryModel.serving.is_(True),
    ContainerRegistryModel.status != "stale", ContainerRegistryModel.status != "draining"))


async def refuse_volumes_left(session: AsyncSession, service: ServiceModel, replacing: str | None) -> None:
    """A migrate that would leave the service's volumes behind is refused unless the caller accepts that: Docker
    volumes (and host paths) live on their server, and the moved copy would start with empty ones. The error
    names the controller of the copy that moves (``replacing``, its registry row; None: the primary)."""
    volumes = volumes_left(ServiceSpec.model_validate(service.spec))
    if not volumes:
        return
    row = await session.get(ContainerRegistryModel, replacing) if replacing is not None else None
    on = row.controller_id if row is not None else service.controller_id
    raise Conflict(
        f"volume(s) {', '.join(repr(v) for v in volumes)} stay on controller {on}: volumes live on their "
        "server and do not move with a service; migrate with leave_volumes=true to move without them",
        {"volumes": volumes, "controller_id": on}, code="VOLUME_STAYS_BEHIND")


def auth_details(registry_auth: Sealed | None, secrets: Sealed | None = None) -> dict[str, Any]:
    """What an operation that carries new registry credentials or secrets says of them: set or cleared (the
    secrets' names with it), never what."""
    details: dict[str, Any] = {}
    if registry_auth is not None:
        details["registry_auth"] = "set" if registry_auth[0] is not None else "cleared"
    if secrets is not None:
        details["secrets"] = {"set": secret_names(secrets[0])} if secrets[0] is not None else "cleared"
    return details


def _holds_gpu(copy: Mapping[str, Any] | None) -> bool:
    """A planned move (an update, a rollback, a user's migrate) of a copy that holds a GPU goes only onto a
    GPU: its old copy keeps its GPU until the new one is healthy, so that GPU is not free yet, and taking the
    CPU fallback for the while would cost a second move back (``GpuReturn``) and a stretch on the CPU."""
    return copy is not None and bool(copy["gpu_devices"])


class Mover:
    def __init__(self, ctx: Lifecycle, deployer: Deployer, replacer: Replacer) -> None:
        self.ctx = ctx
        self.deployer = deployer
        self.replacer = replacer
        # Services whose roll was asked here and has not ended.
        self._rolling: set[str] = set()

    async def redeploy(self, user: UserModel, service_id: str, operation: str, *, spec: ServiceSpec | None = None,
                       rollback_to: int | None = None, exclude_current: bool = False, target: str | None = None,
                       replacing: str | None = None, rescale: bool = False, leave_volumes: bool = False,
                       wait: bool = True, registry_auth: Sealed | None = None,
                       secrets: Sealed | None = None) -> ServiceModel | OperationModel:
        """``replacing``: the registry row of the replica to migrate (None: the primary's). ``rescale``: the
        spec's ``replicas`` is asked for too; else the service keeps the count it has when the roll begins (a
        rollback to a version that ran another count, an update queued behind a scale). ``leave_volumes``: a
        migrate of a service with volumes goes ahead without them (else 409 VOLUME_STAYS_BEHIND).
        ``registry_auth``: an update's new sealed credentials (None in it: cleared), used by its creates and
        stored with its spec; ``secrets``: its new sealed secrets, alike."""
        if operation not in ROLLING:
            return await self._redeploy(user, service_id, operation, spec, rollback_to, exclude_current, target,
                                        replacing, rescale, wait, registry_auth, leave_volumes, secrets)
        # Refused at once, not queued behind the lock: the second roll would undo what the user watches.
        if service_id in self._rolling:
            raise Conflict("an update of this service is rolling out; wait for it to end", code="UPDATE_IN_PROGRESS")
        self._rolling.add(service_id)
        try:
            rolling = await self.ctx.db.first(_ROLLING_NOW, {"service_id": service_id})
            if rolling is not None:
                raise Conflict(f"an update of this service is rolling out (operation {rolling['id']}); wait for it "
                               "to end", {"operation_id": rolling["id"]}, code="UPDATE_IN_PROGRESS")
            return await self._redeploy(user, service_id, operation, spec, rollback_to, exclude_current, target,
                                        replacing, rescale, wait, registry_auth, secrets=secrets)
        finally:
            self._rolling.discard(service_id)

    async def _redeploy(self, user: UserModel, service_id: str, operation: str, spec: ServiceSpec | None,
                        rollback_to: int | None, exclude_current: bool, target: str | None, replacing: str | None,
                        rescale: bool, wait: bool, registry_auth: Sealed | None = None,
                        leave_volumes: bool = False, secrets: Sealed | None = None) -> ServiceModel | OperationModel:
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
            if operation == "migrate" and not leave_volumes:
                await refuse_volumes_left(session, service, replacing)
            version: int | None = None
            if rollback_to is not None:
                past = await session.scalar(sql.PAST_VERSION, {"service_id": service.id, "version": rollback_to})
                if past is None:
                    raise NotFound(f"service has no version {rollback_to}", code="VERSION_NOT_FOUND")
                spec = ServiceSpec.model_validate(past.spec)
                if service.secrets_sealed:
                    # That version's env against the secrets the service has now (a rollback carries none).
                    check_env(spec, {name: "" for name in secret_names(service.secrets_sealed)})
            if spec is not None:
                latest = await session.scalar(sql.LATEST_VERSION, {"service_id": service.id})
                version = (latest or 0) + 1
            if target is not None:
                await get_controller(session, target)
        if spec is not None:
            self.deployer.check_policy(spec)
            spec = await self.deployer.check_models(spec)
            # An update or rollback that asks for more GPUs or memory is held to the owner's quotas, when asked
            # (its spec is stored once its first new copy runs).
            async with ctx.db.transaction() as tx:
                await hold_quota(tx, service.owner_id, service.name, ctx.settings, spec,
                                 spec.replicas if rescale else service.replicas, service.id)
        op = await ctx.ops.begin(
            operation, user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id,
            details={"from_epoch": service.epoch, **({"version": version} if version else {}),
                     **({"rollback_to": rollback_to} if rollback_to else {}),
                     **auth_details(registry_auth, secrets)},
        )
        work = self._run_redeploy(service.id, spec, op, exclude_current, target, version, replacing, rescale,
                                  registry_auth, secrets)
        if not wait:
            if operation in ROLLING:
                # Refused again until the background roll ends.
                self._rolling.add(service.id)
                work = self._then_unmark(work, service.id)
            ctx.spawn(work)
            return op
        return await work

    async def _then_unmark(self, work: Any, service_id: str) -> ServiceModel:
        try:
            return await work
        finally:
            self._rolling.discard(service_id)

    async def _run_redeploy(self, service_id: str, spec: ServiceSpec | None, op: OperationModel,
                            exclude_current: bool, target: str | None, version: int | None,
                            replacing: str | None, rescale: bool, registry_auth: Sealed | None = None,
                            secrets: Sealed | None = None) -> ServiceModel:
        ctx = self.ctx

        async def reload() -> ServiceModel:
            service = await ctx.reload(service_id)
            if registry_auth is not None:
                # The update's credentials for its creates; its first replace stores them with its spec.
                service.registry_auth_sealed = registry_auth[0]
            if secrets is not None:
                service.secrets_sealed = secrets[0]
            return service

        async with ctx.service_locks[service_id], ctx.ops.running(op):
            service = await reload()
            copies = await self._replicas(service_id)
            moved_from = service.controller_id
            if replacing is not None:
                row = next((copy for copy in copies if copy["id"] == replacing), None)
                if row is None:
                    raise Conflict("that registry entry is no longer one of the service's replicas",
                                   code="NOT_A_REPLICA")
                moved_from = row["controller_id"]
            if target is not None and target == moved_from:
                raise Conflict("the service already runs on that controller", code="SAME_CONTROLLER")
            exclude = frozenset({moved_from}) if exclude_current and moved_from else frozenset()
            if spec is None:
                spec = ServiceSpec.model_validate(service.spec)
            elif not rescale:
                spec = spec.model_copy(update={"replicas": service.replicas})
            if op.operation not in ROLLING or (len(copies) <= 1 and spec.replicas == service.replicas):
                moved = next((copy for copy in copies if copy["id"] == replacing
                              or (replacing is None and copy["container_id"] == service.container_id)), None)
                return await self.replacer.replace(Replacement(service, spec, op, exclude, target, version,
                                                               replacing=replacing, registry_auth=registry_auth,
                                                               secrets=secrets,
                                                               gpu_only=_holds_gpu(moved)))
            # A roll: the primary last, so the service's own container changes once, at the end.
            copies.sort(key=lambda row: row["container_id"] == service.container_id)
            ctx.ops.expect_steps(op)
            for step, copy in enumerate(copies):
                service = await reload()
                await self.replacer.replace(Replacement(service, spec, op, version=version if step == 0 else None,
                                                        replacing=copy["id"], finish=False,
                                                        registry_auth=registry_auth if step == 0 else None,
                                                        secrets=secrets if step == 0 else None,
                                                        gpu_only=_holds_gpu(copy)))
                await ctx.ops.advance(op, step + 1, len(copies), "replicas",
                                      f"replica {step + 1} of {len(copies)} replaced")
            await self._converge(service_id, spec, op, asked=rescale)
            await ctx.ops.finish(op, details={"replicas_rolled": len(copies), "replicas": spec.replicas,
                                              "progress": progress_of(len(copies), len(copies), "replicas",
                                                                      "every replica replaced")})
            return await ctx.reload(service_id)

    async def _replicas(self, service_id: str) -> list[Mapping[str, Any]]:
        return list(await self.ctx.db.all(sql.REPLICA_ROWS, {"service_id": service_id}))

    async def scale(self, user: UserModel, service_id: str, spec: ServiceSpec, changes: dict[str, Any],
                    wait: bool = True, registry_auth: Sealed | None = None) -> ServiceModel | OperationModel:
        """A change of ``replicas`` (with, maybe, fields only the gateways act on): copies are added, or the
        least-loaded controllers' removed; the others keep serving as they are. ``registry_auth``: new sealed
        credentials (None in it: cleared), stored with the new count (a scale refused keeps the old ones)."""
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
        op = await ctx.ops.begin("scale", user.username, service_id=service.id, controller_id=service.controller_id,
                                 container_id=service.container_id,
                                 details={"from_replicas": service.replicas, "to_replicas": spec.replicas,
                                          **auth_details(registry_auth)})
        work = self._run_scale(service.id, spec, changes, op, registry_auth)
        if not wait:
            ctx.spawn(work)
            return op
        return await work

    async def _run_scale(self, service_id: str, spec: ServiceSpec, changes: dict[str, Any],
                         op: OperationModel, registry_auth: Sealed | None = None) -> ServiceModel:
        ctx = self.ctx
        async with ctx.service_locks[service_id], ctx.ops.running(op):
            service = await ctx.reload(service_id)
            merged = ServiceSpec.model_validate({**service.spec, **{key: getattr(spec, key) for key in changes}})
            details = await self._converge(service_id, merged, op, registry_auth=registry_auth)
            await ctx.ops.finish(op, details=details)
            return await ctx.reload(service_id)

    async def _converge(self, service_id: str, spec: ServiceSpec, op: OperationModel,
                        asked: bool = True, registry_auth: Sealed | None = None) -> dict[str, Any]:
        """Make the service run ``spec.replicas`` copies (recorded first, so the reconciler finishes what an
        interrupted scale began): one more at a time, spread, or the least-loaded controllers' removed.
        ``asked``: a user's count, which goes back to what runs if no controller can take one more (the
        reconciler's own recount keeps the count and tries again). ``registry_auth``: new credentials,
        recorded with the count (so the copies added pull with them) and put back with it."""
        ctx = self.ctx
        service = await ctx.reload(service_id)
        before = service.registry_auth_sealed
        async with ctx.db.transaction() as tx:
            if spec.replicas > service.replicas:
                # The quotas count every replica, as a create's do.
                await hold_quota(tx, service.owner_id, service.name, ctx.settings, spec, spec.replicas, service.id)
            await self._set_count(tx, service_id, spec)
            if registry_auth is not None:
                await tx.execute(sql.SET_REGISTRY_AUTH, {"service_id": service_id, "sealed": registry_auth[0],
                                                         "updated_at": utcnow()})
        copies = await self._replicas(service_id)
        # A replica whose container was found gone is replaced before one is added, or else goes.
        gone = [copy for copy in copies if copy["status"] == "missing"]
        copies = [copy for copy in copies if copy["status"] != "missing"]
        added = removed = 0
        # The copies to add (those found gone replaced first) or to take out, for the progress shown.
        changes = abs(spec.replicas - len(copies))
        if changes:
            ctx.ops.expect_steps(op)
        while len(copies) + added < spec.replicas:
            service = await ctx.reload(service_id)
            replacing = gone.pop(0)["id"] if gone else None
            try:
                await self.replacer.replace(Replacement(service, spec, op, adding=replacing is None,
                                                        replacing=replacing, finish=False, reason="scale"))
            except NoFeasibleController:
                if not asked:
                    raise
                # No controller can take one more: the count is what runs (a scale-up refused changes nothing).
                async with ctx.db.transaction() as tx:
                    await self._set_count(tx, service_id,
                                          spec.model_copy(update={"replicas": max(len(copies) + added, 1)}))
                    if registry_auth is not None:
                        await tx.execute(sql.RESTORE_REGISTRY_AUTH, {"service_id": service_id, "sealed": before,
                                                                     "set": registry_auth[0], "updated_at": utcnow()})
                raise
            added += 1
            await ctx.ops.advance(op, added, changes, "replicas", f"replica {len(copies) + added} of "
                                                                  f"{spec.replicas} running")
        for copy in gone:
            await self._remove_replica(service_id, copy)
        if len(copies) > spec.replicas:
            loads = {row["id"]: (row["load_percentage"], row["containers_running"]) for row in await ctx.db.all(
                _LOADS.where(any_of(ControllerModel.__table__.c.id, "ids", sqlite=ctx.db.is_sqlite)),
                {"ids": sorted({copy["controller_id"] for copy in copies})})}
            copies.sort(key=lambda copy: (*loads.get(copy["controller_id"], (0.0, 0)), -copy["epoch"]))
            for copy in copies[:len(copies) - spec.replicas]:
                await self._remove_replica(service_id, copy)
                removed += 1
                await ctx.ops.advance(op, removed, changes, "replicas", f"replica {removed} of {changes} removed")
        details: dict[str, Any] = {"replicas": spec.replicas, "added": added, "removed": removed}
        if changes:
            details["progress"] = progress_of(added + removed, changes, "replicas",
                                              f"{spec.replicas} replicas running")
        return details

    @staticmethod
    async def _set_count(tx: Tx, service_id: str, spec: ServiceSpec) -> None:
        """The service's count of replicas, and its spec with it."""
        await tx.execute(sql.SET_REPLICAS, {"service_id": service_id, "replicas": spec.replicas,
                                            "spec": spec.model_dump(mode="json"), "updated_at": utcnow()})

    async def _remove_replica(self, service_id: str, copy: Mapping[str, Any]) -> None:
        """Take one replica out: the gateways stop sending it requests, then its container goes. Its row is
        ``draining`` meanwhile (heartbeats leave it alone); if the service's primary copy, another takes over."""
        ctx = self.ctx
        async with ctx.db.transaction() as tx:
            # The service's row lock first, then the registry row: the order heartbeats and moves take them.
            service = await tx.first(sql.LOCK_SERVICE, {"service_id": service_id})
            await tx.execute(sql.DRAIN_ROW, {"row_id": copy["id"], "updated_at": utcnow()})
            if service is not None and service["container_id"] == copy["container_id"]:
                heir = next((row for row in await tx.all(sql.REPLICA_ROWS, {"service_id": service_id})), None)
                if heir is not None:
                    await tx.execute(sql.REPOINT, {
                        "service_id": service_id, "controller_id": heir["controller_id"],
                        "container_id": heir["container_id"], "gpu_devices": heir["gpu_devices"],
                        "endpoint": heir["endpoint"], "health": heir["health"],
                        "health_detail": heir["health_detail"], "updated_at": utcnow()})
        if copy["container_id"] is None:
            await sql.delete_row(ctx.db, copy["id"])
            return
        if ctx.gateway is not None:
            await ctx.gateway.drained(service_id, None, [copy["container_id"]], ctx.settings.gateway_drain_timeout)
        if await self.deployer.remove_container(copy["controller_id"], copy["container_id"]):
            await sql.delete_row(ctx.db, copy["id"])

    async def update(self, user: UserModel, service_id: str, patch: ServicePatch,
                     wait: bool = True) -> ServiceModel | OperationModel:
        async with self.ctx.db.session() as session:
            service = await get_for(session, user, service_id)
        changes = patch.model_dump(mode="json", exclude_unset=True)
        # Write-only and never in the dump: given (set, replaced) or null (cleared). Secrets given again as
        # they are stored change nothing (apply sends them with every change).
        given = "registry_auth" in patch.model_fields_set
        new_secrets = "secrets" in patch.model_fields_set and not same_secrets(
            self.ctx.settings.sealer, service.secrets_sealed, service.id, patch.secrets)
        if not changes and not given and "secrets" not in patch.model_fields_set:
            raise InvalidRequest("the patch changes nothing", code="EMPTY_PATCH")
        if not changes and not given and not new_secrets:
            return service  # the secrets it already has, given again: nothing to do
        # A merge patch (RFC 7396) at the spec's structure: a field given as null goes back to its default,
        # and the sub-objects merge field by field ({"resources": {"cpu_limit": 1}} keeps the GPUs and memory).
        # The maps (env, labels, ports, volumes) are replaced whole: that is how a key is removed from them.
        for key in ("resources", "health_check"):
            if isinstance(service.spec.get(key), dict) and isinstance(changes.get(key), dict):
                changes[key] = {**service.spec[key], **changes[key]}
        merged = {key: value for key, value in {**service.spec, **changes}.items()
                  if not (key in changes and value is None)}
        try:
            spec = ServiceSpec.model_validate(merged)
        except ValidationError as exc:
            raise InvalidRequest("the patched spec is invalid",
                                 [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]) from None
        if "replicas" in changes:
            check_replicas(spec.replicas, self.ctx.settings.max_replicas)
        # Sealed for this service and the registry of the image it will run. Stored credentials go only to
        # their own registry: an image on another one needs new credentials (or null) with it.
        auth: Sealed | None = None
        if given:
            auth = (seal(self.ctx.settings.sealer, patch.registry_auth, service.id, spec.image)
                    if patch.registry_auth is not None else None,)
        elif "image" in changes:
            check_host(service.registry_auth_sealed, spec.image)
        # A new map is checked against the env it will run with; a new env against the stored names (and
        # sizes, where this hub can open them).
        kept: Sealed | None = None
        if new_secrets:
            check_env(spec, patch.secrets or {})
            kept = (seal_secrets(self.ctx.settings.sealer, patch.secrets, service.id),)
        elif service.secrets_sealed and ("env" in changes or "cpu_fallback" in changes):
            check_env(spec, {name: "" for name in secret_names(service.secrets_sealed)})
        # The credentials are stored with the change that carries them, in its transaction: a change refused
        # leaves the old ones.
        # New secrets are a new version, rolled out as any change of the containers' spec.
        if set(changes) <= GATEWAY_ONLY | HUB_ONLY | {"replicas"} and kept is None:
            if spec.replicas != service.replicas:
                return await self.scale(user, service_id, spec, changes, wait, registry_auth=auth)
            return await self._update_at_gateway(user, service_id, spec, changes, auth)
        return await self.redeploy(user, service_id, "update", spec=spec, rescale="replicas" in changes, wait=wait,
                                   registry_auth=auth, secrets=kept)

    async def _update_at_gateway(self, user: UserModel, service_id: str, spec: ServiceSpec,
                                 changes: dict[str, Any], registry_auth: Sealed | None = None) -> ServiceModel:
        """A change the gateways apply alone, or new registry credentials alone (they serve the next pull: a
        scale-up's, a move's): the spec and the credentials are written with its operation, already
        succeeded; the container, its version and its deployment history stay as they are."""
        ctx = self.ctx
        async with ctx.service_locks[service_id], ctx.db.session() as session:
            service = await get_for(session, user, service_id)
            service.spec = {**service.spec, **{key: getattr(spec, key) for key in changes}}
            if registry_auth is not None:
                service.registry_auth_sealed = registry_auth[0]
            op = ctx.ops.new("update", user.username, service_id=service.id, controller_id=service.controller_id,
                             container_id=service.container_id,
                             details={**({"gateway": changes} if changes else {}), **auth_details(registry_auth)})
            op.status, op.finished_at = "succeeded", utcnow()
            session.add(op)
        return service

    async def move(self, service_id: str, reason: str, exclude: frozenset[str] = frozenset(),
                   expected_controller: str | None = None, replica: str | None = None) -> ServiceModel | None:
        """Move a service's copy for the reconciler: off a lost or draining controller, away from a container
        that stays unhealthy (the primary copy, or ``replica``: the row of another of its replicas, on
        ``expected_controller``), or to finish what an interrupted operation began; or (``replicas``) replace
        a replica found gone, else add one or remove one, for a service whose count of replicas is not its
        spec's.

        Returns None when there was nothing (left) to do.
        """
        ctx = self.ctx
        if reason == "replicas":
            return await self._recount(service_id)
        async with ctx.service_locks[service_id]:
            if reason == "resume":
                current = await ctx.reload_or_none(service_id)
                if current is None or current.controller_id != expected_controller:
                    return None
                if current.status not in UNSETTLED or await self._still_serving(current):
                    return None
            operation = {"controller_lost": "failover", "resume": "recover"}.get(reason, "migrate")
            # One transaction of Core statements, not ORM sessions (a mass failover makes thousands of moves):
            # the service read, its operation begun, its unfinished creates read.
            async with ctx.db.transaction() as tx:
                found = await tx.first(sql.MOVED, {"service_id": service_id})
                if found is None:
                    return None
                replacing: str | None = None
                if replica is not None:
                    # One of its replicas other than the primary: still there, and still one of them.
                    on = await tx.first(_REPLICA_ROW, {"service_id": service_id, "row_id": replica,
                                                       "controller_id": expected_controller})
                    if on is None:
                        return None
                    replacing = replica
                elif found["controller_id"] != expected_controller:
                    return None
                values = dict(found)
                owner = UserModel(id=values["owner_id"], username=values.pop("owner_username"),
                                  is_admin=values.pop("owner_is_admin"))
                service = ServiceModel(**values)
                service.owner = owner
                op = ctx.ops.new(
                    operation, "system", service_id=service.id, controller_id=service.controller_id,
                    container_id=service.container_id,
                    details={"reason": reason, "from_epoch": service.epoch, "from_controller": service.controller_id},
                )
                await insert_row(tx, op)
                unfinished = await read_unfinished(tx, service, sqlite=ctx.db.is_sqlite)
            async with ctx.ops.running(op):
                # No request carries a move: its operation id tags its log lines and its controller calls
                # (the reconciler runs each move in a task of its own, so this stays within it).
                bind_request_id(op.id)
                fresh = await self.replacer.replace(Replacement(
                    service, ServiceSpec.model_validate(service.spec), op, exclude=exclude, reason=reason,
                    wait_healthy=reason in ("drain", "unhealthy"), unfinished=unfinished, replacing=replacing,
                ))
            if reason == "controller_lost":
                ctx.metrics.failovers.inc()
            return fresh

    async def back_to_gpu(self, service_id: str, row_id: str) -> ServiceModel | None:
        """Move one copy that runs the spec's CPU fallback (registry row ``row_id``) back to its GPU variant,
        a planned move (the new copy healthy and routed before the old one goes), only onto a GPU: with
        none free now the operation fails and the copy stays as it is. None when the copy is no longer a
        fallback one (moved, removed, or the spec changed meanwhile)."""
        ctx = self.ctx
        if service_id in self._rolling:
            return None
        async with ctx.service_locks[service_id]:
            # Not while an update or rollback rolls (one queued before its lock too): it replaces the copy.
            if service_id in self._rolling or await ctx.db.first(_ROLLING_NOW, {"service_id": service_id}):
                return None
            service = await ctx.reload_or_none(service_id)
            if service is None or service.desired_state != "running" or service.status in UNSETTLED:
                return None
            copy = next((row for row in await self._replicas(service_id) if row["id"] == row_id), None)
            if copy is None or copy["status"] != "running" or not on_fallback(service.spec, copy["gpu_devices"]):
                return None
            op = await ctx.ops.begin("migrate", "system", service_id=service.id, controller_id=copy["controller_id"],
                                     container_id=copy["container_id"],
                                     details={"reason": "gpu_free", "from_variant": "cpu_fallback",
                                              "to_variant": "main", "from_epoch": service.epoch})
            async with ctx.ops.running(op):
                bind_request_id(op.id)
                return await self.replacer.replace(Replacement(
                    service, ServiceSpec.model_validate(service.spec), op, reason="gpu_free", replacing=row_id,
                    gpu_only=True))

    async def _recount(self, service_id: str) -> ServiceModel | None:
        """The reconciler's fix of a service whose replicas are not its count: a copy found gone is replaced,
        then one is added, or the excess removed (an interrupted scale). None when the count was right."""
        ctx = self.ctx
        async with ctx.service_locks[service_id]:
            service = await ctx.reload_or_none(service_id)
            if service is None or service.desired_state != "running" or service.status in UNSETTLED:
                return None
            copies = await self._replicas(service_id)
            missing = next((copy for copy in copies if copy["status"] == "missing"), None)
            live = len(copies) - sum(copy["status"] == "missing" for copy in copies)
            if missing is None and live == service.replicas:
                return None
            op = await ctx.ops.begin("scale", "system", service_id=service.id, controller_id=service.controller_id,
                                     container_id=service.container_id,
                                     details={"reason": "replicas", "to_replicas": service.replicas, "running": live})
            async with ctx.ops.running(op):
                bind_request_id(op.id)
                spec = ServiceSpec.model_validate(service.spec).model_copy(update={"replicas": service.replicas})
                details = await self._converge(service_id, spec, op, asked=False)
                await ctx.ops.finish(op, details=details)
            return await ctx.reload(service_id)

    async def _still_serving(self, service: ServiceModel) -> bool:
        """A service marked lost whose container turned out fine (its controller came back in time)."""
        if service.status != "lost" or service.container_id is None or service.controller_id is None:
            return False
        async with self.ctx.db.session() as session:
            row: ContainerRegistryModel | None = await session.scalar(
                sql.SERVING_ROW, {"service_id": service.id, "container_id": service.container_id})
            controller = await session.get(ControllerModel, service.controller_id)
            if row is None or row.status != "running" or controller is None or controller.status != "healthy":
                return False
            fresh = await session.get(ServiceModel, service.id)
            assert fresh is not None
            fresh.status = "unhealthy" if row.health == "unhealthy" else "running"
        return True
