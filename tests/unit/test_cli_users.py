"""``mmanager users`` and ``mmanager tokens`` in-process, on a fake SDK client (unit tests only;
tests/hub/test_users_admin.py drives the routes on a real hub): the calls each makes, what it prints, how it
fails."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from hub.user_schemas import Quotas, TokenCreated, TokenOut, Usage, UserDeleted, UserOut
from mmanager.client import ApiError
from tests.support.cli_fake import FakeClientBase, run, use_client

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)


def user(name: str = "alice", **changes: Any) -> UserOut:
    return UserOut(username=name, is_admin=False, disabled=False, disabled_at=None, created_at=NOW, services=2,
                   active_tokens=1, quotas=Quotas(services=None, gpus=2, memory_bytes=None),
                   limits=Quotas(services=5, gpus=2, memory_bytes=None),
                   usage=Usage(services=3, gpus=1, memory_bytes=48 * 1024**2)).model_copy(update=changes)


def token(token_id: int = 7, name: str = "laptop") -> TokenOut:
    return TokenOut(id=token_id, name=name, prefix="mm_abcd", created_at=NOW, last_used_at=None, revoked_at=None)


class FakeUsers:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def list(self) -> list[UserOut]:
        return [user(), user("root", is_admin=True)]

    def get(self, username: str) -> UserOut:
        if username != "alice":
            raise ApiError(404, "USER_NOT_FOUND", f"user {username!r} not found")
        return user()

    def disable(self, username: str) -> UserOut:
        self.calls.append(("disable", username))
        return user(disabled=True, disabled_at=NOW)

    def enable(self, username: str) -> UserOut:
        self.calls.append(("enable", username))
        return user()

    def set_quotas(self, username: str, **quotas: Any) -> UserOut:
        self.calls.append(("quotas", username, quotas))
        return user()

    def delete(self, username: str, services: str | None = None, to: str | None = None) -> UserDeleted:
        self.calls.append(("delete", username, services, to))
        if services is None:
            raise ApiError(409, "USER_HAS_SERVICES", "user 'alice' owns 2 service(s)")
        return UserDeleted(username=username, services=services, deleted=["a"] if services == "delete" else [],  # type: ignore[arg-type]
                           transferred=["a"] if services == "transfer" else [], to=to)

    def tokens(self, username: str) -> list[TokenOut]:
        self.calls.append(("tokens", username))
        return [token()]

    def create_token(self, username: str, name: str) -> TokenCreated:
        self.calls.append(("create_token", username, name))
        return TokenCreated(**token(8, name).model_dump(), token="mm_abcdSECRET")

    def revoke_token(self, username: str, token_id: int) -> None:
        self.calls.append(("revoke_token", username, token_id))

    def rotate_token(self, username: str, token_id: int) -> TokenCreated:
        self.calls.append(("rotate_token", username, token_id))
        return TokenCreated(**token(9).model_dump(), token="mm_abcdROTATED")


class FakeTokens:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def list(self) -> list[TokenOut]:
        return [token(1, "initial"), token()]

    def create(self, name: str) -> TokenCreated:
        self.calls.append(("create", name))
        return TokenCreated(**token(8, name).model_dump(), token="mm_abcdSECRET")

    def revoke(self, token_id: int) -> None:
        self.calls.append(("revoke", token_id))
        if token_id == 404:
            raise ApiError(404, "TOKEN_NOT_FOUND", "no token 404")

    def rotate(self, token_id: int) -> TokenCreated:
        self.calls.append(("rotate", token_id))
        return TokenCreated(**token(9).model_dump(), token="mm_abcdROTATED")


class FakeClient(FakeClientBase):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.users = FakeUsers(self.calls)
        self.tokens = FakeTokens(self.calls)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    return use_client(monkeypatch, FakeClient())


def test_users_list_and_show(client: FakeClient) -> None:
    r = run("users", "list")
    assert r.exit_code == 0, r.output
    assert "alice" in r.output and "root" in r.output and "3/5" in r.output and "no limit" in r.output
    r = run("users", "show", "alice", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["limits"] == {"services": 5, "gpus": 2, "memory_bytes": None}
    r = run("users", "show", "nobody")
    assert r.exit_code != 0 and "USER_NOT_FOUND" in r.output


def test_users_disable_enable_and_quota(client: FakeClient) -> None:
    assert run("users", "disable", "alice").exit_code == 0
    assert run("users", "enable", "alice").exit_code == 0
    r = run("users", "quota", "alice", "--services", "3", "--memory", "16G", "--gpus", "default")
    assert r.exit_code == 0, r.output
    assert client.calls == [("disable", "alice"), ("enable", "alice"),
                            ("quotas", "alice", {"services": 3, "gpus": None, "memory": "16G"})]
    r = run("users", "quota", "alice")
    assert r.exit_code != 0 and "EMPTY_PATCH" in r.output and len(client.calls) == 3


def test_users_delete_says_what_became_of_the_services(client: FakeClient) -> None:
    r = run("users", "delete", "alice")
    assert r.exit_code != 0 and "USER_HAS_SERVICES" in r.output
    r = run("users", "delete", "alice", "--services", "transfer", "--to", "bob")
    assert r.exit_code == 0 and "transferred to bob: a" in r.output, r.output
    r = run("users", "delete", "alice", "--services", "keep")
    assert r.exit_code != 0 and "VALIDATION_ERROR" in r.output
    assert client.calls == [("delete", "alice", None, None), ("delete", "alice", "transfer", "bob")]


def test_tokens_print_a_token_once_on_the_last_line(client: FakeClient) -> None:
    r = run("tokens", "list")
    assert r.exit_code == 0 and "laptop" in r.output and "SECRET" not in r.output
    r = run("tokens", "create", "--name", "ci")
    assert r.exit_code == 0, r.output
    assert r.output.rstrip("\n").splitlines()[-1] == "mm_abcdSECRET"
    r = run("tokens", "rotate", "7")
    assert r.exit_code == 0 and r.output.rstrip("\n").splitlines()[-1] == "mm_abcdROTATED"
    assert run("tokens", "revoke", "7").exit_code == 0
    r = run("tokens", "revoke", "404")
    assert r.exit_code != 0 and "TOKEN_NOT_FOUND" in r.output
    assert client.calls == [("create", "ci"), ("rotate", 7), ("revoke", 7), ("revoke", 404)]


def test_tokens_of_another_user_with_user(client: FakeClient) -> None:
    assert run("tokens", "list", "--user", "alice").exit_code == 0
    assert run("tokens", "create", "--name", "ci", "--user", "alice").exit_code == 0
    assert run("tokens", "revoke", "7", "--user", "alice").exit_code == 0
    assert run("tokens", "rotate", "7", "--user", "alice").exit_code == 0
    assert client.calls == [("tokens", "alice"), ("create_token", "alice", "ci"), ("revoke_token", "alice", 7),
                            ("rotate_token", "alice", 7)]
