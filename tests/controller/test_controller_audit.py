"""The controller's audit trail and body limit: changes and refusals are logged
(one JSON line each, nothing secret) and queued for the hub, the queue is bounded
and emptied only by an acknowledged heartbeat, and oversized bodies answer 413
and create nothing. The real Docker engine where containers are involved; the
in-memory runtime and a fake hub for the heartbeat hand-over."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import docker
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.audit import AuditTrail
from examples.images import EXAMPLE_IMAGE
from mmanager.audit import AuditMiddleware, Coalescer
from mmanager.wire import AuditEvent, Heartbeat
from tests.controller.conftest import KEY, Ctl, StartController
from tests.controller.test_controller_heartbeat import HUB, FakeHub
from tests.support.poll import eventually

SECRET = "s3cret-env-value-0042"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "mmanager.audit" and r.levelno == logging.INFO]


async def test_changes_and_refusals_are_logged_and_queued(
    start_controller: StartController, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mmanager.audit")
    ctl = await start_controller()
    created = await ctl.create(EXAMPLE_IMAGE, environment={"TOKEN": SECRET})
    assert created.status_code == 201, created.text
    cid = created.json()["container_id"]
    hostile = await ctl.create(EXAMPLE_IMAGE, labels={"mmanager.controller": "someone-else"})
    assert 400 <= hostile.status_code < 500, hostile.text
    assert (await ctl.client.get("/containers/")).status_code == 200
    assert (await ctl.client.post(f"/containers/{cid}/stop", params={"timeout": 0})).status_code == 200
    assert (await ctl.client.delete(f"/containers/{cid}/")).status_code == 200
    assert (await ctl.client.delete("/containers/abc", headers={"Authorization": "Bearer wrong"})).status_code == 401

    expected = [
        ("hub", "POST", "/containers", cid, 201, "ok", None),
        ("hub", "POST", "/containers", None, hostile.status_code, "refused", hostile.json()["error"]["code"]),
        ("hub", "POST", f"/containers/{cid}/stop", cid, 200, "ok", None),
        ("hub", "DELETE", f"/containers/{cid}", cid, 200, "ok", None),
        ("anonymous", "DELETE", "/containers/abc", "abc", 401, "refused", "UNAUTHORIZED"),
    ]
    lines = audit_lines(caplog)
    assert [(e["actor"], e["method"], e["path"], e["target"], e["status_code"], e["result"], e["error_code"])
            for e in lines] == expected
    assert all(e["source"] == f"controller:{ctl.server_id}" for e in lines)

    queued = await ctl.client.get("/audit")
    assert queued.status_code == 200
    body = queued.json()
    assert (body["queued"], body["dropped"]) == (5, 0)
    assert [(e["method"], e["path"], e["status_code"]) for e in body["events"]] == [(x[1], x[2], x[4])
                                                                                  for x in expected]
    assert (await ctl.client.get("/audit", headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert SECRET not in caplog.text and KEY not in caplog.text and SECRET not in queued.text


async def test_oversized_bodies_answer_413_and_create_nothing(
    start_controller: StartController, docker_client: docker.DockerClient
) -> None:
    ctl = await start_controller(max_request_bytes=64 * 1024)
    big = await ctl.create(EXAMPLE_IMAGE, environment={"BLOB": "x" * 2**21})
    assert big.status_code == 413, big.text
    assert big.json()["error"] == {"code": "PAYLOAD_TOO_LARGE", "message": big.json()["error"]["message"],
                                   "details": {"limit_bytes": 65536}}

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"image": "' + EXAMPLE_IMAGE.encode() + b'", "environment": {"BLOB": "'
        for _ in range(8):
            yield b"y" * 16384
        yield b'"}}'

    chunked = await ctl.client.post("/containers/", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    # Under the limit, the same call works.
    small = await ctl.create(EXAMPLE_IMAGE, environment={"BLOB": "x" * 1024})
    assert small.status_code == 201, small.text
    labelled = docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={ctl.server_id}"})
    assert [c.id for c in labelled] == [small.json()["container_id"]]
    # An upload over the limit does not reach the container either.
    upload = await ctl.client.post(f"/containers/{small.json()['container_id']}/files", json={
        "container_path": "/tmp", "file_name": "big.bin", "content_base64": "QUFB" * 20000})
    assert upload.status_code == 413
    events = (await ctl.client.get("/audit")).json()["events"]
    assert [e["status_code"] for e in events if e["error_code"] == "PAYLOAD_TOO_LARGE"] == [413, 413, 413]


def agent_answered(ctl: Ctl) -> bool:
    return ctl.app.state.heartbeat.last_answer is not None


def event(n: int) -> AuditEvent:
    return AuditEvent(at=datetime.now(UTC), actor="hub", method="POST", path=f"/containers/{n}", status_code=201)


async def test_the_queue_is_bounded_and_counts_what_it_drops() -> None:
    trail = AuditTrail("c1", capacity=3)
    for n in range(5):
        await trail.record(event(n))
    assert (len(trail), trail.dropped) == (3, 2)
    shipped = trail.batch()
    assert [e.path for e in shipped] == ["/containers/2", "/containers/3", "/containers/4"]
    assert shipped[0].details == {"dropped_before": 2}
    # One more arrives while those are on the way; only what was shipped is acknowledged.
    await trail.record(event(5))
    trail.acknowledge(shipped)
    assert [e.path for e in trail.batch()] == ["/containers/5"] and trail.dropped == 3


async def test_events_leave_the_queue_only_once_the_hub_answered(start_fake: StartController) -> None:
    hub = FakeHub()
    ctl = await start_fake(hub_transport=hub.transport(), hub_url=HUB, controller_url="http://ctl.test:8001")
    # Answered once (the hub's short interval is in use), then failing.
    await eventually(lambda: agent_answered(ctl), what="a first answer")
    hub.mode = "error"
    assert (await ctl.client.get("/containers/nope", headers={"Authorization": "Bearer wrong"})).status_code == 401
    trail: AuditTrail = ctl.app.state.audit
    await eventually(lambda: hub.beats[-1].audit, what="the event shipped")
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 1, what="more failed heartbeats")
    # Every failed beat carried it again.
    assert len(trail) == 1 and [e.status_code for e in hub.beats[-1].audit] == [401]
    hub.mode = "ok"
    await eventually(lambda: len(trail) == 0, what="the queue emptied by an answered heartbeat")
    shipped = [e for beat in hub.beats for e in beat.audit]
    assert {(e.actor, e.path, e.error_code) for e in shipped} == {("anonymous", "/containers/nope", "UNAUTHORIZED")}
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 1, what="more heartbeats")
    assert hub.beats[-1].audit == []


async def test_a_hub_that_refuses_the_audit_events_does_not_cut_the_controller_off(
    start_fake: StartController, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub that answers 422 to any beat carrying a certain event (an older hub, a NUL it cannot store)."""
    hub = FakeHub()

    async def refuse_audit(request: httpx.Request) -> httpx.Response:
        if Heartbeat.model_validate_json(request.content).audit and hub.mode == "refuse":
            return httpx.Response(422, json={"error": {"code": "VALIDATION_ERROR", "message": "no"}})
        return await hub.handle(request)

    ctl = await start_fake(hub_transport=httpx.MockTransport(refuse_audit), hub_url=HUB,
                           controller_url="http://ctl.test:8001")
    await eventually(lambda: agent_answered(ctl), what="a first answer")
    hub.mode = "refuse"
    assert (await ctl.client.get("/containers/x", headers={"Authorization": "Bearer wrong"})).status_code == 401
    trail: AuditTrail = ctl.app.state.audit
    agent = ctl.app.state.heartbeat
    await eventually(lambda: len(trail) == 0, what="the refused events dropped")
    assert "the hub refused a heartbeat with 1 audit events" in caplog.text
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 2, what="more heartbeats")
    assert agent.failures == 0
    # Events the hub takes are shipped as before.
    hub.mode = "ok"
    assert (await ctl.client.get("/containers/y", headers={"Authorization": "Bearer wrong"})).status_code == 401
    await eventually(lambda: any(e.path == "/containers/y" for b in hub.beats for e in b.audit), what="shipped")


