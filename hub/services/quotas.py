"""Per-user quotas: how many service replicas, GPUs and bytes of memory a user's services may ask for.

A user's own quota (``users.max_services``, ``max_gpus``, ``max_memory_bytes``, set by an admin through
``PATCH /api/admin/users/{username}``) applies to them, admin or not; null takes the hub-wide default
(``MMANAGER_MAX_SERVICES_PER_USER``, ``MMANAGER_MAX_GPUS_PER_USER``, ``MMANAGER_MAX_MEMORY_PER_USER``), which
binds non-admins only. What counts is what the specs ask for, each replica counted: a replica is one service,
its ``gpu_count`` GPUs (a share of one GPU, ``gpu_memory``, counts as one) and its memory: the larger of its
``memory_limit`` and its CPU fallback's (a replica may run either). With a memory quota in force, every spec
written (a create, an update, a rollback, a scale-up) must name its ``memory_limit``, and its CPU fallback's
too when it has one (else it could use any amount): ``422 MEMORY_LIMIT_REQUIRED``.

Invariant: a quota is checked under the owner's ``users`` row lock (``hold_quota``), taken by the
transaction that writes the growth (a create, a scale, the replace that writes an update's or a rollback's
spec), so concurrent changes on any replica cannot pass it together. A quota lowered below what a user uses
stops nothing: it refuses growth only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, case, func, select

from hub.config import HubSettings
from hub.db import Tx
from hub.errors import InvalidRequest, QuotaExceeded
from hub.models import ServiceModel, UserModel
from hub.schemas import Resources, ServiceSpec

# The owner's row, locked until the caller's transaction ends (NO KEY UPDATE: inserts that only reference the
# user are not held up), with its quotas.
LOCK_OWNER = (select(UserModel.id, UserModel.username, UserModel.is_admin, UserModel.max_services,
                     UserModel.max_gpus, UserModel.max_memory_bytes)
              .where(UserModel.id == bindparam("owner_id")).with_for_update(key_share=True))
# Only the count of replicas matters: the aggregate, and the id of a service already named as the new one.
OWNED = select(
    func.coalesce(func.sum(ServiceModel.replicas), 0).label("count"),
    func.coalesce(func.sum(case((ServiceModel.id == bindparam("service_id"), ServiceModel.replicas)), else_=0), 0)
    .label("mine"),
    func.max(case((ServiceModel.name == bindparam("name"), ServiceModel.id))).label("clash"),
).where(ServiceModel.owner_id == bindparam("owner_id"))
# GPUs or memory matter too: every service's spec.
OWNED_SPECS = (select(ServiceModel.id, ServiceModel.name, ServiceModel.replicas, ServiceModel.spec)
               .where(ServiceModel.owner_id == bindparam("owner_id")))


@dataclass(frozen=True)
class Usage:
    services: int = 0
    gpus: int = 0
    memory_bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.services + other.services, self.gpus + other.gpus, self.memory_bytes + other.memory_bytes)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.services - other.services, self.gpus - other.gpus, self.memory_bytes - other.memory_bytes)


@dataclass(frozen=True)
class Limits:
    """None: no limit."""

    services: int | None = None
    gpus: int | None = None
    memory_bytes: int | None = None


def limits_of(user: Mapping[str, Any] | UserModel, settings: HubSettings) -> Limits:
    """``user``'s quotas: their own where set, else the hub's defaults (none for an admin)."""
    row = {key: getattr(user, key) for key in ("is_admin", "max_services", "max_gpus", "max_memory_bytes")} \
        if isinstance(user, UserModel) else user
    admin = bool(row["is_admin"])

    def pick(own: int | None, default: int | None) -> int | None:
        return own if own is not None else (None if admin else default)

    return Limits(pick(row["max_services"], settings.max_services_per_user),
                  pick(row["max_gpus"], settings.max_gpus_per_user),
                  pick(row["max_memory_bytes"], settings.max_memory_per_user))


def demand(spec: ServiceSpec | Mapping[str, Any], replicas: int) -> Usage:
    """What ``replicas`` copies of ``spec`` (a spec or its stored dump) ask for."""
    resources = spec.resources if isinstance(spec, ServiceSpec) else Resources.model_validate(
        spec.get("resources") or {})
    gpus = resources.gpu_count or (1 if resources.gpu_memory is not None else 0)
    return Usage(replicas, gpus * replicas, max(resources.memory_bytes, _fallback_memory(spec)) * replicas)


def _fallback_memory(spec: ServiceSpec | Mapping[str, Any]) -> int:
    """The memory the spec's CPU fallback asks for per replica (0: none, or no limit)."""
    if isinstance(spec, ServiceSpec):
        return spec.cpu_fallback.resources.memory_bytes if spec.cpu_fallback is not None else 0
    fallback = spec.get("cpu_fallback")
    if not isinstance(fallback, Mapping):
        return 0
    return Resources.model_validate(fallback.get("resources") or {}).memory_bytes


