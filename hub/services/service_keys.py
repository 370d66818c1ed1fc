"""Service keys: what opens a private service's gateway route. Minted for the service's owner (or an
admin), shown once, stored as SHA-256 only; the gateways get the hashes through the routing table
(hub.services.gateway), so a revoked key stops working once they have applied the next version.

Invariant: a key belongs to one service and opens only that service's route.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.errors import Conflict, NotFound
from hub.models import ServiceKeyModel, ServiceModel, UserModel
from hub.security import hash_token, mint_service_key
from hub.services.lifecycle.reads import get_for

log = logging.getLogger(__name__)

MAX_KEYS_PER_SERVICE = 100
SHOWN_CHARS = 8


async def create_key(session: AsyncSession, user: UserModel, service_id: str,
                     name: str | None) -> tuple[ServiceKeyModel, str]:
    """Mint a key for a service ``user`` may see; the key itself is returned here and never again."""
    await get_for(session, user, service_id)
    # The service's row is locked so that two creates at once cannot both see room for one more.
    await session.scalar(select(ServiceModel.id).where(ServiceModel.id == service_id).with_for_update())
    count = await session.scalar(select(func.count()).select_from(ServiceKeyModel)
                                 .where(ServiceKeyModel.service_id == service_id))
    if count and count >= MAX_KEYS_PER_SERVICE:
        raise Conflict(f"service {service_id!r} already has {count} keys; delete one first",
                       details={"keys": count, "max": MAX_KEYS_PER_SERVICE}, code="SERVICE_KEY_LIMIT")
    key = mint_service_key()
    row = ServiceKeyModel(service_id=service_id, key_hash=hash_token(key), prefix=key[:SHOWN_CHARS], name=name,
                          created_by=user.username)
    session.add(row)
    await session.flush()
    log.info("key %s (%s…) created for service %s by %s", row.id, row.prefix, service_id, user.username)
    return row, key


async def list_keys(session: AsyncSession, user: UserModel, service_id: str) -> list[ServiceKeyModel]:
    await get_for(session, user, service_id)
    rows = await session.scalars(select(ServiceKeyModel).where(ServiceKeyModel.service_id == service_id)
                                 .order_by(ServiceKeyModel.created_at, ServiceKeyModel.id))
    return list(rows)


async def delete_key(session: AsyncSession, user: UserModel, service_id: str, key_id: str) -> None:
    await get_for(session, user, service_id)
    deleted = await session.execute(delete(ServiceKeyModel).where(ServiceKeyModel.id == key_id,
                                                                  ServiceKeyModel.service_id == service_id))
    if not deleted.rowcount:  # type: ignore[attr-defined]  # a DELETE's result is a CursorResult
        raise NotFound(f"service {service_id!r} has no key {key_id!r}", code="SERVICE_KEY_NOT_FOUND")
    log.info("key %s of service %s deleted by %s", key_id, service_id, user.username)
