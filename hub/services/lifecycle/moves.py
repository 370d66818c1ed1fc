"""Moving a service to a new copy: what a user asks (update, rollback, migrate: ``redeploy``) and what the
reconciler asks (failover, drain, an unhealthy copy, recovery of an interrupted operation: ``move``).

Invariant: every move is one operation that ends in ``Replacer.replace`` under the service's lock; a
spec it deploys passed the spec policy when the move was asked (a rollback's too: the policy may have
tightened since that version ran).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from hub.db import insert_row
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.models import ContainerRegistryModel, ControllerModel, OperationModel, ServiceModel, UserModel, utcnow
from hub.scheduler.reconcile import UNSETTLED
from hub.schemas import ServicePatch, ServiceSpec
from hub.services.controllers import get_controller
from hub.services.lifecycle import sql
from hub.services.lifecycle.context import Lifecycle
from hub.services.lifecycle.deploy import Deployer
from hub.services.lifecycle.reads import get_for
from hub.services.lifecycle.replace import Replacement, Replacer, read_unfinished
from mmanager.logs import bind_request_id

# Spec fields only the gateways act on: a change of these alone starts no new container.
GATEWAY_ONLY = frozenset({"private", "rate_limit_per_minute", "max_body_size", "idle_timeout"})


class Mover:
    def __init__(self, ctx: Lifecycle, deployer: Deployer, replacer: Replacer) -> None:
        self.ctx = ctx
        self.deployer = deployer
        self.replacer = replacer

    async def redeploy(self, user: UserModel, service_id: str, operation: str, *, spec: ServiceSpec | None = None,
                       rollback_to: int | None = None, exclude_current: bool = False, target: str | None = None,
                       wait: bool = True) -> ServiceModel | OperationModel:
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
            version: int | None = None
            if rollback_to is not None:
                past = await session.scalar(sql.PAST_VERSION, {"service_id": service.id, "version": rollback_to})
                if past is None:
                    raise NotFound(f"service has no version {rollback_to}", code="VERSION_NOT_FOUND")
                spec = ServiceSpec.model_validate(past.spec)
            if spec is not None:
                latest = await session.scalar(sql.LATEST_VERSION, {"service_id": service.id})
                version = (latest or 0) + 1
            if target is not None:
                await get_controller(session, target)
        if spec is not None:
            self.deployer.check_policy(spec)
        op = await ctx.ops.begin(
            operation, user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id,
            details={"from_epoch": service.epoch, **({"version": version} if version else {}),
                     **({"rollback_to": rollback_to} if rollback_to else {})},
        )
        exclude = frozenset({service.controller_id}) if exclude_current and service.controller_id else frozenset()
        work = self._run_redeploy(service.id, spec, op, exclude, target, version)
        if not wait:
            ctx.spawn(work)
            return op
        return await work

    async def _run_redeploy(self, service_id: str, spec: ServiceSpec | None, op: OperationModel,
                            exclude: frozenset[str], target: str | None, version: int | None) -> ServiceModel:
        ctx = self.ctx
        async with ctx.service_locks[service_id], ctx.ops.running(op):
            service = await ctx.reload(service_id)
            if target is not None and target == service.controller_id:
                raise Conflict("the service already runs on that controller", code="SAME_CONTROLLER")
            if spec is None:
                spec = ServiceSpec.model_validate(service.spec)
            return await self.replacer.replace(Replacement(service, spec, op, exclude, target, version))

    async def update(self, user: UserModel, service_id: str, patch: ServicePatch,
                     wait: bool = True) -> ServiceModel | OperationModel:
        async with self.ctx.db.session() as session:
            service = await get_for(session, user, service_id)
        changes = patch.model_dump(mode="json", exclude_unset=True)
        if not changes:
            raise InvalidRequest("the patch changes nothing", code="EMPTY_PATCH")
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
        if set(changes) <= GATEWAY_ONLY:
            return await self._update_at_gateway(user, service_id, spec, changes)
        return await self.redeploy(user, service_id, "update", spec=spec, wait=wait)

    async def _update_at_gateway(self, user: UserModel, service_id: str, spec: ServiceSpec,
                                 changes: dict[str, Any]) -> ServiceModel:
        """A change the gateways apply alone: the spec is written with its operation, already succeeded;
        the container, its version and its deployment history stay as they are."""
        ctx = self.ctx
        async with ctx.service_locks[service_id], ctx.db.session() as session:
            service = await get_for(session, user, service_id)
            service.spec = {**service.spec, **{key: getattr(spec, key) for key in changes}}
            op = ctx.ops.new("update", user.username, service_id=service.id, controller_id=service.controller_id,
                             container_id=service.container_id, details={"gateway": changes})
            op.status, op.finished_at = "succeeded", utcnow()
            session.add(op)
        return service

    async def move(self, service_id: str, reason: str, exclude: frozenset[str] = frozenset(),
                   expected_controller: str | None = None) -> ServiceModel | None:
        """Move a service for the reconciler: off a lost or draining controller, away from a
        container that stays unhealthy, or to finish what an interrupted operation began.

        Returns None when there was nothing (left) to do.
        """
        ctx = self.ctx
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
                if found is None or found["controller_id"] != expected_controller:
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
                    wait_healthy=reason in ("drain", "unhealthy"), unfinished=unfinished,
                ))
            if reason == "controller_lost":
                ctx.metrics.failovers.inc()
            return fresh

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
