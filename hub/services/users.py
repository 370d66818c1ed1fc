"""Users and their API tokens: created, minted, listed, revoked, rotated and checked.

A token is returned once (at its creation or rotation) and stored as its hash only. A token revoked, or
any token of a user disabled, in the database is refused within ``MMANAGER_AUTH_CACHE_SECONDS`` on every
replica, and at once on the replica that made the change (``UserAuth``). A token's ``last_used_at`` is a
hint written at most once a minute per token (``hub.services.last_used``), as controller keys' is: never a database
write per request.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from hub.db import Database
from hub.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from hub.models import ApiTokenModel, UserModel, utcnow
from hub.schemas import NAME_PATTERN
from hub.security import TOKEN_PREFIX, hash_token, mint_token
from hub.services.last_used import LastUsed
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
# The name of the token a user is created with.
FIRST_TOKEN = "initial"


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
    token = await issue_token(session, user, FIRST_TOKEN)
    return user, token


async def issue_token(session: AsyncSession, user: UserModel, name: str | None = None) -> str:
    return (await create_token(session, user.id, name))[1]


async def create_token(session: AsyncSession, user_id: int, name: str | None) -> tuple[ApiTokenModel, str]:
    """A new token for the user: its row, and the token itself, returned here and never again."""
    token = mint_token()
    row = ApiTokenModel(user_id=user_id, name=name, token_hash=hash_token(token),
                        prefix=token[: len(TOKEN_PREFIX) + 4], created_at=utcnow())
    session.add(row)
    await session.flush()
    return row, token


async def get_user(session: AsyncSession, username: str, lock: bool = False) -> UserModel:
    query = select(UserModel).where(UserModel.username == username)
    user = await session.scalar(query.with_for_update() if lock else query)
    if user is None:
        raise NotFound(f"user {username!r} not found", code="USER_NOT_FOUND")
    return user


async def list_tokens(session: AsyncSession, user_id: int) -> list[ApiTokenModel]:
    """The user's tokens, revoked ones included, oldest first (never the tokens themselves)."""
    rows = await session.scalars(select(ApiTokenModel).where(ApiTokenModel.user_id == user_id)
                                 .order_by(ApiTokenModel.created_at, ApiTokenModel.id))
    return list(rows)


async def _token_of(session: AsyncSession, user_id: int, token_id: int) -> ApiTokenModel:
    """The user's token ``token_id``; another user's answers as one nobody has (404)."""
    row = await session.scalar(select(ApiTokenModel).where(ApiTokenModel.id == token_id,
                                                           ApiTokenModel.user_id == user_id)
                                 .with_for_update(of=ApiTokenModel))
    if row is None:
        raise NotFound(f"no token {token_id}", code="TOKEN_NOT_FOUND")
    return row


