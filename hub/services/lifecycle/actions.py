"""What a user does to a service's container where it runs: start, stop and restart it (``lifecycle``),
read its status (``refresh``) and logs, and delete the service.

Invariant: each call here that changes a service is one operation (start, stop, restart, delete) run under
the service's lock; a container found gone on start or restart is replaced (``Replacer``), not reported
missing while the service is meant to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from hub.errors import Conflict, ControllerRejected, ControllerUnavailable, HubError, NotFound
from hub.logstreams import LogStreamSlots
from hub.models import ControllerModel, OperationModel, ServiceModel, UserModel, utcnow
from hub.schemas import ServiceSpec
from hub.services.controllers import get_controller
from hub.services.lifecycle import sql
from hub.services.lifecycle.context import Lifecycle
from hub.services.lifecycle.deploy import docker_status, endpoint_for
from hub.services.lifecycle.reads import get_for
from hub.services.lifecycle.replace import Replacement, Replacer
from hub.services.operations import progress_of
from mmanager.streams import ClosingStream
from mmanager.wire import ContainerInfo, probe_failed

# A service without a settled copy for longer than this is not "being replaced" for a waiting request.
REPLACING_RECENTLY = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class Woken:
    """A wake's answer: the operation that starts an idle service, or whether a copy may serve soon."""

    operation: OperationModel | None
    replacing: bool


