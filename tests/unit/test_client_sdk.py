"""The SDK (mmanager.client) against scripted hubs (httpx.MockTransport): errors carry the hub's code, an
unreachable hub is HUB_UNREACHABLE, names resolve to the caller's own services, waiting hands each poll to
``progress`` and raises a failed operation's error, logs follow as lines, and the login profile file is 0600,
replaced whole, and overridden by the environment. The real hub: tests/test_sdk.py."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.schemas import OperationOut
from mmanager.client import HUB_UNREACHABLE, ApiError, AsyncClient, Client, config

SID = "a" * 32
NOW = "2026-12-07T10:00:00Z"
SERVICE = {"id": SID, "name": "m", "owner": "alice", "repo": "default", "spec": {}, "version": 1,
           "desired_state": "running", "status": "running", "status_message": None, "controller_id": "a",
           "container_id": "c1", "epoch": 1, "endpoint": None, "url": "http://gw/s/alice/m/", "health": "healthy",
           "replicas": [], "created_at": NOW, "updated_at": NOW}


def operation(status: str, **details: Any) -> dict[str, Any]:
    return {"id": "op1", "service_id": SID, "controller_id": None, "container_id": None, "operation": "create",
            "status": status, "error": "IMAGE_PULL_FAILED: no such image" if status == "failed" else None,
            "actor": "alice", "details": details, "created_at": NOW, "finished_at": None}


Handler = Callable[[httpx.Request], httpx.Response]


def script(answers: dict[tuple[str, str], list[httpx.Response] | httpx.Response], seen: list[str]) -> Handler:
    """Answers by (method, path), in turn for a list; every request's ``METHOD path?query`` goes to ``seen``."""
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}" + (f"?{request.url.query.decode()}"
                                                              if request.url.query else ""))
        answer = answers[(request.method, request.url.path)]
        return answer.pop(0) if isinstance(answer, list) else answer
    return handle


def client(handler: Handler) -> Client:
    return Client(url="http://hub", token="t", transport=httpx.MockTransport(handler))


@pytest.fixture
def no_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in ("MMANAGER_HUB_URL", "MMANAGER_TOKEN", "MMANAGER_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MMANAGER_CONFIG", str(tmp_path / "cfg" / "config.json"))
    yield tmp_path / "cfg" / "config.json"


def test_errors_carry_the_hubs_code_and_status() -> None:
    seen: list[str] = []
    c = client(script({
        ("GET", f"/api/services/{SID}"): httpx.Response(404, json={"error": {
            "code": "SERVICE_NOT_FOUND", "message": "service not found", "details": {"id": SID}}}),
        ("GET", "/api/me"): httpx.Response(502, text="<html>bad gateway</html>"),
    }, seen))
    with pytest.raises(ApiError) as caught:
        c.services.get(SID)
    assert (caught.value.status, caught.value.code, caught.value.details) == (404, "SERVICE_NOT_FOUND", {"id": SID})
    assert str(caught.value) == "SERVICE_NOT_FOUND: service not found"
    with pytest.raises(ApiError) as caught:
        c.me()
    assert (caught.value.status, caught.value.code) == (502, "HTTP_502")
    assert seen == [f"GET /api/services/{SID}", "GET /api/me"]


def test_an_unreachable_hub_is_hub_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)
    with pytest.raises(ApiError) as caught:
        client(refuse).services.list()
    assert (caught.value.status, caught.value.code) == (0, HUB_UNREACHABLE)
    assert "http://hub" in caught.value.message


def test_a_name_is_the_callers_own_service() -> None:
    seen: list[str] = []
    c = client(script({
        ("GET", "/api/me"): httpx.Response(200, json={"username": "alice", "admin": True}),
        ("GET", "/api/services"): [httpx.Response(200, json=[SERVICE]), httpx.Response(200, json=[])],
        ("GET", f"/api/services/{SID}"): httpx.Response(200, json=SERVICE),
    }, seen))
    assert c.services.get("m").id == SID
    with pytest.raises(ApiError) as caught:
        c.services.get("other")
    assert (caught.value.status, caught.value.code) == (404, "SERVICE_NOT_FOUND")
    # Who the caller is was asked once; an admin's name still means their own service.
    assert seen == ["GET /api/me", "GET /api/services?name=m&owner=alice", f"GET /api/services/{SID}",
                    "GET /api/services?name=other&owner=alice"]


