"""The error base and handlers both sides share (mmanager.errors): one envelope, each side's answers."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from controller.errors import ControllerError, ImagePullFailed, TooManyLogStreams
from hub.errors import HubError, RateLimited
from mmanager.errors import AppError, envelope, install_error_handlers
from mmanager.wire import ErrorBody, ErrorEnvelope


@pytest.mark.parametrize("details", [None, {"retry_after": 3}, [{"loc": ["body", 0], "msg": "m", "type": "t"}],
                                     "text", 1.5, {"nested": {"list": [1, "two", None, True]}}])
def test_the_envelope_is_the_wire_model(details: Any) -> None:
    wire = ErrorEnvelope(error=ErrorBody(code="C", message="m", details=details)).model_dump(mode="json")
    assert envelope("C", "m", details) == wire


def test_both_sides_errors_share_the_base_and_keep_their_codes() -> None:
    assert issubclass(HubError, AppError) and issubclass(ControllerError, AppError)
    limited = RateLimited("slow down", 7)
    assert (limited.status_code, limited.code, limited.headers) == (429, "RATE_LIMITED", {"Retry-After": "7"})
    assert limited.response().body == b'{"error":{"code":"RATE_LIMITED","message":"slow down","details":{"retry_after":7}}}'
    assert TooManyLogStreams("full").response().headers["retry-after"] == "5"
    pulled = ImagePullFailed("no", {"image": "x"}).response()
    assert pulled.status_code == 502
    assert pulled.body == (b'{"status":"error","message":"no","error":{"code":"IMAGE_PULL_FAILED","message":"no",'
                           b'"details":{"image":"x"}}}')


class Body(BaseModel):
    name: str


def _app(**options: Any) -> FastAPI:
    app = FastAPI()

    @app.post("/things")
    async def create(body: Body) -> dict[str, str]:
        raise HubError("refused", {"name": body.name}, code="REFUSED", status_code=409)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    install_error_handlers(app, log=logging.getLogger("test"), internal_message="see the log",
                           http_codes={404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}, **options)
    return app


async def _call(app: FastAPI, method: str, path: str, content: bytes | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, content=content, headers={"content-type": "application/json"})


async def test_the_shared_handlers_answer_with_the_envelope() -> None:
    app = _app()
    refused = await _call(app, "POST", "/things", b'{"name": "x"}')
    assert (refused.status_code, refused.json()) == (409, envelope("REFUSED", "refused", {"name": "x"}))
    invalid = await _call(app, "POST", "/things", b"{}")
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "VALIDATION_ERROR"
    assert invalid.json()["error"]["message"] == "invalid request: body.name: Field required"
    # Without malformed_json, a body that is not JSON is one more invalid request (the controller's answer).
    assert (await _call(app, "POST", "/things", b"{nope")).status_code == 422
    wrong = await _call(app, "GET", "/things")
    assert (wrong.status_code, wrong.json()["error"]["code"], wrong.headers["allow"]) == (405, "METHOD_NOT_ALLOWED",
                                                                                         "POST")
    crashed = await _call(app, "GET", "/boom")
    assert (crashed.status_code, crashed.json()) == (500, envelope("INTERNAL_ERROR", "see the log"))


async def test_the_options_keep_the_hubs_answers() -> None:
    app = _app(http_headers=False, invalid_message=lambda _: "the request is invalid", malformed_json=True)
    malformed = await _call(app, "POST", "/things", b"{nope")
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (400, "MALFORMED_JSON")
    assert (await _call(app, "POST", "/things", b"{}")).json()["error"]["message"] == "the request is invalid"
    assert "allow" not in (await _call(app, "GET", "/things")).headers