class Actions:
    def __init__(self, ctx: Lifecycle, replacer: Replacer, log_streams: LogStreamSlots) -> None:
        self.ctx = ctx
        self.replacer = replacer
        self.log_streams = log_streams
        # Services whose wake is under way here: the requests that pile up at a gateway wake them once.
        self._waking: set[str] = set()
        # Services being stopped as idle here.
        self._idling: set[str] = set()

    async def lifecycle(self, user: UserModel, service_id: str, action: str,
                        wait: bool = True) -> ServiceModel | OperationModel:
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
        op = await ctx.ops.begin(
            action, user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id, details={"epoch": service.epoch},
        )
        work = self._run_lifecycle(service.id, action, op)
        if not wait:
            ctx.spawn(work)
            return op
        return await work

    async def idle_stop(self, service_id: str, idle_for: float) -> ServiceModel | None:
        """Stop a service nobody has called through the gateways for ``idle_for`` seconds, freeing what it
        holds: it reads ``idle`` until the next request through a gateway wakes it (``wake``). None when it
        no longer runs (stopped or moved meanwhile)."""
        service = await self.ctx.reload_or_none(service_id)
        if service is None or service.desired_state != "running" or service.status != "running":
            return None
        op = await self.ctx.ops.begin("idle_stop", "system", service_id=service.id,
                                      controller_id=service.controller_id, container_id=service.container_id,
                                      details={"epoch": service.epoch, "idle_seconds": round(idle_for)})
        # A request that comes meanwhile is held (``replacing``), then wakes it.
        self._idling.add(service.id)
        try:
            return await self._run_lifecycle(service.id, "stop", op, idle=True)
        finally:
            self._idling.discard(service.id)

    async def wake(self, service_id: str, actor: str) -> Woken:
        """For a request a gateway found no replica for: start an ``idle`` service again, in the background
        (``operation``); or say whether a copy of it may serve again soon (``replacing``)."""
        ctx = self.ctx
        service = await ctx.reload_or_none(service_id)
        if service is None:
            raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")
        if service_id in self._waking:
            # Started already (another gateway's request, or one that came meanwhile): hold it too.
            return Woken(None, True)
        if service.status != "idle":
            return Woken(None, self._replacing(service))
        self._waking.add(service_id)
        try:
            op = await ctx.ops.begin("wake", actor, service_id=service.id, controller_id=service.controller_id,
                                     container_id=service.container_id, details={"epoch": service.epoch})
        except BaseException:
            self._waking.discard(service_id)
            raise

        async def work() -> None:
            try:
                await self._run_lifecycle(service_id, "start", op)
            finally:
                self._waking.discard(service_id)

        ctx.spawn(work())
        return Woken(op, False)

    def _replacing(self, service: ServiceModel) -> bool:
        """Whether a copy of the service may serve again soon: it is being stopped as idle here (the request
        then wakes it), or it should run and its copy has not failed for good. A gateway may notice a copy gone
        before the hub does (a killed container, a controller whose loss is not confirmed yet), so a service
        the hub still believes running counts too; one without a settled copy for long (no controller takes
        it), one whose container failed, and one whose copy failed its golden-inference probe (left as it is
        until someone starts it again: no restart can fix it) do not."""
        if service.id in self._idling:
            return True
        if service.desired_state != "running" or service.status == "failed" or probe_failed(service.health_detail):
            return False
        return service.status in ("running", "unhealthy") or utcnow() - service.updated_at < REPLACING_RECENTLY

    async def _run_lifecycle(self, service_id: str, action: str, op: OperationModel, idle: bool = False) -> ServiceModel:
        ctx = self.ctx
        async with ctx.service_locks[service_id], ctx.ops.running(op):
            async with ctx.db.session() as session:
                service = await session.get(ServiceModel, service_id)
                if service is None:
                    await ctx.ops.finish(op, "service was deleted")
                    raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")
                service.desired_state = "stopped" if action == "stop" else "running"
            if service.container_id is None or service.controller_id is None:
                raise Conflict("service has no container", code="NO_CONTAINER")
            copies = await self._copies(service)
            if action == "stop" and ctx.gateway is not None:
                # The gateways stop sending it requests, and let those under way finish, before it stops.
                await ctx.gateway.drained(service_id, None, [container for _, container in copies],
                                          ctx.settings.gateway_drain_timeout)
            params = {"timeout": 10} if action == "stop" else {}
            # A restart of several replicas rolls: each copy leaves the gateways' tables, restarts, and comes
            # back once it serves (healthy), so the others answer meanwhile.
            rolling = action == "restart" and len(copies) > 1 and ctx.gateway is not None
            checked = service.spec.get("health_check") is not None
            # A copy with a golden-inference probe that starts again is judged afresh: routed only once the
            # new start passes it (its health from before says nothing of what it computes now).
            probed = action != "stop" and checked and bool(service.spec.get("probe"))
            # The service's own status follows its primary copy; each copy's row, its own.
            primary: tuple[str, Any] | None = None
            primary_healthy = False
            restarted = 0
            for controller_id, container_id in copies:
                async with ctx.db.session() as session:
                    controller = await get_controller(session, controller_id)
                if rolling:
                    assert ctx.gateway is not None
                    async with ctx.db.session() as session:
                        await session.execute(sql.DRAIN_PROBED_COPY if probed else sql.DRAIN_COPY,
                                              {"of_container": container_id, "updated_at": utcnow()})
                    await ctx.gateway.drained(service_id, None, [container_id], ctx.settings.gateway_drain_timeout)
                elif probed:
                    async with ctx.db.session() as session:
                        await session.execute(sql.UNJUDGED_COPY, {"of_container": container_id, "updated_at": utcnow()})
                try:
                    # The service's epoch is the newest of its copies': it speaks for every one of them.
                    await ctx.client.action(controller.id, controller.url, container_id, action, epoch=service.epoch,
                                            **params)
                except ControllerRejected as exc:
                    if exc.status_code != 404 or action == "stop":
                        if rolling:
                            await self._record(container_id, "running", None)  # as it was: it keeps serving
                        raise
                    if len(copies) == 1:
                        # The container is gone (removed by hand, or its server was rebuilt): make a new one.
                        await self.replacer.replace(Replacement(service, ServiceSpec.model_validate(service.spec), op))
                        return await ctx.reload(service_id)
                    # One replica of several: the reconciler replaces it, as it would a copy a heartbeat found gone.
                    await self._record(container_id, "missing", None)
                    continue
                info = await ctx.client.inspect(controller.id, controller.url, container_id)
                endpoint = endpoint_for(controller.url, info.ports).model_dump() if info.status == "running" else None
                if (rolling or probed) and checked and info.status == "running":
                    try:
                        await self.replacer.await_healthy(controller, container_id)
                    except HubError as exc:
                        if exc.code == "PROBE_FAILED":
                            # It answers wrong: recorded so, out of the gateways' tables, and the restart
                            # stops here (the copies not restarted yet keep serving).
                            await self._probe_failed(service_id, container_id, container_id == service.container_id,
                                                     endpoint, (exc.details or {}).get("health_detail"))
                            raise
                        # Otherwise back in the table anyway: the gateway's check, or a heartbeat, judges it.
                    else:
                        if probed:
                            await self._judged(container_id, "healthy", None)
                            if container_id == service.container_id:
                                primary_healthy = True
                await self._record(container_id, info.status, endpoint)
                if container_id == service.container_id:
                    primary = (info.status, endpoint)
                if rolling:
                    restarted += 1
                    await ctx.ops.advance(op, restarted, len(copies), "replicas",
                                          f"replica {restarted} of {len(copies)} restarted")
            async with ctx.db.session() as session:
                fresh = await session.get(ServiceModel, service_id)
                assert fresh is not None
                if primary is not None:
                    status, fresh.endpoint = primary
                    fresh.status = "idle" if idle and status != "running" else docker_status(status, fresh.desired_state)
                    fresh.status_message = None
                    if primary_healthy:
                        fresh.health, fresh.health_detail = "healthy", None
            await ctx.ops.finish(op, details={"progress": progress_of(
                restarted, len(copies), "replicas", "every replica restarted")} if rolling else None)
            return fresh

    async def _copies(self, service: ServiceModel) -> list[tuple[str, str]]:
        """The service's replicas (controller, container), primary first; a service whose rows predate
        replicas has its own container only."""
        async with self.ctx.db.session() as session:
            rows = [(row.controller_id, row.container_id) for row in
                    (await session.execute(sql.REPLICA_ROWS, {"service_id": service.id})) if row.container_id]
        assert service.controller_id is not None and service.container_id is not None
        own = (service.controller_id, service.container_id)
        return [own] + [copy for copy in rows if copy != own]

    async def _record(self, container_id: str, status: str, endpoint: dict[str, Any] | None) -> None:
        values = {"of_container": container_id, "status": status, "updated_at": utcnow()}
        async with self.ctx.db.session() as session:
            if endpoint is None:
                await session.execute(sql.COPY_STATUS, values)
            else:
                await session.execute(sql.COPY_RUNS, {**values, "endpoint": endpoint})

    async def _judged(self, container_id: str, health: str, detail: str | None) -> None:
        async with self.ctx.db.session() as session:
            await session.execute(sql.JUDGED_COPY, {"of_container": container_id, "health": health,
                                                    "health_detail": detail, "updated_at": utcnow()})

    async def _probe_failed(self, service_id: str, container_id: str, primary: bool,
                            endpoint: dict[str, Any] | None, detail: str | None) -> None:
        """A copy that started again and failed its golden-inference probe: its row, and the service's status
        when it is the primary copy, say so (as a heartbeat would)."""
        await self._judged(container_id, "unhealthy", detail)
        await self._record(container_id, "running", endpoint)
        if not primary:
            return
        async with self.ctx.db.session() as session:
            fresh = await session.get(ServiceModel, service_id)
            if fresh is not None and fresh.container_id == container_id:
                fresh.status, fresh.endpoint, fresh.status_message = "unhealthy", endpoint, None
                fresh.health, fresh.health_detail = "unhealthy", detail

    async def refresh(self, user: UserModel, service_id: str) -> ServiceModel:
        """The service with its status read from the controller, when it can be reached."""
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
            if service.controller_id is None or service.container_id is None:
                return service
            controller = await session.get(ControllerModel, service.controller_id)
        if controller is None:
            return service
        message: str | None
        info: ContainerInfo | None = None
        try:
            info = await ctx.client.inspect(controller.id, controller.url, service.container_id)
        except ControllerRejected as exc:
            if exc.status_code != 404:
                raise
            status, message, endpoint = "failed", "container not found on its controller", None
        except ControllerUnavailable as exc:
            async with ctx.db.session() as session:
                fresh = await session.get(ServiceModel, service_id)
                assert fresh is not None
                fresh.status_message = exc.message
            return fresh
        else:
            status = docker_status(info.status, service.desired_state)
            if status == "stopped" and service.status == "idle":
                status = "idle"
            message = None if status in ("running", "stopped") else f"container is {info.status}"
            endpoint = endpoint_for(controller.url, info.ports).model_dump() if info.status == "running" else None
            if status == "running" and info.health == "unhealthy":
                # As a heartbeat has it: a copy that runs and fails its check (or its golden probe) is unhealthy.
                status = "unhealthy"
        async with ctx.db.session() as session:
            fresh = await session.get(ServiceModel, service_id)
            assert fresh is not None
            if fresh.epoch == service.epoch:
                fresh.status, fresh.status_message, fresh.endpoint = status, message, endpoint
                if info is not None and info.status == "running":
                    fresh.health, fresh.health_detail = info.health, info.health_detail
        return fresh

    async def logs(self, user: UserModel, service_id: str, tail: int, follow: bool,
                   replica: str | None = None) -> str | ClosingStream:
        """The logs of the service's primary copy, or of the replica named (its container's id)."""
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
            if service.container_id is None or service.controller_id is None:
                raise Conflict("service has no container yet", code="NO_CONTAINER")
            controller_id, container_id = service.controller_id, service.container_id
            if replica is not None and replica != container_id:
                found = next((row for row in await session.execute(sql.REPLICA_ROWS, {"service_id": service.id})
                              if row.container_id == replica), None)
                if found is None:
                    raise NotFound(f"service {service_id!r} has no replica {replica!r}", code="REPLICA_NOT_FOUND")
                controller_id, container_id = found.controller_id, replica
            controller = await get_controller(session, controller_id)
        if not follow:
            return await ctx.client.logs(controller.id, controller.url, container_id, tail)
        # After the ownership check: another user's service is a 404 whatever the caller has open.
        release = self.log_streams.acquire(user.id, user.username)
        try:
            stream = await ctx.client.follow_logs(controller.id, controller.url, container_id, tail)
        except BaseException:
            release()
            raise
        return stream.on_close(release)

    async def delete(self, user: UserModel, service_id: str) -> None:
        ctx = self.ctx
        async with ctx.db.session() as session:
            service = await get_for(session, user, service_id)
        op = await ctx.ops.begin(
            "delete", user.username, service_id=service.id, controller_id=service.controller_id,
            container_id=service.container_id,
        )
        await self._run_delete(service, op)
        ctx.service_locks.pop(service.id, None)

    async def _run_delete(self, service: ServiceModel, op: OperationModel) -> None:
        ctx = self.ctx
        async with ctx.service_locks[service.id], ctx.ops.running(op):
            async with ctx.db.session() as session:
                containers = list(await session.execute(sql.SERVICE_COPIES, {"service_id": service.id}))
            left: list[str] = []
            for controller_id, container_id in containers:
                if container_id is None:
                    continue
                async with ctx.db.session() as session:
                    controller = await session.get(ControllerModel, controller_id)
                if controller is None:
                    continue
                try:
                    await ctx.client.action(controller.id, controller.url, container_id, "delete", force="true")
                except ControllerRejected as exc:
                    if exc.status_code != 404:
                        raise
                except ControllerUnavailable:
                    # With the service gone, the container has no registry row: the controller is
                    # told to remove it (an orphan) on its next heartbeat, whenever it comes back.
                    left.append(controller_id)
            async with ctx.db.session() as session:
                await session.execute(sql.DELETE_SERVICE, {"service_id": service.id})
            await ctx.ops.finish(op, details={"left_for_controller_cleanup": left} if left else None)
