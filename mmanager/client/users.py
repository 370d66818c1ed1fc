"""The SDK's users and tokens (docs/API.md, Users and Your tokens): ``client.users`` (admin: any user, their
quotas and tokens) and ``client.tokens`` (the caller's own). A token's value is in a ``TokenCreated`` only,
from a create or a rotation: the hub shows it that once."""

from __future__ import annotations

import builtins
from typing import Any, Literal

from hub.user_schemas import TokenCreated, TokenOut, UserDeleted, UserOut
from mmanager.client.api import PAGE, _seg
from mmanager.client.calls import Bound, Call, M, Steps, op


class UsersApi(Bound[M]):
    """``client.users`` (admin)."""

    @op
    def list(self, limit: int = PAGE, offset: int = 0) -> Steps[builtins.list[UserOut]]:
        body = yield Call("GET", "/api/admin/users", params={"limit": limit, "offset": offset})
        return [UserOut.model_validate(u) for u in body]

    @op
    def get(self, username: str) -> Steps[UserOut]:
        return UserOut.model_validate((yield Call("GET", f"/api/admin/users/{_seg(username)}")))

    def _patch(self, username: str, body: dict[str, Any]) -> Steps[UserOut]:
        return UserOut.model_validate((yield Call("PATCH", f"/api/admin/users/{_seg(username)}", json=body)))

    @op
    def disable(self, username: str) -> Steps[UserOut]:
        """Refuse the user's tokens (their services keep running)."""
        return (yield from self._patch(username, {"disabled": True}))

    @op
    def enable(self, username: str) -> Steps[UserOut]:
        return (yield from self._patch(username, {"disabled": False}))

    @op
    def set_quotas(self, username: str, **quotas: int | str | None) -> Steps[UserOut]:
        """Set the quotas named (``services``, ``gpus``: counts; ``memory``: a size such as ``"16G"``, or
        bytes); None puts one back to the hub's default. Those not named stay as they are."""
        return (yield from self._patch(username, {"quotas": quotas}))

    @op
    def delete(self, username: str, services: Literal["delete", "transfer"] | None = None,
               to: str | None = None) -> Steps[UserDeleted]:
        """Delete the user; ``services``: what becomes of theirs (deleted, or handed to ``to``). Without it the
        hub refuses while they own any (``USER_HAS_SERVICES``)."""
        body = yield Call("DELETE", f"/api/admin/users/{_seg(username)}", params={"services": services, "to": to})
        return UserDeleted.model_validate(body)

    @op
    def tokens(self, username: str) -> Steps[builtins.list[TokenOut]]:
        return [TokenOut.model_validate(t) for t in (yield Call("GET", f"/api/admin/users/{_seg(username)}/tokens"))]

    @op
    def create_token(self, username: str, name: str) -> Steps[TokenCreated]:
        body = yield Call("POST", f"/api/admin/users/{_seg(username)}/tokens", json={"name": name})
        return TokenCreated.model_validate(body)

    @op
    def revoke_token(self, username: str, token_id: int) -> Steps[None]:
        yield Call("DELETE", f"/api/admin/users/{_seg(username)}/tokens/{_seg(token_id)}", read="none")

    @op
    def rotate_token(self, username: str, token_id: int) -> Steps[TokenCreated]:
        body = yield Call("POST", f"/api/admin/users/{_seg(username)}/tokens/{_seg(token_id)}/rotate")
        return TokenCreated.model_validate(body)


class TokensApi(Bound[M]):
    """``client.tokens``: the caller's own tokens."""

    @op
    def list(self) -> Steps[builtins.list[TokenOut]]:
        return [TokenOut.model_validate(t) for t in (yield Call("GET", "/api/me/tokens"))]

    @op
    def create(self, name: str) -> Steps[TokenCreated]:
        return TokenCreated.model_validate((yield Call("POST", "/api/me/tokens", json={"name": name})))

    @op
    def revoke(self, token_id: int) -> Steps[None]:
        yield Call("DELETE", f"/api/me/tokens/{_seg(token_id)}", read="none")

    @op
    def rotate(self, token_id: int) -> Steps[TokenCreated]:
        return TokenCreated.model_validate((yield Call("POST", f"/api/me/tokens/{_seg(token_id)}/rotate")))
