"""Users and their API tokens."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.errors import Conflict, Unauthorized
from hub.models import ApiTokenModel, UserModel
from hub.security import TOKEN_PREFIX, hash_token, mint_token


async def create_user(session: AsyncSession, username: str, is_admin: bool = False) -> tuple[UserModel, str]:
    """Create a user and its first token; the token is returned once and stored hashed."""
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
