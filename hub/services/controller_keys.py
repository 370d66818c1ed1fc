"""Controllers' own heartbeat keys: minted, listed, revoked, and checked on every heartbeat.

A key is shown once, when it is minted, and stored as its SHA-256 only. A
controller has at most ``MAX_ACTIVE_KEYS`` active keys, so a key rotates
without a gap: add the new one, switch the controller to it, revoke the old.

A key authenticates only as the controller it was minted for. Each replica
checks heartbeats against a snapshot of the whole table in memory (a few
thousand hashes), reloaded every ``MMANAGER_AUTH_CACHE_SECONDS`` (5 s), so a
heartbeat costs no database round trip: a revoke is refused at once by the
replica that made it and within that time by the others (and by a hub whose
key was revoked from the command line). A key the snapshot does not know yet
is looked up in the database at once, so a new key works on its first beat.

The shared ``MMANAGER_API_KEY`` (or the ``api_key`` of the controller's entry
in ``MMANAGER_CONTROLLERS``) still authenticates, for compatibility, a
controller that has never had a key of its own; the hub logs a warning once
per controller, for the first ``SHARED_WARN_EACH``; beyond those, one line every
``SHARED_WARN_EVERY`` seconds counts the others (a fleet of ten thousand on
the shared key must not write ten thousand lines at each start). Once a
controller has had a key, revoked or not, the shared key no longer speaks for
it: revoking a leaked key must not reopen the older, weaker way in.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.config import HubSettings
from hub.db import Database
from hub.errors import Conflict, NotFound, Unauthorized
from hub.models import ControllerKeyModel, ControllerModel, utcnow
from hub.security import CONTROLLER_KEY_PREFIX, hash_token, mint_controller_key
from hub.services.controllers import get_controller
from hub.services.last_used import LastUsed

log = logging.getLogger(__name__)

MAX_ACTIVE_KEYS = 2
# What is kept of a key in clear, to tell keys apart: the prefix and 8 of its 43 random characters.
SHOWN_CHARS = len(CONTROLLER_KEY_PREFIX) + 8


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


@dataclass(frozen=True)
class _Key:
    id: str
    controller_id: str
    revoked: bool


@dataclass
class _Snapshot:
    """The controller_keys table as of ``taken`` (monotonic seconds): keys by hash, and which controllers
    have (or had) keys of their own."""

    by_hash: dict[str, _Key] = field(default_factory=dict)
    owners: set[str] = field(default_factory=set)
    taken: float = float("-inf")

    def add(self, key_hash: str, key: _Key) -> None:
        self.by_hash[key_hash] = key
        self.owners.add(key.controller_id)


# Controllers warned about one by one for beating with the shared key; beyond them, one line at most this
# often (seconds) counts the others.
SHARED_WARN_EACH = 10
SHARED_WARN_EVERY = 60.0


class ControllerKeyAuth:
    """Decides whether a bearer key may speak for a controller on the heartbeat path."""

    def __init__(self, db: Database, settings: HubSettings) -> None:
        self.db = db
        self.settings = settings
        # Controllers already warned about in this process for beating with the shared key; of those beyond
        # SHARED_WARN_EACH, how many the next counting line names, and whether it is due already.
        self._warned: set[str] = set()
        self._uncounted = 0
        self._count_due: asyncio.TimerHandle | None = None
        self.warn_every = SHARED_WARN_EVERY
        self.last_used: LastUsed[str] = LastUsed(db, ControllerKeyModel)
        self._snapshot = _Snapshot()
        self._reloading: asyncio.Task[None] | None = None
        # Bumped by forget(): a reload that began before it must not install what it read.
        self._generation = 0

    async def authenticate(self, controller_id: str, token: str) -> None:
        digest = hash_token(token)
        snapshot = await self._current()
        key = snapshot.by_hash.get(digest)
        has_own = controller_id in snapshot.owners
        if key is None and (has_own or not self._is_shared_key(controller_id, token)):
            # Not in the snapshot: a key minted since (maybe on another replica), or no key at all.
            key, has_own = await self._lookup(controller_id, digest)
        if key is not None:
            if key.controller_id != controller_id or key.revoked:
                raise _invalid()
            self._use(key.id)
            return
        if not self._is_shared_key(controller_id, token):
            raise _invalid()
        if has_own:
            raise Unauthorized(
                f"controller {controller_id!r} has keys of its own: the shared key is no longer accepted for it",
                code="CONTROLLER_KEY_INVALID",
            )
        self._warn_shared(controller_id)

    def _warn_shared(self, controller_id: str) -> None:
        """Once per controller: it authenticates with the shared key (beyond SHARED_WARN_EACH, counted)."""
        # (`mmanager dev` runs its one controller on the shared key on purpose: no warning there.)
        if controller_id in self._warned or self.settings.dev_mode:
            return
        self._warned.add(controller_id)
        if len(self._warned) <= SHARED_WARN_EACH:
            log.warning(
                "controller %s authenticates its heartbeats with the shared MMANAGER_API_KEY; give it a key of "
                "its own (`mmanager controllers key-create %s`, then MMANAGER_CONTROLLER_KEY_FILE on the controller)",
                controller_id,
                controller_id,
            )
            return
        self._uncounted += 1
        if self._count_due is None:
            # The first counting line a second after the first one uncounted (a fleet's start in one line),
            # then at most one each warn_every seconds.
            self._count_due = asyncio.get_running_loop().call_later(1.0, self._count_shared)

    def _count_shared(self) -> None:
        log.warning(
            "%d more controllers authenticate their heartbeats with the shared MMANAGER_API_KEY (%d in all since "
            "this hub started); give each a key of its own (`mmanager controllers key-create <id>`)",
            self._uncounted, len(self._warned),
        )
        self._uncounted = 0
        self._count_due = asyncio.get_running_loop().call_later(self.warn_every, self._next_count)

    def _next_count(self) -> None:
        if self._uncounted:
            self._count_shared()
        else:
            self._count_due = None

    def _is_shared_key(self, controller_id: str, token: str) -> bool:
        expected = self.settings.key_for(controller_id)
        return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())

    def forget(self) -> None:
        """A key was minted or revoked here: the next heartbeat reloads the snapshot first."""
        self._snapshot = _Snapshot()
        self._generation += 1
        self._reloading = None

    def _usable(self) -> _Snapshot | None:
        """The snapshot, when fresh enough to decide by; a reload starts once it is older than the TTL."""
        ttl = self.settings.auth_cache_seconds
        snapshot = self._snapshot
        age = time.monotonic() - snapshot.taken
        if age < ttl:
            return snapshot
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self._reload())
        # Slightly old: used while one reload runs for everyone (a reload failing leaves it as it is).
        return snapshot if age < 2 * ttl else None

    async def _current(self) -> _Snapshot:
        snapshot = self._usable()
        if snapshot is not None:
            return snapshot
        # Never loaded, forgotten, or too old (the database was away): wait for the reload (its error,
        # the database's, is the caller's: a 503).
        assert self._reloading is not None
        await asyncio.shield(self._reloading)
        return self._snapshot

    async def _reload(self) -> None:
        K = ControllerKeyModel
        generation = self._generation
        snapshot = _Snapshot(taken=time.monotonic())
        async with self.db.session() as session:
            for key_id, controller_id, key_hash, revoked_at in await session.execute(
                select(K.id, K.controller_id, K.key_hash, K.revoked_at)
            ):
                snapshot.add(key_hash, _Key(key_id, controller_id, revoked_at is not None))
        if generation == self._generation:
            self._snapshot = snapshot

    async def _lookup(self, controller_id: str, digest: str) -> tuple[_Key | None, bool]:
        """The key with this hash, and whether the controller has keys of its own, from the database."""
        K = ControllerKeyModel
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(K.id, K.controller_id, K.key_hash, K.revoked_at).where(
                        or_(K.key_hash == digest, K.controller_id == controller_id)
                    )
                )
            ).all()
        found = None
        for row in rows:
            key = _Key(row.id, row.controller_id, row.revoked_at is not None)
            self._snapshot.add(row.key_hash, key)
            if row.key_hash == digest:
                found = key
        return found, any(r.controller_id == controller_id for r in rows)

    def _use(self, key_id: str) -> None:
        self.last_used.note(key_id, time.monotonic())

    async def flush(self) -> None:
        """Write ``last_used_at`` of the keys used since the last flush (at most once a minute per key)."""
        await self.last_used.flush()
