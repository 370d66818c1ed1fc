"""Controllers' own heartbeat keys: minted, listed, revoked, and checked on every heartbeat.

A key is shown once, when it is minted, and stored as its SHA-256 only. A
controller has at most ``MAX_ACTIVE_KEYS`` active keys, so a key rotates
without a gap: add the new one, switch the controller to it, revoke the old.

A key authenticates only as the controller it was minted for. Nothing about
acceptance is remembered between requests: every heartbeat looks its key up by
hash, so a revoked key is refused at once, by every hub replica.

The shared ``MMANAGER_API_KEY`` (or the ``api_key`` of the controller's entry
in ``MMANAGER_CONTROLLERS``) still authenticates, for compatibility, a
controller that has never had a key of its own; the hub logs a warning once
per controller. Once a controller has had a key, revoked or not, the shared
key no longer speaks for it: revoking a leaked key must not reopen the older,
weaker way in.
"""

from __future__ import annotations

import hmac
import logging
import time
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.db import Database
from hub.errors import Conflict, NotFound, Unauthorized
from hub.models import ControllerKeyModel, ControllerModel, utcnow
from hub.security import CONTROLLER_KEY_PREFIX, hash_token, mint_controller_key
from hub.services.controllers import get_controller

log = logging.getLogger(__name__)

MAX_ACTIVE_KEYS = 2
# What is kept of a key in clear, to tell keys apart: the prefix and 8 of its 43 random characters.
SHOWN_CHARS = len(CONTROLLER_KEY_PREFIX) + 8
# last_used_at is a hint for operators ("is the old key still in use?"), not an audit trail:
# it is written at most this often per key, not on every heartbeat.
TOUCH_EVERY = 60.0


def _invalid() -> Unauthorized:
    return Unauthorized("the controller key is not valid for this controller", code="CONTROLLER_KEY_INVALID")


async def create_key(session: AsyncSession, controller_id: str, created_by: str) -> tuple[ControllerKeyModel, str]:
    """Mint a key for a controller; the key itself is returned here and never again."""
    # The controller's row is locked so that two concurrent creates cannot both see room for one more.
    controller = await session.scalar(
        select(ControllerModel).where(ControllerModel.id == controller_id).with_for_update()
    )
    if controller is None:
        raise NotFound(f"controller {controller_id!r} not found", code="CONTROLLER_NOT_FOUND")
    active = await session.scalar(
        select(func.count())
        .select_from(ControllerKeyModel)
        .where(ControllerKeyModel.controller_id == controller_id, ControllerKeyModel.revoked_at.is_(None))
    )
    if active and active >= MAX_ACTIVE_KEYS:
        raise Conflict(
            f"controller {controller_id!r} already has {active} active keys; revoke one first "
            "(rotate by adding the new key, switching the controller to it, then revoking the old one)",
            details={"active": active, "max": MAX_ACTIVE_KEYS},
            code="CONTROLLER_KEY_LIMIT",
        )
    key = mint_controller_key()
    row = ControllerKeyModel(
        controller_id=controller_id, key_hash=hash_token(key), prefix=key[:SHOWN_CHARS], created_by=created_by
    )
    session.add(row)
    await session.flush()
    log.info("key %s (%s…) created for controller %s by %s", row.id, row.prefix, controller_id, created_by)
    return row, key


async def list_keys(session: AsyncSession, controller_id: str) -> list[ControllerKeyModel]:
    await get_controller(session, controller_id)
    rows = await session.scalars(
        select(ControllerKeyModel)
        .where(ControllerKeyModel.controller_id == controller_id)
        .order_by(ControllerKeyModel.created_at, ControllerKeyModel.id)
    )
    return list(rows)


async def revoke_key(session: AsyncSession, controller_id: str, key_id: str) -> ControllerKeyModel:
    """Revoke a key (again is fine: it stays revoked since the first time)."""
    row = await session.get(ControllerKeyModel, key_id)
    if row is None or row.controller_id != controller_id:
        raise NotFound(f"controller {controller_id!r} has no key {key_id!r}", code="CONTROLLER_KEY_NOT_FOUND")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        log.info("key %s (%s…) of controller %s revoked", row.id, row.prefix, controller_id)
    return row


class ControllerKeyAuth:
    """Decides whether a bearer key may speak for a controller on the heartbeat path."""

    def __init__(self, db: Database, settings: HubSettings) -> None:
        self.db = db
        self.settings = settings
        # Controllers already warned about in this process for beating with the shared key.
        self._warned: set[str] = set()
        # Key id -> when this process last wrote its last_used_at (monotonic seconds).
        self._touched: dict[str, float] = {}

    async def authenticate(self, controller_id: str, token: str) -> None:
        digest = hash_token(token)
        K = ControllerKeyModel
        async with self.db.session() as session:
            # One round trip: the key presented, and whether the controller has keys of its own.
            rows = (
                await session.execute(
                    select(K.id, K.controller_id, K.key_hash, K.revoked_at).where(
                        or_(K.key_hash == digest, K.controller_id == controller_id)
                    )
                )
            ).all()
            match = next((r for r in rows if r.key_hash == digest), None)
            if match is not None:
                if match.controller_id != controller_id or match.revoked_at is not None:
                    raise _invalid()
                await self._touch(session, match.id)
                return
        expected = self.settings.key_for(controller_id)
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            raise _invalid()
        if rows:
            raise Unauthorized(
                f"controller {controller_id!r} has keys of its own: the shared key is no longer accepted for it",
                code="CONTROLLER_KEY_INVALID",
            )
        # (`mmanager dev` runs its one controller on the shared key on purpose: no warning there.)
        if controller_id not in self._warned and not self.settings.dev_mode:
            self._warned.add(controller_id)
            log.warning(
                "controller %s authenticates its heartbeats with the shared MMANAGER_API_KEY; give it a key of "
                "its own (`mmanager controllers key-create %s`, then MMANAGER_CONTROLLER_KEY_FILE on the controller)",
                controller_id,
                controller_id,
            )

    async def _touch(self, session: AsyncSession, key_id: str) -> None:
        now = time.monotonic()
        last = self._touched.get(key_id)
        if last is not None and now - last < TOUCH_EVERY:
            return
        self._touched[key_id] = now
        at = utcnow()
        # Other replicas write it too; the condition keeps it coarse across all of them.
        await session.execute(
            update(ControllerKeyModel)
            .where(
                ControllerKeyModel.id == key_id,
                or_(
                    ControllerKeyModel.last_used_at.is_(None),
                    ControllerKeyModel.last_used_at < at - timedelta(seconds=TOUCH_EVERY),
                ),
            )
            .values(last_used_at=at)
        )
