"""Users and their API tokens: created, minted and checked.

A token is returned once and stored as its hash only. A token revoked in the database is
refused within ``MMANAGER_AUTH_CACHE_SECONDS`` on every replica (``UserAuth``).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from hub.db import Database
from hub.errors import Conflict, InvalidRequest, Unauthorized
from hub.models import ApiTokenModel, UserModel
from hub.schemas import NAME_PATTERN
from hub.security import TOKEN_PREFIX, hash_token, mint_token
from mmanager.audit import ANONYMOUS

# The actors the audit log and the operations record for callers that are no user: unauthenticated
# callers, the hub's own operations (failover, idle stops), the hub as the controllers' caller, and the
# controllers (``controller:<id>``). A user of such a name would be taken for them (``GET /api/audit``
# shows a user the entries whose actor is their name), so none may be created.
SYSTEM_ACTOR = "system"
HUB_ACTOR = "hub"
RESERVED_USERNAMES = frozenset({ANONYMOUS, SYSTEM_ACTOR, HUB_ACTOR})
RESERVED_PREFIX = "controller:"
USERNAME_MAX = 64


def reserved_username(username: str) -> bool:
    """Whether ``username`` is, or looks like (any case), an actor that is no user."""
    folded = username.casefold()
    return folded in RESERVED_USERNAMES or folded.startswith(RESERVED_PREFIX)


def check_username(username: str) -> None:
    """Refuse (422) a name no user may have: a reserved actor's (``RESERVED_NAME``), or one the API's
    ``UserIn`` would refuse (the CLI's names come here unchecked)."""
    if reserved_username(username):
        raise InvalidRequest(f"the user name {username!r} is reserved: the audit log records callers that are "
                             f"no user under it", {"reserved": sorted(RESERVED_USERNAMES)
                                                   + [RESERVED_PREFIX + "<id>"]}, code="RESERVED_NAME")
    if not 0 < len(username) <= USERNAME_MAX or not re.fullmatch(NAME_PATTERN, username):
        raise InvalidRequest(f"invalid user name {username!r}: 1 to {USERNAME_MAX} letters, digits, '_', '.' "
                             f"or '-', starting with a letter or digit", code="VALIDATION_ERROR")


async def create_user(session: AsyncSession, username: str, is_admin: bool = False) -> tuple[UserModel, str]:
    """Create a user and its first token; the token is returned once and stored hashed. A reserved or
    malformed name is refused (``check_username``) and nothing is created."""
    check_username(username)
    exists = await session.scalar(select(UserModel.id).where(UserModel.username == username))
    if exists is not None:
        raise Conflict(f"user {username!r} already exists", code="USER_EXISTS")
    user = UserModel(username=username, is_admin=is_admin)
    session.add(user)
    await session.flush()
    token = await issue_token(session, user)
    return user, token


async def issue_token(session: AsyncSession, user: UserModel) -> str:
    token = mint_token()
    session.add(ApiTokenModel(user_id=user.id, token_hash=hash_token(token), prefix=token[: len(TOKEN_PREFIX) + 4]))
    await session.flush()
    return token


async def ensure_user(session: AsyncSession, username: str, is_admin: bool) -> UserModel:
    user = await session.scalar(select(UserModel).where(UserModel.username == username))
    if user is None:
        user = UserModel(username=username, is_admin=is_admin)
        session.add(user)
        await session.flush()
    return user


async def authenticate(session: AsyncSession, token: str) -> UserModel:
    row = await session.scalar(
        select(ApiTokenModel).where(ApiTokenModel.token_hash == hash_token(token), ApiTokenModel.revoked_at.is_(None))
    )
    if row is None:
        raise Unauthorized("invalid or revoked token")
    return row.user


class Identity(NamedTuple):
    """A user as authentication knows it, without an ORM instance (``UserAuth.identity``)."""

    id: int
    username: str
    is_admin: bool
    created_at: datetime


class UserAuth:
    """Bearer tokens to users, remembered for ``ttl`` seconds (``MMANAGER_AUTH_CACHE_SECONDS``).

    A read then costs no database round trip for its authentication; a token
    revoked in the database is refused within ``ttl``. Refusals are not
    remembered (an unknown token always asks the database). Each call gets a
    user instance of its own, detached (as one loaded by a session that has
    closed), so a handler may attach it to its session like one it loaded itself.
    """

    # Past this many remembered tokens the memory is emptied (a bound, not an eviction policy).
    MAX_ENTRIES = 100_000

    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self._known: dict[str, tuple[Identity, float]] = {}

    def _fresh(self, digest: str, now: float) -> Identity | None:
        hit = self._known.get(digest)
        return hit[0] if hit is not None and now - hit[1] < self.ttl else None

    def remembered(self, token: str) -> Identity | None:
        """Who ``token`` is when it was accepted less than ``ttl`` ago; None otherwise. No database, and no
        coroutine: the check most calls end with."""
        return self._fresh(hash_token(token), time.monotonic())

    async def identity(self, token: str) -> Identity:
        """Who ``token`` is: from memory when it was accepted less than ``ttl`` ago, else from the database
        (``Unauthorized`` when it knows no such token)."""
        digest = hash_token(token)
        now = time.monotonic()
        who = self._fresh(digest, now)
        if who is not None:
            return who
        async with self.db.session() as session:
            found = await authenticate(session, token)
            who = Identity(found.id, found.username, found.is_admin, found.created_at)
        if self.ttl > 0:
            if len(self._known) >= self.MAX_ENTRIES:
                self._known.clear()
            self._known[digest] = (who, now)
        return who

    async def authenticate(self, token: str) -> UserModel:
        return as_user(await self.identity(token))


def as_user(who: Identity) -> UserModel:
    """``who`` as a user instance of its own, detached (as one loaded by a session that has closed)."""
    return _detached(*who)


def _detached(user_id: int, username: str, is_admin: bool, created_at: datetime) -> UserModel:
    user = UserModel(id=user_id, username=username, is_admin=is_admin, created_at=created_at)
    make_transient_to_detached(user)
    return user
