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
from mmanager.client.calls import Call

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
        ("GET", "/api/operations/op1"): httpx.Response(404, json={"error": {
            "code": "OPERATION_NOT_FOUND", "message": "operation not found", "details": {"id": "op1"}}}),
        ("GET", "/api/me"): httpx.Response(502, text="<html>bad gateway</html>"),
    }, seen))
    with pytest.raises(ApiError) as caught:
        c.operations.get("op1")
    assert (caught.value.status, caught.value.code, caught.value.details) == (404, "OPERATION_NOT_FOUND",
                                                                              {"id": "op1"})
    assert str(caught.value) == "OPERATION_NOT_FOUND: operation not found"
    with pytest.raises(ApiError) as caught:
        c.me()
    assert (caught.value.status, caught.value.code) == (502, "HTTP_502")
    assert seen == ["GET /api/operations/op1", "GET /api/me"]


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
    c = client(script({("GET", f"/api/services/{SID}"): httpx.Response(200, json=SERVICE),
                        ("GET", f"/api/services/{SID}/logs"): httpx.Response(200, text="one\ntwo\n")}, seen))
    assert list(c.services.follow_logs(SID, tail=5)) == ["one", "two"]
    assert seen == [f"GET /api/services/{SID}", f"GET /api/services/{SID}/logs?tail=5&follow=true"]


async def test_the_async_client_runs_the_same_calls() -> None:
    seen: list[str] = []
    handler = script({
        ("GET", f"/api/services/{SID}"): httpx.Response(200, json=SERVICE),
        ("GET", f"/api/services/{SID}/logs"): httpx.Response(200, text="one\ntwo\n"),
        ("DELETE", f"/api/services/{SID}"): httpx.Response(404, json={"error": {
            "code": "SERVICE_NOT_FOUND", "message": "gone", "details": None}}),
        ("GET", "/api/me"): httpx.Response(200, json={"username": "alice", "admin": False}),
        ("GET", "/api/services"): httpx.Response(200, json=[]),
    }, seen)
    async with AsyncClient(url="http://hub", token="t", transport=httpx.MockTransport(handler)) as c:
        assert (await c.services.get(SID)).name == "m"
        assert [line async for line in c.services.follow_logs(SID)] == ["one", "two"]
        with pytest.raises(ApiError) as caught:
            await c.services.delete(SID)
        # Not an id, and no service of that name either: the id's own answer.
        assert (caught.value.code, caught.value.message) == ("SERVICE_NOT_FOUND", "gone")
        assert seen[-3:] == [f"DELETE /api/services/{SID}", "GET /api/me",
                             f"GET /api/services?name={SID}&owner=alice"]


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
    # A token exported for hub A never goes to the hub of a profile named: it keeps its own URL and token...
    monkeypatch.setenv("MMANAGER_TOKEN", "tok-env")
    assert config.resolve() == ("http://hub-b", "tok-b")
    monkeypatch.delenv("MMANAGER_PROFILE")
    assert config.resolve(profile="lab") == ("http://hub-b", "tok-b")
    assert Client(profile="lab").url == "http://hub-b"
    # ...while the current profile, not named, takes it.
    assert config.resolve() == ("http://hub-a", "tok-env")
    monkeypatch.delenv("MMANAGER_TOKEN")
    monkeypatch.setenv("MMANAGER_HUB_URL", "http://hub-env")
    assert config.resolve(profile="lab") == ("http://hub-b", "tok-b")
    # Both set: the environment wins, both, even over a profile named (a CI job).
    monkeypatch.setenv("MMANAGER_TOKEN", "tok-env")
    monkeypatch.setenv("MMANAGER_PROFILE", "lab")
    assert config.resolve() == ("http://hub-env", "tok-env")
    assert config.resolve(profile="lab") == ("http://hub-env", "tok-env")
    assert Client().url == "http://hub-env"
    monkeypatch.delenv("MMANAGER_HUB_URL")
    with pytest.raises(ApiError) as caught:
        config.resolve(profile="nope")
    assert caught.value.code == "PROFILE_NOT_FOUND"


