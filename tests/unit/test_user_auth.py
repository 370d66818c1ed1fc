"""``UserAuth``'s memory of tokens against revokes made meanwhile, with the database and the clock faked and
the interleaving driven by the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from hub.errors import Unauthorized
from hub.models import ApiTokenModel, UserModel
from hub.services import users
from hub.services.users import UserAuth


class FakeDb:
    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        yield None


def token_row(token_id: int = 7) -> ApiTokenModel:
    user = UserModel(id=1, username="alice", is_admin=False, created_at=datetime(2025, 1, 1, tzinfo=UTC))
    row = ApiTokenModel(id=token_id, user_id=1)
    row.user = user
    return row


async def test_a_token_read_while_it_was_revoked_here_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    revoked = False
    reading, answered = asyncio.Event(), asyncio.Event()

    async def authenticate(session: Any, token: str) -> ApiTokenModel:
        if revoked:
            raise Unauthorized("invalid or revoked token")
        row = token_row()  # the row as read before the revoke committed
        reading.set()
        await answered.wait()
        return row

    monkeypatch.setattr(users, "authenticate", authenticate)
    auth = UserAuth(FakeDb(), ttl=60.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    # A call reads the token's row (still valid); meanwhile the token is revoked and forgotten here.
    reader = asyncio.create_task(auth.identity("tok"))
    await reading.wait()
    revoked = True
    auth.forget_token(7)
    answered.set()
    assert (await reader).username == "alice"  # that call was answered from what it read
    # But not remembered: the next call asks the database, which refuses the token.
    assert auth.remembered("tok") is None
    with pytest.raises(Unauthorized):
        await auth.identity("tok")


async def test_a_token_is_remembered_for_its_ttl_by_the_injected_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = 0

    async def authenticate(session: Any, token: str) -> ApiTokenModel:
        nonlocal asked
        asked += 1
        return token_row()

    monkeypatch.setattr(users, "authenticate", authenticate)
    clock = [100.0]
    auth = UserAuth(FakeDb(), ttl=5.0, clock=lambda: clock[0])  # type: ignore[arg-type]
    await auth.identity("tok")
    clock[0] = 104.9
    assert auth.remembered("tok") is not None and (await auth.identity("tok")).id == 1 and asked == 1
    clock[0] = 105.0
    assert auth.remembered("tok") is None
    await auth.identity("tok")
    assert asked == 2
    # A forget made with no read under way does not keep the next read from being remembered.
    auth.forget_user(1)
    await auth.identity("tok")
    assert auth.remembered("tok") is not None and asked == 3
