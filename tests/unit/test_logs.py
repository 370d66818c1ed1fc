"""mmanager.logs without processes: the formats, the request-id header's cleaning, the middleware, the
settings' names, and the id the hub's controller client sends on."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from controller.config import ControllerSettings
from hub.config import HubSettings
from hub.controller_client import ControllerClient
from mmanager.logs import (
    JsonFormatter,
    LogFileError,
    LogSettings,
    RequestIdMiddleware,
    TextFormatter,
    bind_request_id,
    clean_request_id,
    install_request_ids,
    request_id_var,
    setup_logging,
)

KEY = "k" * 8 + "0123456789abcdef"


def record(message: str = "hello %s", args: tuple[object, ...] = ("world",), exc: bool = False,
           request_id: str | None = None, name: str = "hub.test", level: int = logging.INFO) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad value")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord(name, level, __file__, 1, message, args, exc_info)
    rec.request_id = request_id
    return rec


def test_json_lines_carry_time_level_logger_message_request_id_and_exception() -> None:
    line = JsonFormatter().format(record(request_id="abc123", exc=True))
    assert "\n" not in line  # one object, one line, even with a traceback
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "hub.test" and entry["message"] == "hello world"
    assert entry["request_id"] == "abc123"
    assert "ValueError: bad value" in entry["exception"] and entry["exception"].startswith("Traceback")
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]

    plain = json.loads(JsonFormatter().format(record(message='a "quoted"\nline', args=())))
    assert plain["message"] == 'a "quoted"\nline'
    assert "request_id" not in plain and "exception" not in plain


def test_text_lines_name_the_request_when_there_is_one() -> None:
    assert TextFormatter().format(record(request_id="abc123")).endswith(" INFO hub.test [abc123]: hello world")
    assert TextFormatter().format(record()).endswith(" INFO hub.test: hello world")


@pytest.mark.parametrize("value", ["abc123", "0f" * 16, "Root=1-5759e988-bd862e3fe1be46a994272793", "a.b_c:d/e+f-g",
                                   "x" * 128, b"abc123"])
def test_sane_request_ids_are_kept(value: str | bytes) -> None:
    assert clean_request_id(value) == (value.decode() if isinstance(value, bytes) else value)


@pytest.mark.parametrize("value", [None, "", "x" * 129, "x" * 1024, "abc\n123", "abc\r\nX-Evil: 1", "a b", "-abc",
                                   '{"json":1}', "é", b"\xff\xfe", "abc\x00"])
def test_insane_request_ids_are_refused(value: str | bytes | None) -> None:
    assert clean_request_id(value) is None


def app_with_ids() -> FastAPI:
    app = FastAPI()
    log = logging.getLogger("test.app")

    @app.get("/seen")
    async def seen() -> dict[str, str | None]:
        log.warning("serving")
        return {"request_id": request_id_var.get()}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Iterator[bytes]:
            for i in range(3):
                yield f"{request_id_var.get()}:{i}\n".encode()
        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.exception_handler(Exception)
    async def unexpected(request: object, exc: Exception) -> JSONResponse:
        log.error("unexpected error")
        return JSONResponse({"error": "internal"}, status_code=500)

    install_request_ids(app)
    return app


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.seen_id = request_id_var.get()
        self.records.append(record)


async def test_every_call_gets_an_id_in_its_answer_and_its_log_lines() -> None:
    collect = Collect()
    logging.getLogger("test.app").addHandler(collect)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_with_ids(), raise_app_exceptions=False),
                                     base_url="http://t") as client:
            kept = await client.get("/seen", headers={"X-Request-ID": "abc123"})
            assert kept.headers["X-Request-ID"] == "abc123" and kept.json() == {"request_id": "abc123"}

            fresh = []
            for junk in ("x" * 1024, "a b c"):
                replaced = await client.get("/seen", headers={"X-Request-ID": junk})
                fresh.append(replaced.headers["X-Request-ID"])
                assert fresh[-1] != junk and clean_request_id(fresh[-1]) == fresh[-1]
                assert replaced.json()["request_id"] == fresh[-1]

            generated = (await client.get("/seen")).headers["X-Request-ID"]
            again = (await client.get("/seen")).headers["X-Request-ID"]
            assert generated != again and len(generated) == 32

            streamed = await client.get("/stream", headers={"X-Request-ID": "s1"})
            assert streamed.headers["X-Request-ID"] == "s1" and streamed.text == "s1:0\ns1:1\ns1:2\n"

            # The unexpected error's line and its 500 carry the id too (outside Starlette's error middleware).
            failed = await client.get("/boom", headers={"X-Request-ID": "boom1"})
            assert failed.status_code == 500 and failed.headers["X-Request-ID"] == "boom1"
    finally:
        logging.getLogger("test.app").removeHandler(collect)
    assert [r.seen_id for r in collect.records] == ["abc123", *fresh, generated, again, "boom1"]
    # Nothing leaks out of a call into the code around it.
    assert request_id_var.get() is None


async def test_the_controller_client_sends_the_id_it_runs_under() -> None:
    seen: list[httpx.Headers] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json={"containers": []})

    client = ControllerClient(HubSettings(api_key=KEY), transport=httpx.MockTransport(answer))
    try:
        await client.list_containers("c1", "http://c1")

        async def background() -> None:
            bind_request_id("op-42")
            await client.list_containers("c1", "http://c1")

        await asyncio.create_task(background())
    finally:
        await client.aclose()
    assert "x-request-id" not in seen[0]
    assert seen[1]["x-request-id"] == "op-42"
    # Bound in its own task: the caller's context is untouched.
    assert request_id_var.get() is None


def test_hub_and_controller_read_the_same_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMANAGER_LOG_LEVEL", "warning")
    monkeypatch.setenv("LOG_FILE", str(tmp_path / "mm.log"))
    monkeypatch.setenv("MMANAGER_LOG_FORMAT", "JSON")
    hub = HubSettings(api_key=KEY)
    controller = ControllerSettings(MMANAGER_API_KEY=KEY)
    for settings in (hub, controller):
        assert (settings.log_level, settings.log_file, settings.log_format) == ("WARNING", tmp_path / "mm.log", "json")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")  # the SPEC's name wins over the alias
    assert HubSettings(api_key=KEY).log_level == "DEBUG"
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="unknown log level"):
        LogSettings()


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = handlers, level


def test_setup_appends_to_the_file_and_refuses_one_it_cannot_open(tmp_path: Path, restore_root_logging: None) -> None:
    path = tmp_path / "logs" / "hub.log"
    path.parent.mkdir()
    path.write_text('{"earlier": true}\n')
    setup_logging(LogSettings(LOG_FILE=str(path), LOG_FORMAT="json", LOG_LEVEL="WARNING"))
    token = request_id_var.set("r1")
    try:
        logging.getLogger("uvicorn.error").warning("kept")
        logging.getLogger("uvicorn.error").info("dropped")
    finally:
        request_id_var.reset(token)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    assert [(e["logger"], e["message"], e["request_id"]) for e in lines[1:]] == [("uvicorn.error", "kept", "r1")]

    (tmp_path / "file").write_text("")
    with pytest.raises(LogFileError, match="LOG_FILE .*file/mm.log.* cannot be opened"):
        setup_logging(LogSettings(LOG_FILE=str(tmp_path / "file" / "mm.log")))


async def test_routine_access_lines_are_dropped_above_debug(tmp_path: Path, restore_root_logging: None) -> None:
    path = tmp_path / "access.log"

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        # The status each call asks for, as the application would answer it.
        status = int(scope["query_string"].decode().rpartition("=")[2] or 200)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = RequestIdMiddleware(answer)
    for level in ("INFO", "DEBUG"):
        setup_logging(LogSettings(LOG_FILE=str(path), LOG_FORMAT="json", LOG_LEVEL=level))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for method, target, status in (
                    ("GET", "/health", 200), ("GET", "/metrics", 200), ("POST", "/api/controllers/c1/heartbeat", 200),
                    ("POST", "/api/controllers/c1/heartbeat", 401), ("GET", "/api/services", 200),
                    ("GET", "/api/services/s1", 200), ("GET", "/api/services/s1", 404),
                    ("DELETE", "/api/services/s1", 204)):
                answered = await client.request(method, target, params={"status": status})
                assert answered.status_code == status
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries = [e for e in entries if e["logger"] != "httpx"]  # this client's own lines, at DEBUG
    lines = [e["message"] for e in entries]
    # At INFO: the refused heartbeat, the list, the status read that failed and the delete; at DEBUG: all eight.
    assert len(lines) == 4 + 8, lines
    assert {e["logger"] for e in entries} == {"mmanager.access"} and all(e.get("request_id") for e in entries)
    assert lines[0] == '127.0.0.1:123 - "POST /api/controllers/c1/heartbeat?status=401 HTTP/1.1" 401'
    assert '"GET /api/services?status=200 HTTP' in lines[1]
    assert '/api/services/s1?status=404 HTTP/1.1" 404' in lines[2] and '"DELETE /api/services/s1' in lines[3]
    # uvicorn's own access line is off: the middleware's is the only one.
    assert not logging.getLogger("uvicorn.access").hasHandlers()