@pytest.mark.parametrize(("url", "why"), [
    ("http://[::1", "not a URL"), ("127.0.0.1:8000", "the scheme is missing: give http:// or https://, e.g. "
                                                     "http://127.0.0.1:8000"),
    ("localhost:8000", "the scheme is missing"), ("http:/hub", "not a URL: give http://host:port"),
    ("ftp://hub", "the scheme is 'ftp'"), ("http:///hub", "no host"), ("http://hub:70000", "port 70000 is out of range"),
])
def test_a_url_no_client_can_call_is_refused_saying_where_it_came_from(
        no_profile: Path, monkeypatch: pytest.MonkeyPatch, url: str, why: str) -> None:
    with pytest.raises(ApiError) as caught:
        config.resolve(url=url)
    assert (caught.value.code, caught.value.message.split(": ", 1)[0]) == ("INVALID_URL", f"the url argument {url!r}")
    assert why in caught.value.message
    monkeypatch.setenv("MMANAGER_HUB_URL", url)
    with pytest.raises(ApiError, match="INVALID_URL: MMANAGER_HUB_URL"):
        Client()
    monkeypatch.delenv("MMANAGER_HUB_URL")
    no_profile.parent.mkdir(parents=True, exist_ok=True)
    no_profile.write_text(json.dumps({"current": "lab", "profiles": {"lab": {"url": url, "token": "t"}}}))
    with pytest.raises(ApiError, match="INVALID_URL: the URL of login profile 'lab'"):
        config.resolve()


def test_a_url_httpx_refuses_later_is_an_api_error_not_a_traceback() -> None:
    # A service's URL (the gateway's answer) goes through the same runner: httpx.InvalidURL is no TransportError.
    c = Client(url="http://hub", token="t", transport=httpx.MockTransport(lambda request: httpx.Response(200)))
    with pytest.raises(ApiError) as caught:
        c._runner.send(Call("GET", "/predict", base="http://[::1"))
    assert caught.value.code == "INVALID_URL"