async def revoke_token(session: AsyncSession, user_id: int, token_id: int) -> ApiTokenModel:
    """Revoke one of the user's tokens (again is fine: it stays revoked since the first time)."""
    row = await _token_of(session, user_id, token_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


async def rotate_token(session: AsyncSession, user_id: int, token_id: int) -> tuple[ApiTokenModel, str]:
    """A new token of the same name, the old one revoked, in one transaction. A revoked token is not
    rotated (409 TOKEN_REVOKED): what it stood for was taken back on purpose."""
    old = await _token_of(session, user_id, token_id)
    if old.revoked_at is not None:
        raise Conflict(f"token {token_id} is revoked; create a new one instead", code="TOKEN_REVOKED")
    old.revoked_at = utcnow()
    return await create_token(session, user_id, old.name)


async def ensure_user(session: AsyncSession, username: str, is_admin: bool) -> UserModel:
    user = await session.scalar(select(UserModel).where(UserModel.username == username))
    if user is None:
        user = UserModel(username=username, is_admin=is_admin)
        session.add(user)
        await session.flush()
    return user


async def authenticate(session: AsyncSession, token: str) -> ApiTokenModel:
    """The token's row, its user with it: ``Unauthorized`` for a token unknown or revoked, ``Forbidden``
    (``USER_DISABLED``) for one of a disabled user."""
    row = await session.scalar(
        select(ApiTokenModel).where(ApiTokenModel.token_hash == hash_token(token), ApiTokenModel.revoked_at.is_(None))
    )
    if row is None:
        raise Unauthorized("invalid or revoked token")
    if row.user.disabled_at is not None:
        raise Forbidden(f"user {row.user.username!r} is disabled; an admin may enable them again",
                        code="USER_DISABLED")
    return row


class Identity(NamedTuple):
    """A user as authentication knows it, without an ORM instance (``UserAuth.identity``)."""

    id: int
    username: str
    is_admin: bool
    created_at: datetime


class _Known(NamedTuple):
    who: Identity
    at: float
    token_id: int


class UserAuth:
    """Bearer tokens to users, remembered for ``ttl`` seconds (``MMANAGER_AUTH_CACHE_SECONDS``).

    A read then costs no database round trip for its authentication; a token revoked, or a user disabled, in
    the database is refused within ``ttl`` (at once on this replica when the change was made here:
    ``forget_token``, ``forget_user``). Refusals are not remembered (an unknown token always asks the
    database). Each call gets a user instance of its own, detached (as one loaded by a session that has
    closed), so a handler may attach it to its session like one it loaded itself.

    Each accepted token is noted as used, at most once a minute (``hub.services.last_used``); ``flush`` (the heartbeat
    flusher's loop) writes their ``last_used_at``.

    Invariant: an answer read from the database is remembered only if no forget happened while it was read
    (``_forgets``, counted before the read): a revoke committed and forgotten here while another call was
    reading the token's row (and found it still valid) is not undone by that call remembering it.
    ``clock`` (monotonic seconds) is injected for tests.
    """

    # Past this many remembered tokens the memory is emptied (a bound, not an eviction policy).
    MAX_ENTRIES = 100_000

    def __init__(self, db: Database, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.ttl = ttl
        self.clock = clock
        self._known: dict[str, _Known] = {}
        # Forgets so far (forget_token, forget_user): a read begun before one is not remembered.
        self._forgets = 0
        self.last_used: LastUsed[int] = LastUsed(db, ApiTokenModel, self.MAX_ENTRIES)

    def _fresh(self, digest: str, now: float) -> Identity | None:
        hit = self._known.get(digest)
        if hit is None or now - hit.at >= self.ttl:
            return None
        self._use(hit.token_id, now)
        return hit.who

    def remembered(self, token: str) -> Identity | None:
        """Who ``token`` is when it was accepted less than ``ttl`` ago; None otherwise. No database, and no
        coroutine: the check most calls end with."""
        return self._fresh(hash_token(token), self.clock())

    async def identity(self, token: str) -> Identity:
        """Who ``token`` is: from memory when it was accepted less than ``ttl`` ago, else from the database
        (``Unauthorized`` when it knows no such token, ``Forbidden`` when its user is disabled)."""
        digest = hash_token(token)
        now = self.clock()
        who = self._fresh(digest, now)
        if who is not None:
            return who
        forgets = self._forgets
        async with self.db.session() as session:
            row = await authenticate(session, token)
            found = row.user
            who = Identity(found.id, found.username, found.is_admin, found.created_at)
            token_id = row.id
        self._use(token_id, now)
        if self.ttl > 0 and forgets == self._forgets:
            if len(self._known) >= self.MAX_ENTRIES:
                self._known.clear()
            self._known[digest] = _Known(who, now, token_id)
        return who

    async def authenticate(self, token: str) -> UserModel:
        return as_user(await self.identity(token))

    def forget_token(self, token_id: int) -> None:
        """A token was revoked here: refused by this replica from now on."""
        self._forgets += 1
        self._known = {digest: hit for digest, hit in self._known.items() if hit.token_id != token_id}

    def forget_user(self, user_id: int) -> None:
        """A user was disabled, changed or deleted here: their tokens are looked up again from now on."""
        self._forgets += 1
        self._known = {digest: hit for digest, hit in self._known.items() if hit.who.id != user_id}

    def _use(self, token_id: int, now: float) -> None:
        self.last_used.note(token_id, now)

    async def flush(self) -> None:
        """Write ``last_used_at`` of the tokens used since the last flush (at most once a minute per token)."""
        await self.last_used.flush()


def as_user(who: Identity) -> UserModel:
    """``who`` as a user instance of its own, detached (as one loaded by a session that has closed)."""
    return _detached(*who)


def _detached(user_id: int, username: str, is_admin: bool, created_at: datetime) -> UserModel:
    user = UserModel(id=user_id, username=username, is_admin=is_admin, created_at=created_at)
    make_transient_to_detached(user)
    return user