def test_waiting_hands_each_poll_to_progress_and_raises_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mmanager.client.api.POLL_FIRST", 0.0)
    seen: list[str] = []
    progress = {"done": 1, "total": 2, "unit": "replicas", "step": "replica 1 of 2 running"}
    c = client(script({
        ("POST", "/api/alice/default/services"): [httpx.Response(202, json=operation("running")),
                                                  httpx.Response(202, json=operation("running")),
                                                  httpx.Response(201, json=SERVICE)],
        ("GET", "/api/operations/op1"): [httpx.Response(200, json=operation("running", progress=progress)),
                                         httpx.Response(200, json=operation("succeeded")),
                                         httpx.Response(200, json=operation("failed"))],
        ("GET", f"/api/services/{SID}"): httpx.Response(200, json=SERVICE),
    }, seen))
    polls: list[OperationOut] = []
    service = c.services.create({"name": "m", "image": "x"}, owner="alice", progress=polls.append)
    assert service.status == "running"
    assert [(p.status, p.details.get("progress")) for p in polls] == [("running", progress), ("succeeded", None)]
    # Followed to its end, so the hub runs it as a create that waits.
    assert seen[0] == "POST /api/alice/default/services?wait=false&watch=true"
    with pytest.raises(ApiError) as caught:
        c.services.create({"name": "m", "image": "x"}, owner="alice", progress=polls.append)
    assert (caught.value.code, caught.value.message) == ("IMAGE_PULL_FAILED", "no such image")
    assert caught.value.details["operation_id"] == "op1"
    # No progress to show: the hub's own wait, answered with the service.
    del seen[:]
    assert c.services.create({"name": "m", "image": "x"}, owner="alice").id == SID
    assert seen == ["POST /api/alice/default/services?wait=true"]


def test_follow_logs_yields_lines() -> None:
    seen: list[str] = []
    c = client(script({("GET", f"/api/services/{SID}/logs"): httpx.Response(200, text="one\ntwo\n")}, seen))
    assert list(c.services.follow_logs(SID, tail=5)) == ["one", "two"]
    assert seen == [f"GET /api/services/{SID}/logs?tail=5&follow=true"]


async def test_the_async_client_runs_the_same_calls() -> None:
    seen: list[str] = []
    handler = script({
        ("GET", f"/api/services/{SID}"): httpx.Response(200, json=SERVICE),
        ("GET", f"/api/services/{SID}/logs"): httpx.Response(200, text="one\ntwo\n"),
        ("DELETE", f"/api/services/{SID}"): httpx.Response(404, json={"error": {
            "code": "SERVICE_NOT_FOUND", "message": "gone", "details": None}}),
    }, seen)
    async with AsyncClient(url="http://hub", token="t", transport=httpx.MockTransport(handler)) as c:
        assert (await c.services.get(SID)).name == "m"
        assert [line async for line in c.services.follow_logs(SID)] == ["one", "two"]
        with pytest.raises(ApiError) as caught:
            await c.services.delete(SID)
        assert caught.value.code == "SERVICE_NOT_FOUND"


def test_the_profile_file_is_private_and_replaced_whole(no_profile: Path) -> None:
    config.save_profile("default", "http://hub-a/", "tok-a")
    config.save_profile("lab", "http://hub-b", "tok-b", make_current=False)
    assert stat.S_IMODE(no_profile.stat().st_mode) == 0o600
    assert [p.name for p in no_profile.parent.iterdir()] == ["config.json"]  # no temporary left beside it
    assert json.loads(no_profile.read_text()) == {"current": "default", "profiles": {
        "default": {"url": "http://hub-a", "token": "tok-a"}, "lab": {"url": "http://hub-b", "token": "tok-b"}}}
    assert config.resolve() == ("http://hub-a", "tok-a")
    assert config.resolve(profile="lab") == ("http://hub-b", "tok-b")


def test_the_environment_overrides_the_profile(no_profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ApiError) as caught:
        config.resolve()
    assert caught.value.code == "NOT_CONFIGURED"
    config.save_profile("default", "http://hub-a", "tok-a")
    config.save_profile("lab", "http://hub-b", "tok-b", make_current=False)
    monkeypatch.setenv("MMANAGER_PROFILE", "lab")
    assert config.resolve() == ("http://hub-b", "tok-b")
    monkeypatch.setenv("MMANAGER_TOKEN", "tok-env")
    assert config.resolve() == ("http://hub-b", "tok-env")
    monkeypatch.setenv("MMANAGER_HUB_URL", "http://hub-env")
    assert config.resolve() == ("http://hub-env", "tok-env")
    assert Client().url == "http://hub-env"
    monkeypatch.delenv("MMANAGER_HUB_URL")
    with pytest.raises(ApiError) as caught:
        config.resolve(profile="nope")
    assert caught.value.code == "PROFILE_NOT_FOUND"