def usage_of(rows: Sequence[Mapping[str, Any]]) -> Usage:
    """The use of the services ``rows`` (OWNED_SPECS's rows)."""
    total = Usage()
    for row in rows:
        total += demand(row["spec"], row["replicas"])
    return total


def check(username: str, limits: Limits, before: Usage, after: Usage) -> None:
    """Refuse ``after`` where it passes a limit and grows past ``before`` (a quota lowered below the current use
    refuses growth only). ``QUOTA_EXCEEDED`` with the quota, what is used and the limit in its details."""
    for quota, used, asked, limit, unit in (
            ("services", before.services, after.services, limits.services, "service replicas"),
            ("gpus", before.gpus, after.gpus, limits.gpus, "GPUs"),
            ("memory", before.memory_bytes, after.memory_bytes, limits.memory_bytes, "bytes of memory")):
        if limit is not None and asked > limit and asked > used:
            raise QuotaExceeded(
                f"user {username!r} uses {used} {unit}; this would make it {asked}, past their quota of {limit}",
                {"quota": quota, "current": used, "requested": asked, "limit": limit})


async def hold_quota(tx: Tx, owner_id: int, name: str, settings: HubSettings, spec: ServiceSpec, replicas: int,
                     service_id: str | None = None) -> str | None:
    """Under the owner's row lock (held until ``tx`` ends), refuse ``replicas`` copies of ``spec`` past the
    owner's quotas: a new service's, or (``service_id``) what one of theirs becomes, its current use counted
    out. The id of the owner's service named ``name`` other than ``service_id``, if there is one."""
    owner = await tx.first(LOCK_OWNER, {"owner_id": owner_id})
    if owner is None:
        return None  # the owner is gone (deleted meanwhile): the insert's foreign key refuses it
    limits = limits_of(owner, settings)
    if limits.gpus is None and limits.memory_bytes is None:
        found = await tx.first(OWNED, {"owner_id": owner_id, "name": name, "service_id": service_id or ""})
        assert found is not None  # an aggregate answers one row
        before = Usage(services=found["count"])
        after = before - Usage(services=found["mine"]) + Usage(services=replicas)
        clash = found["clash"]
    else:
        rows = list(await tx.all(OWNED_SPECS, {"owner_id": owner_id}))
        others = [row for row in rows if row["id"] != service_id]
        before = usage_of(rows)
        after = usage_of(others) + demand(spec, replicas)
        clash = next((row["id"] for row in others if row["name"] == name), None)
        # A spec without a memory limit (or whose CPU fallback has none) could use any amount: what the
        # memory quota cannot measure, whether it grows the count or not.
        if limits.memory_bytes is not None:
            missing = [field for field, given in (
                ("resources.memory_limit", spec.resources.memory_bytes),
                ("cpu_fallback.resources.memory_limit",
                 spec.cpu_fallback.resources.memory_bytes if spec.cpu_fallback is not None else 1)) if not given]
            if missing:
                raise InvalidRequest(
                    f"user {owner['username']!r} has a memory quota ({limits.memory_bytes} bytes): the service "
                    f"must name its {' and its '.join(missing)}", {"limit": limits.memory_bytes, "fields": missing},
                    code="MEMORY_LIMIT_REQUIRED")
    check(owner["username"], limits, before, after)
    return clash