async def test_anonymous_refusals_are_coalesced_into_one_event_per_caller_and_window() -> None:
    recorded: list[AuditEvent] = []

    async def record(event: AuditEvent) -> None:
        recorded.append(event)

    async def refuse(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"code": "UNAUTHORIZED", "message": "no"}}, status_code=401)

    app = Starlette(routes=[Route("/things/{name}", refuse, methods=["GET", "DELETE"])])
    now = [0.1]
    app.add_middleware(AuditMiddleware, record=record,
                       coalescer=Coalescer(window=0.5, per_key=3, total=5, clock=lambda: now[0]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.1", 1)),
                                 base_url="http://c") as first, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("10.0.0.2", 1)), base_url="http://c") as second:
        for n in range(6):
            await first.get(f"/things/{n}")
        for n in range(4):
            await second.delete(f"/things/{n}")
        assert [(e.remote, e.path) for e in recorded] == [("10.0.0.1", f"/things/{n}") for n in range(3)] + [
            ("10.0.0.2", f"/things/{n}") for n in range(2)]
        # Once the window is over, one event per caller says how many were not recorded, calls or not.
        now[0] = 0.6
        await eventually(lambda: len(recorded) == 7, what="the summaries")
        summaries = {e.remote: e for e in recorded[5:]}
        assert summaries["10.0.0.1"].details["suppressed"] == 3 and summaries["10.0.0.1"].path == "/things/5"
        # The other caller was under its own bound: its last two went over the total of all callers.
        assert summaries[None].details == {**summaries[None].details, "suppressed": 2, "over": "total"}
        assert summaries[None].method == "DELETE" and summaries[None].status_code == 401
        # A new window: recorded again.
        now[0] = 1.1
        await first.get("/things/again")
        assert recorded[-1].path == "/things/again"
