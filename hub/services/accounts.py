"""Users as admins run them (docs/API.md, Users): listed with what they own, disabled and enabled, their
quotas set, deleted with the admin's explicit choice of what becomes of their services.

Invariants: an admin never disables or deletes themselves, and an admin is disabled or deleted only under the
lock of every admin's row, finding another enabled admin: an enabled admin always remains, also when two admins
disable each other at once. Rows are locked in one order (the admins' rows, then users by id), so two deletes
that hand their services to each other wait instead of deadlocking. A user's
delete never leaves a container without its service: their services are deleted through the lifecycle
(``ServiceManager.delete``: containers removed, gateway routes dropped) or handed to another user before
their row goes, and the row goes only in a transaction that, under its lock, finds them owning no service
and no pending or running job or live job attempt (``services.owner_id``'s ON DELETE CASCADE is never what
removes a service). A service with named volumes is never handed over: its Docker volumes are named after its
owner (``deploy.volume_name``), so under another owner it would start on empty ones. A refusal (4xx) changes
nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.errors import Conflict, InvalidRequest, NotFound
from hub.job_schemas import ATTEMPT_LIVE
from hub.models import ApiTokenModel, JobAttemptModel, JobModel, ServiceModel, UserModel, utcnow
from hub.schemas import ServiceSpec
from hub.services.quotas import OWNED_SPECS, limits_of, usage_of
from hub.services.users import get_user
from hub.user_schemas import Quotas, Usage, UserDeleted, UserOut, UserPatch

if TYPE_CHECKING:
    from hub.deps import Hub

log = logging.getLogger(__name__)

Choice = Literal["delete", "transfer"]
LIVE_JOBS = ("pending", "running")


async def user_out(session: AsyncSession, hub: Hub, user: UserModel) -> UserOut:
    rows = [dict(row._mapping) for row in await session.execute(OWNED_SPECS, {"owner_id": user.id})]
    usage = usage_of(rows)
    limits = limits_of(user, hub.settings)
    tokens = await session.scalar(select(func.count()).select_from(ApiTokenModel).where(
        ApiTokenModel.user_id == user.id, ApiTokenModel.revoked_at.is_(None))) or 0
    return UserOut(
        username=user.username, is_admin=user.is_admin, disabled=user.disabled_at is not None,
        disabled_at=user.disabled_at, created_at=user.created_at, services=len(rows), active_tokens=tokens,
        quotas=Quotas(services=user.max_services, gpus=user.max_gpus, memory_bytes=user.max_memory_bytes),
        limits=Quotas(services=limits.services, gpus=limits.gpus, memory_bytes=limits.memory_bytes),
        usage=Usage(services=usage.services, gpus=usage.gpus, memory_bytes=usage.memory_bytes))


async def list_users(session: AsyncSession, hub: Hub, limit: int, offset: int) -> list[UserOut]:
    users = await session.scalars(select(UserModel).order_by(UserModel.username).limit(limit).offset(offset))
    return [await user_out(session, hub, user) for user in users]


async def patch_user(session: AsyncSession, hub: Hub, admin: UserModel, username: str, patch: UserPatch) -> UserOut:
    """Disable or enable a user, set or clear their quotas. An admin cannot disable themselves (409
    ``CANNOT_DISABLE_SELF``). A disabled user's tokens are refused (403 ``USER_DISABLED``) within
    ``MMANAGER_AUTH_CACHE_SECONDS`` on every replica, at once on this one; their services keep running."""
    if not patch.model_fields_set or (patch.quotas is not None and not patch.quotas.model_fields_set
                                      and patch.model_fields_set == {"quotas"}):
        raise InvalidRequest("the patch changes nothing", code="EMPTY_PATCH")
    if patch.disabled:
        # Every admin's row with the user's (in id order, as deletes take them): two admins disabling each
        # other wait for one another, and the second finds the first's change.
        await _lock_rows(session, UserModel.username == username, admins=True)
    user = await get_user(session, username, lock=True)
    if patch.disabled is not None:
        if patch.disabled and user.id == admin.id:
            raise Conflict("an admin cannot disable themselves", code="CANNOT_DISABLE_SELF")
        if patch.disabled and user.disabled_at is None:
            await _refuse_last_admin(session, user)
        if patch.disabled and user.disabled_at is None:
            user.disabled_at = utcnow()
        elif not patch.disabled:
            user.disabled_at = None
    if patch.quotas is not None:
        given = patch.quotas.model_fields_set
        if "services" in given:
            user.max_services = patch.quotas.services
        if "gpus" in given:
            user.max_gpus = patch.quotas.gpus
        if "memory" in given:
            user.max_memory_bytes = None if patch.quotas.memory is None else int(patch.quotas.memory)
    await session.flush()
    out = await user_out(session, hub, user)
    await session.commit()
    # Committed before the answer: this replica refuses a disabled user's tokens from now on.
    hub.users.forget_user(user.id)
    return out


async def delete_user(hub: Hub, admin: UserModel, username: str, choice: Choice | None,
                      to: str | None) -> UserDeleted:
    """Delete a user, their services deleted (``delete``) or handed to ``to`` (``transfer``): 409
    ``USER_HAS_SERVICES`` (naming them) without a choice while they own any, 409 ``USER_HAS_JOBS`` while a job
    of theirs is pending or running (cancel it first). Their tokens, finished jobs, pipelines and artifacts go
    with them; operations and the audit log keep their name; model files they uploaded stay (shared by
    digest)."""
    if choice == "transfer" and to is None:
        raise InvalidRequest("services=transfer needs to=<user>: who receives the services", code="VALIDATION_ERROR")
    if choice != "transfer" and to is not None:
        raise InvalidRequest("to=<user> goes with services=transfer only", code="VALIDATION_ERROR")
    async with hub.db.session() as session:
        user = await get_user(session, username)
        if user.id == admin.id:
            raise Conflict("an admin cannot delete themselves", code="CANNOT_DELETE_SELF")
        await _refuse_last_admin(session, user)
        await _refuse_live_jobs(session, user)
        owned = list(await session.execute(select(ServiceModel.id, ServiceModel.name)
                                           .where(ServiceModel.owner_id == user.id).order_by(ServiceModel.name)))
        if owned and choice is None:
            raise Conflict(
                f"user {username!r} owns {len(owned)} service(s): say what becomes of them, "
                "services=delete or services=transfer&to=<user>",
                {"services": [{"id": sid, "name": name} for sid, name in owned]}, code="USER_HAS_SERVICES")
        receiver = None
        if choice == "transfer":
            assert to is not None
            receiver = await _receiver(session, user, to, [name for _, name in owned])
            await _refuse_volumes(session, user)
        user_id, admin_target = user.id, user.is_admin
    deleted: list[str] = []
    transferred: list[str] = []
    if choice == "delete" and owned:
        # Disabled first, so that no new service of theirs appears while theirs are deleted (a delete that
        # fails halfway leaves them disabled, with the services not deleted yet: call it again).
        async with hub.db.session() as session:
            await session.execute(update(UserModel).where(UserModel.id == user_id, UserModel.disabled_at.is_(None))
                                  .values(disabled_at=utcnow()))
        hub.users.forget_user(user_id)
        for service_id, name in owned:
            try:
                await hub.services.delete(admin, service_id)
            except NotFound as exc:
                if exc.code != "SERVICE_NOT_FOUND":
                    raise
                # Deleted meanwhile by another call: what this one was to do is done.
            deleted.append(name)
    async with hub.db.session() as session:
        # Under the user's row lock (a create takes it too, to count their services) and the receiver's (and,
        # for an admin, every admin's), taken in id order: what they own now.
        await _lock_rows(session, UserModel.id.in_([user_id, *([receiver.id] if receiver is not None else [])]),
                         admins=admin_target)
        user = await get_user(session, username, lock=True)
        if user.id != user_id:
            raise NotFound(f"user {username!r} not found", code="USER_NOT_FOUND")
        await _refuse_last_admin(session, user)
        if receiver is not None:
            transferred = await _transfer(hub, session, admin, user, receiver)
        await _refuse_live_jobs(session, user)
        left = list(await session.scalars(select(ServiceModel.name).where(ServiceModel.owner_id == user.id)))
        if left:
            raise Conflict(f"user {username!r} owns service(s) made meanwhile: {', '.join(left)}",
                           {"services": left}, code="USER_HAS_SERVICES")
        await session.delete(user)
    hub.users.forget_user(user_id)
    log.info("user %s deleted by %s (services: %s)", username, admin.username, choice or "none")
    return UserDeleted(username=username, services=choice, deleted=deleted, transferred=transferred,
                       to=receiver.username if receiver is not None else None)


async def _lock_rows(session: AsyncSession, which: ColumnElement[bool], admins: bool) -> None:
    """The users' rows ``which`` (and every admin's, with ``admins``), locked until the transaction ends,
    in one statement in id order: the one order every lock here is taken in."""
    await session.execute(select(UserModel.id).where(or_(which, UserModel.is_admin.is_(True)) if admins else which)
                          .order_by(UserModel.id).with_for_update())


async def _refuse_last_admin(session: AsyncSession, user: UserModel) -> None:
    """409 ``LAST_ADMIN`` when ``user`` is an admin and no other enabled admin remains (under
    ``_lock_rows`` for the answer to hold until the caller's transaction ends)."""
    if not user.is_admin:
        return
    others = await session.scalar(select(func.count()).select_from(UserModel).where(
        UserModel.is_admin.is_(True), UserModel.disabled_at.is_(None), UserModel.id != user.id))
    if not others:
        raise Conflict(f"{user.username!r} is the last admin", code="LAST_ADMIN")


async def _refuse_live_jobs(session: AsyncSession, user: UserModel) -> None:
    live = list(await session.scalars(select(JobModel.id).where(JobModel.owner_id == user.id,
                                                                JobModel.status.in_(LIVE_JOBS))))
    # A job already final whose attempt's container is still being stopped or watched counts too.
    live += [job for job in await session.scalars(
        select(JobAttemptModel.job_id).join(JobModel, JobModel.id == JobAttemptModel.job_id)
        .where(JobModel.owner_id == user.id, JobAttemptModel.status.in_(ATTEMPT_LIVE))) if job not in live]
    if live:
        raise Conflict(f"user {user.username!r} has {len(live)} pending or running job(s); cancel them first",
                       {"jobs": live}, code="USER_HAS_JOBS")


async def _refuse_volumes(session: AsyncSession, user: UserModel) -> None:
    """409 ``SERVICE_HAS_VOLUMES`` naming ``user``'s services with named volumes: their Docker volumes are
    named after their owner (``deploy.volume_name``), and under another one they would start on empty ones.
    Host paths are no owner's and do not count."""
    held = []
    for service_id, name, spec in await session.execute(select(ServiceModel.id, ServiceModel.name, ServiceModel.spec)
                                                        .where(ServiceModel.owner_id == user.id)
                                                        .order_by(ServiceModel.name)):
        volumes = sorted(source for source in ServiceSpec.model_validate(spec).volumes if not source.startswith("/"))
        if volumes:
            held.append({"id": service_id, "name": name, "volumes": volumes})
    if held:
        raise Conflict(f"service(s) {', '.join(h['name'] for h in held)} of {user.username!r} have named volumes, "
                       "which are their owner's and do not follow a transfer: delete them (services=delete), or "
                       "move their data and remove the volumes from their specs first",
                       {"services": held}, code="SERVICE_HAS_VOLUMES")


async def _receiver(session: AsyncSession, user: UserModel, to: str, names: list[str]) -> UserModel:
    """The user ``to``, fit to receive services named ``names``: another user, enabled, owning none of
    those names (409 ``SERVICE_NAME_CLASH`` with them)."""
    receiver = await get_user(session, to)
    if receiver.id == user.id:
        raise InvalidRequest("to= must name another user", code="VALIDATION_ERROR")
    if receiver.disabled_at is not None:
        raise Conflict(f"user {to!r} is disabled", code="USER_DISABLED")
    clash = list(await session.scalars(select(ServiceModel.name).where(
        ServiceModel.owner_id == receiver.id, ServiceModel.name.in_(names)).order_by(ServiceModel.name)))
    if clash:
        raise Conflict(f"user {to!r} already has service(s) named {', '.join(clash)}", {"names": clash},
                       code="SERVICE_NAME_CLASH")
    return receiver


async def _transfer(hub: Hub, session: AsyncSession, admin: UserModel, user: UserModel,
                    receiver: UserModel) -> list[str]:
    """Hand every service of ``user`` to ``receiver`` (checked again under both row locks), one ``transfer``
    operation each. Their containers keep running; their gateway URLs follow the new owner's name."""
    receiver = await get_user(session, receiver.username, lock=True)
    if receiver.disabled_at is not None:
        raise Conflict(f"user {receiver.username!r} is disabled", code="USER_DISABLED")
    owned = list(await session.execute(select(ServiceModel.id, ServiceModel.name)
                                       .where(ServiceModel.owner_id == user.id).order_by(ServiceModel.name)))
    await _receiver(session, user, receiver.username, [name for _, name in owned])
    await _refuse_volumes(session, user)
    if not owned:
        return []
    await session.execute(update(ServiceModel).where(ServiceModel.owner_id == user.id)
                          .values(owner_id=receiver.id, updated_at=utcnow()))
    now = utcnow()
    for service_id, _ in owned:
        op = hub.ops.new("transfer", admin.username, service_id=service_id,
                         details={"from": user.username, "to": receiver.username})
        op.status, op.finished_at = "succeeded", now
        session.add(op)
    return [name for _, name in owned]

