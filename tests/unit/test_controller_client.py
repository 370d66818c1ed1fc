"""The hub's controller client retries only what is safe to repeat: reads and idempotent calls, three
attempts in all, on transport errors and 502/503/504; anything else is tried once."""

from __future__ import annotations

import httpx
import pytest

from hub.config import HubSettings
from hub.controller_client import ControllerClient
from hub.errors import ControllerRejected, ControllerTimedOut, ControllerUnavailable

KEY = "test-key-" + "x" * 32
INFO = {"id": "c1", "container_id": "c1", "name": "svc", "image": "img", "status": "running", "health": "healthy"}


def client_failing(failures: list[int | None]) -> tuple[ControllerClient, list[str]]:
    """A client whose controller answers each call with the next of ``failures`` (None: a refused
    connection, a status: that status), and then 200."""
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if failures:
            failure = failures.pop(0)
            if failure is None:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(failure, json={"error": {"code": "BUSY", "message": "busy"}})
        return httpx.Response(200, json=INFO)

    settings = HubSettings(database_url="sqlite+aiosqlite://", api_key=KEY)
    return ControllerClient(settings, transport=httpx.MockTransport(answer)), calls


async def test_a_read_is_tried_three_times_in_all() -> None:
    client, calls = client_failing([None, 503])
    info = await client.inspect("ctl", "http://ctl:8001", "c1")
    assert info.id == "c1" and len(calls) == 3

    client, calls = client_failing([None, 502, 504])
    with pytest.raises(ControllerUnavailable) as unavailable:
        await client.inspect("ctl", "http://ctl:8001", "c1")
    assert unavailable.value.code == "BUSY" and len(calls) == 3

    client, calls = client_failing([None, None, None])
    with pytest.raises(ControllerUnavailable):
        await client.inspect("ctl", "http://ctl:8001", "c1")
    assert len(calls) == 3


async def test_what_is_not_safe_to_repeat_is_tried_once_and_a_refusal_is_never_retried() -> None:
    client, calls = client_failing([None])
    with pytest.raises(ControllerUnavailable):
        await client.health("ctl", "http://ctl:8001")
    assert calls == ["GET /health"]

    client, calls = client_failing([409])
    with pytest.raises(ControllerRejected) as raised:
        await client.inspect("ctl", "http://ctl:8001", "c1")
    assert raised.value.status_code == 409 and len(calls) == 1


async def test_an_admin_pull_is_asked_once_with_the_pull_timeout() -> None:
    """A pull may take minutes: it waits the hub's pull timeout (not the create's), and one that times out
    is not asked again (that would send the credentials again) but answers 504 IMAGE_PULL_TIMEOUT."""
    settings = HubSettings(database_url="sqlite+aiosqlite://", api_key=KEY)
    assert settings.controller_pull_timeout > 600 >= settings.controller_create_timeout
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        raise httpx.ReadTimeout("no answer", request=request)

    client = ControllerClient(settings, transport=httpx.MockTransport(answer))
    with pytest.raises(ControllerTimedOut) as raised:
        await client.pull_image("ctl", "http://ctl:8001", "registry.example/lab/big:1")
    assert len(asked) == 1
    assert asked[0].extensions["timeout"]["read"] == settings.controller_pull_timeout
    assert (raised.value.status_code, raised.value.code) == (504, "IMAGE_PULL_TIMEOUT")
    assert raised.value.details["controller_id"] == "ctl"