def test_a_profiles_token_goes_only_to_its_own_hub(no_profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.save_profile("default", "http://prod", "tok-prod")
    # A URL from the environment or an argument, and no token beside it: the profile's token stays home.
    monkeypatch.setenv("MMANAGER_HUB_URL", "http://staging")
    assert config.resolve() == ("http://staging", None)
    assert config.resolve(url="http://other") == ("http://other", None)
    assert Client().url == "http://staging"
    # The profile's own hub, named again, still gets its token.
    monkeypatch.setenv("MMANAGER_HUB_URL", "http://prod/")
    assert config.resolve() == ("http://prod", "tok-prod")
    # An explicit token goes with the URL beside it or below it, never with a more explicit URL.
    monkeypatch.setenv("MMANAGER_HUB_URL", "http://staging")
    monkeypatch.setenv("MMANAGER_TOKEN", "tok-staging")
    assert config.resolve() == ("http://staging", "tok-staging")
    assert config.resolve(url="http://other") == ("http://other", None)
    assert config.resolve(url="http://other", token="tok-other") == ("http://other", "tok-other")
    monkeypatch.delenv("MMANAGER_HUB_URL")
    assert config.resolve() == ("http://prod", "tok-staging")
    assert config.resolve(token="tok-arg") == ("http://prod", "tok-arg")


def test_an_id_shaped_name_and_an_owners_name_find_their_service() -> None:
    hexname = "b" * 32
    seen: list[str] = []
    c = client(script({
        ("GET", f"/api/services/{hexname}"): httpx.Response(404, json={"error": {
            "code": "SERVICE_NOT_FOUND", "message": "not found", "details": None}}),
        ("GET", "/api/me"): httpx.Response(200, json={"username": "alice", "admin": True}),
        ("GET", "/api/services"): httpx.Response(200, json=[SERVICE]),
        ("GET", f"/api/services/{SID}"): httpx.Response(200, json=SERVICE),
        ("POST", f"/api/services/{SID}/stop"): httpx.Response(200, json=SERVICE),
    }, seen))
    # A service named with 32 hex digits: not an id the hub knows, so its name.
    assert c.services.get(hexname).id == SID
    assert seen == [f"GET /api/services/{hexname}", "GET /api/me", f"GET /api/services?name={hexname}&owner=alice",
                    f"GET /api/services/{SID}"]
    del seen[:]
    # owner/name: another user's service (an admin's call), no look-up of who the caller is.
    assert c.services.stop("bob/m").id == SID
    assert seen == ["GET /api/services?name=m&owner=bob", f"POST /api/services/{SID}/stop?wait=true"]


def test_path_values_are_quoted_as_one_segment() -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        if request.url.raw_path.startswith(b"/api/operations/"):
            return httpx.Response(200, json=operation("succeeded"))
        return httpx.Response(200, json={"name": "x"} if "models" in str(request.url) else [])
    c = client(handle)
    c.operations.get("../admin/users?x=1")
    with pytest.raises(Exception):  # noqa: B017, PT011  (the answer is not a model; the path is what counts)
        c.models.get("a/../../b")
    with pytest.raises(Exception):  # noqa: B017, PT011
        c.services.create({"name": "m"}, owner="../admin", repo="r?x", wait=False)
    assert seen == ["/api/operations/..%2Fadmin%2Fusers%3Fx%3D1", "/api/models/a%2F..%2F..%2Fb",
                    "/api/..%2Fadmin/r%3Fx/services?wait=false"]


def test_a_redirect_is_an_error_not_a_success() -> None:
    c = client(script({("GET", "/api/me"): httpx.Response(301, headers={"Location": "https://hub/api/me"})}, []))
    with pytest.raises(ApiError) as caught:
        c.me()
    assert (caught.value.status, caught.value.code) == (301, "REDIRECTED")
    assert "https://hub/api/me" in caught.value.message


def test_an_operation_with_no_service_is_an_api_error() -> None:
    answer = {**operation("succeeded"), "service_id": None}
    c = client(script({("POST", f"/api/services/{SID}/restart"): httpx.Response(202, json=answer)}, []))
    with pytest.raises(ApiError) as caught:
        c.services.restart(SID, wait=False)
    assert (caught.value.code, caught.value.details) == ("BAD_ANSWER", {"operation_id": "op1"})


def test_a_wait_rides_out_a_hub_restart_and_is_bounded_by_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mmanager.client.api.POLL_FIRST", 0.0)
    monkeypatch.setattr("mmanager.client.api.RETRY_FIRST", 0.0)
    polls: list[str] = []
    restarting = [httpx.ConnectError("refused"), httpx.Response(503, text="no backend"),
                  httpx.Response(502, text="bad gateway"), httpx.Response(200, json=operation("running")),
                  httpx.Response(200, json=operation("succeeded"))]

    def handle(request: httpx.Request) -> httpx.Response:
        polls.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        if request.method == "PATCH":
            return httpx.Response(202, json=operation("running"))
        if request.url.path == f"/api/services/{SID}":
            return httpx.Response(200, json=SERVICE)
        answer = restarting.pop(0)
        if isinstance(answer, Exception):
            raise httpx.ConnectError(str(answer), request=request)
        return answer
    c = client(handle)
    # A timeout waits by polling (the operation's id is known), through the hub's restart.
    assert c.services.update(SID, {"replicas": 2}, timeout=60).id == SID
    assert polls[0] == f"PATCH /api/services/{SID}?wait=false"
    assert polls.count("GET /api/operations/op1?") == 5
    # Past the timeout: WAIT_TIMEOUT, with the operation to follow.
    restarting[:] = [httpx.Response(200, json=operation("running"))] * 3
    with pytest.raises(ApiError) as caught:
        c.services.update(SID, {"replicas": 2}, timeout=0)
    assert (caught.value.code, caught.value.details) == ("WAIT_TIMEOUT", {"operation_id": "op1"})
    # What is not the hub being away still ends the wait at once.
    restarting[:] = [httpx.Response(500, json={"error": {"code": "INTERNAL_ERROR", "message": "x", "details": None}})]
    with pytest.raises(ApiError) as caught:
        c.operations.wait("op1")
    assert caught.value.code == "INTERNAL_ERROR"


def test_a_call_the_hub_waits_on_has_a_long_but_finite_read_timeout() -> None:
    from mmanager.client.transport import WAIT_READ

    reads: list[float | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        reads.append(request.extensions["timeout"]["read"])
        return httpx.Response(200, json=SERVICE)
    c = client(handle)
    c.services.restart(SID)
    c.services.get(SID)
    assert reads == [WAIT_READ, 60.0]


class Quiet(httpx.SyncByteStream):
    """A followed log that sends its lines, then nothing (a read timeout), or ends."""

    def __init__(self, lines: bytes, quiet: bool) -> None:
        self.lines, self.quiet, self.closed = lines, quiet, False

    def __iter__(self) -> Iterator[bytes]:
        yield self.lines
        if self.quiet:
            raise httpx.ReadTimeout("no data")

    def close(self) -> None:
        self.closed = True


def test_a_quiet_followed_log_is_opened_again_from_its_end_and_closes_with_its_block() -> None:
    seen: list[str] = []
    streams = [Quiet(b"one\n", quiet=True), Quiet(b"two\n", quiet=False), Quiet(b"a\nb\nc\n", quiet=False)]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.path}?{request.url.query.decode()}")
        if request.url.path.endswith("/logs"):
            assert request.extensions["timeout"]["read"] is not None
            return httpx.Response(200, stream=streams[len([s for s in seen if "/logs" in s]) - 1])
        return httpx.Response(200, json=SERVICE)
    c = client(handle)
    assert list(c.services.follow_logs(SID, tail=5)) == ["one", "two"]
    assert seen[1:] == [f"/api/services/{SID}/logs?tail=5&follow=true", f"/api/services/{SID}/logs?tail=0&follow=true"]
    with c.services.follow_logs(SID) as lines:
        for line in lines:
            assert line == "a"
            break
    assert streams[2].closed


async def test_an_async_followed_log_closes_with_its_block() -> None:
    closed: list[bool] = []

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield b"a\nb\n"

        async def aclose(self) -> None:
            closed.append(True)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs"):
            return httpx.Response(200, stream=Stream())
        return httpx.Response(200, json=SERVICE)
    async with AsyncClient(url="http://hub", token="t", transport=httpx.MockTransport(handle)) as c:
        async with c.services.follow_logs(SID) as lines:
            async for line in lines:
                assert line == "a"
                break
        assert closed == [True]


MODEL_FILE = {"digest": "sha256:" + "d" * 64, "name": "weights.bin", "size": 10, "uploaded_by": "alice",
              "created_at": NOW}


def test_an_upload_streams_the_file_a_chunk_at_a_time_with_its_length(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setattr("mmanager.client.transport.UPLOAD_CHUNK", 4)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0123456789")
    sent: list[tuple[str, str | None, str | None, bytes]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append((str(request.url), request.headers.get("content-length"),
                     request.headers.get("transfer-encoding"), request.read()))
        return httpx.Response(201, json=MODEL_FILE)
    seen: list[tuple[int, int]] = []
    out = client(handle).model_files.upload(path, name="weights.bin", progress=lambda d, t: seen.append((d, t)))
    assert out.digest == MODEL_FILE["digest"] and out.size == 10
    # Declared up front (the hub refuses an oversized file before it is sent), then read 4 bytes at a time.
    assert sent == [("http://hub/api/model-files?name=weights.bin", "10", None, b"0123456789")]
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]


def test_an_unreadable_upload_is_an_api_error_and_sends_nothing(tmp_path: Path) -> None:
    sent: list[str] = []
    c = client(script({}, sent))
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(ApiError) as caught:
            c.model_files.upload(path)
        assert caught.value.code == "INVALID_FILE" and str(path) in caught.value.message
    assert sent == []


async def test_the_async_client_uploads_with_an_async_progress(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(b"x" * 10)
    bodies: list[bytes] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, json=MODEL_FILE)
    seen: list[int] = []

    async def progress(done: int, total: int) -> None:
        seen.append(done)
    async with AsyncClient(url="http://hub", token="t", transport=httpx.MockTransport(handle)) as c:
        assert (await c.model_files.upload(str(path), progress=progress)).name == "weights.bin"
    assert bodies == [b"x" * 10] and seen == [0, 10]


def test_model_files_list_get_and_delete() -> None:
    seen: list[str] = []
    c = client(script({
        ("GET", "/api/model-files"): httpx.Response(200, json=[MODEL_FILE]),
        ("DELETE", f"/api/model-files/{MODEL_FILE['digest']}"): httpx.Response(204),
    }, seen))
    assert [f.name for f in c.model_files.list()] == ["weights.bin"]
    assert c.model_files.get(MODEL_FILE["digest"]).size == 10
    with pytest.raises(ApiError) as caught:
        c.model_files.get("sha256:" + "e" * 64)
    assert (caught.value.status, caught.value.code) == (404, "MODEL_FILE_NOT_FOUND")
    assert c.model_files.delete(MODEL_FILE["digest"]) is None
    assert seen == ["GET /api/model-files?limit=100&offset=0", "GET /api/model-files?limit=1000&offset=0",
                    "GET /api/model-files?limit=1000&offset=0", f"DELETE /api/model-files/{MODEL_FILE['digest']}"]


KEY = {"id": "k1", "name": "ci", "prefix": "mmk_ab", "created_by": "alice", "created_at": NOW}


def test_service_keys_are_made_listed_and_revoked_by_the_services_name() -> None:
    seen: list[str] = []
    bodies: list[Any] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            bodies.append(json.loads(request.content))
        return script({
            ("GET", "/api/me"): httpx.Response(200, json={"username": "alice", "admin": False}),
            ("GET", "/api/services"): httpx.Response(200, json=[SERVICE]),
            ("POST", f"/api/services/{SID}/keys"): httpx.Response(201, json={**KEY, "key": "mmk_abcdef"}),
            ("GET", f"/api/services/{SID}/keys"): httpx.Response(200, json=[KEY]),
            ("DELETE", f"/api/services/{SID}/keys/k1"): httpx.Response(204),
        }, seen)(request)
    c = client(handle)
    assert c.services.keys.create("m", name="ci").key == "mmk_abcdef"
    assert [k.prefix for k in c.services.keys.list("m")] == ["mmk_ab"]
    assert c.services.keys.delete("m", "k1") is None
    assert bodies == [{"name": "ci"}]
    assert [s for s in seen if "keys" in s] == [f"POST /api/services/{SID}/keys", f"GET /api/services/{SID}/keys",
                                               f"DELETE /api/services/{SID}/keys/k1"]


def test_images_list_pull_and_prune_answer_each_controllers_outcome() -> None:
    from mmanager.client.transport import WAIT_READ

    sent: list[tuple[str, Any, float | None]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        sent.append((request.url.path, body, request.extensions["timeout"]["read"]))
        if request.url.path.endswith("/images"):
            return httpx.Response(200, json={"controller_id": "a", "ok": True, "images": [
                {"repository": "img", "tag": "1", "id": "sha256:1", "size": 5, "created": NOW}]})
        if request.url.path.endswith("/pull"):
            return httpx.Response(200, json=[
                {"controller_id": "a", "ok": True, "image": {"exists": True, "id": "sha256:1"}},
                {"controller_id": "b", "ok": False, "error": {"code": "IMAGE_PULL_FAILED", "message": "denied"}}])
        return httpx.Response(200, json=[{"controller_id": "a", "ok": True, "images_deleted": [],
                                          "space_reclaimed": 0}])
    c = client(handle)
    assert c.images.list("a").images[0]["repository"] == "img"
    pulled = c.images.pull("img:1", ["a", "b"], registry_auth={"username": "u", "password": "p"})
    assert [(o.controller_id, o.ok) for o in pulled] == [("a", True), ("b", False)]
    assert c.images.prune("a")[0].space_reclaimed == 0
    assert sent == [
        ("/api/admin/controllers/a/images", None, 60.0),
        # The hub answers once every controller's pull ended: the long read timeout of a call it waits on.
        ("/api/admin/images/pull", {"image": "img:1", "controllers": ["a", "b"],
                                    "registry_auth": {"username": "u", "password": "p"}}, WAIT_READ),
        ("/api/admin/images/prune", {"controllers": ["a"]}, WAIT_READ)]
