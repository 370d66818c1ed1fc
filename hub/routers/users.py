"""Users and tokens (docs/API.md, Users and Your tokens): admins' routes on any user
(``/api/admin/users...``), and each caller's own tokens (``/api/me/tokens...``).

Invariant: a token's value is in an answer only once, when it is created or rotated. A user's token ids are
theirs: another user's answer as ids nobody has (404 ``TOKEN_NOT_FOUND``) and change nothing. A revoke is
committed before its answer goes out, and refused from then on by this replica, by every other within
``MMANAGER_AUTH_CACHE_SECONDS``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response

from hub.deps import AdminUser, CurrentUser, HubDep, SessionDep
from hub.models import ApiTokenModel
from hub.routers.paging import Limit, Offset
from hub.schemas import UserCreated, UserIn
from hub.services.accounts import delete_user, list_users, patch_user, user_out
from hub.services.users import create_token, create_user, get_user, list_tokens, revoke_token, rotate_token
from hub.user_schemas import TokenCreated, TokenIn, TokenOut, UserDeleted, UserOut, UserPatch

router = APIRouter(prefix="/api", tags=["users"])


def _created(row: ApiTokenModel, token: str) -> TokenCreated:
    return TokenCreated(**TokenOut.model_validate(row, from_attributes=True).model_dump(), token=token)


# ------------------------------------------------------------------ admins: users


@router.post("/admin/users", status_code=201, response_model=UserCreated)
async def admin_create_user(body: UserIn, _: AdminUser, session: SessionDep) -> Any:
    user, token = await create_user(session, body.username, body.is_admin)
    return UserCreated(username=user.username, is_admin=user.is_admin, token=token)


@router.get("/admin/users", response_model=list[UserOut])
async def admin_list_users(_: AdminUser, hub: HubDep, session: SessionDep, limit: int = Limit,
                           offset: int = Offset) -> Any:
    return await list_users(session, hub, limit, offset)


@router.get("/admin/users/{username}", response_model=UserOut)
async def admin_get_user(username: str, _: AdminUser, hub: HubDep, session: SessionDep) -> Any:
    return await user_out(session, hub, await get_user(session, username))


@router.patch("/admin/users/{username}", response_model=UserOut)
async def admin_patch_user(username: str, body: UserPatch, admin: AdminUser, hub: HubDep,
                           session: SessionDep) -> Any:
    return await patch_user(session, hub, admin, username, body)


@router.delete("/admin/users/{username}", response_model=UserDeleted)
async def admin_delete_user(username: str, admin: AdminUser, hub: HubDep,
                            services: Literal["delete", "transfer"] | None = None, to: str | None = None) -> Any:
    return await delete_user(hub, admin, username, services, to)


# ------------------------------------------------------------------ admins: any user's tokens


@router.get("/admin/users/{username}/tokens", response_model=list[TokenOut])
async def admin_list_tokens(username: str, _: AdminUser, session: SessionDep) -> Any:
    user = await get_user(session, username)
    return [TokenOut.model_validate(row, from_attributes=True) for row in await list_tokens(session, user.id)]


@router.post("/admin/users/{username}/tokens", status_code=201, response_model=TokenCreated)
async def admin_create_token(username: str, body: TokenIn, _: AdminUser, session: SessionDep) -> Any:
    user = await get_user(session, username)
    return _created(*await create_token(session, user.id, body.name))


@router.delete("/admin/users/{username}/tokens/{token_id}", status_code=204)
async def admin_revoke_token(username: str, token_id: int, _: AdminUser, hub: HubDep,
                             session: SessionDep) -> Response:
    user = await get_user(session, username)
    await revoke_token(session, user.id, token_id)
    await session.commit()
    hub.users.forget_token(token_id)
    return Response(status_code=204)


@router.post("/admin/users/{username}/tokens/{token_id}/rotate", status_code=201, response_model=TokenCreated)
async def admin_rotate_token(username: str, token_id: int, _: AdminUser, hub: HubDep,
                             session: SessionDep) -> Any:
    user = await get_user(session, username)
    created = _created(*await rotate_token(session, user.id, token_id))
    await session.commit()
    hub.users.forget_token(token_id)
    return created


# ------------------------------------------------------------------ the caller's own tokens


@router.get("/me/tokens", response_model=list[TokenOut])
async def my_tokens(user: CurrentUser, session: SessionDep) -> Any:
    return [TokenOut.model_validate(row, from_attributes=True) for row in await list_tokens(session, user.id)]


@router.post("/me/tokens", status_code=201, response_model=TokenCreated)
async def create_my_token(body: TokenIn, user: CurrentUser, session: SessionDep) -> Any:
    return _created(*await create_token(session, user.id, body.name))


@router.delete("/me/tokens/{token_id}", status_code=204)
async def revoke_my_token(token_id: int, user: CurrentUser, hub: HubDep, session: SessionDep) -> Response:
    await revoke_token(session, user.id, token_id)
    await session.commit()
    hub.users.forget_token(token_id)
    return Response(status_code=204)


@router.post("/me/tokens/{token_id}/rotate", status_code=201, response_model=TokenCreated)
async def rotate_my_token(token_id: int, user: CurrentUser, hub: HubDep, session: SessionDep) -> Any:
    created = _created(*await rotate_token(session, user.id, token_id))
    await session.commit()
    hub.users.forget_token(token_id)
    return created
