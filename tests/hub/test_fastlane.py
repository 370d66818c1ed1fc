"""The status read's fast lane (hub.fastlane) on real PostgreSQL: it answers what the application
would, byte for byte, and hands everything else (refusals, bodies, other methods, the rate limit, a
database that went away) to the application, which answers and audits it as before."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url
from starlette.types import Receive, Scope, Send

from examples.images import EXAMPLE_IMAGE
from hub.app import create_app
from hub.fastlane import FastLane
from hub.ratelimit import RateLimiter
from tests.hub.conftest import Cluster

SPEC = {"name": "polled", "image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"memory_limit": "32MB"}}


class Counting:
    """The application behind the lane, counting the calls that reach it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


def lane_over(cluster: Cluster) -> tuple[httpx.AsyncClient, Counting]:
    """A client through the lane in front of the hub's application (the parts the cluster runs)."""
    app = create_app(cluster.parts.settings, hub=cluster.parts)
    behind = Counting(app)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=FastLane(behind, cluster.parts)),
                               base_url="http://hub", timeout=60)
    return client, behind


async def alices_service_and_bob(cluster: Cluster) -> tuple[dict[str, str], dict[str, str], str]:
    """Alice's and Bob's headers (both tokens known to the hub) and the id of a service of Alice's."""
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    sid = (await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)).json()["id"]
    await cluster.hub.get("/api/services", headers=bob)  # bob's token is known to the hub now
    return alice, bob, sid


async def test_the_lane_answers_a_status_read_as_the_application_does(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    created = await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    client, behind = lane_over(cluster)
    async with client:
        # The route's own answer (the application's lane cannot answer while no token is remembered), then
        # the lane's.
        users = cluster.parts.users
        ttl, users.ttl = users.ttl, 0
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=behind.app), base_url="http://hub") as app:
                direct = await app.get(f"/api/services/{sid}", headers=alice)
        finally:
            users.ttl = ttl
        assert behind.calls == []
        fast = await client.get(f"/api/services/{sid}", headers=alice)
        assert behind.calls == []  # answered by the lane
        assert fast.status_code == direct.status_code == 200
        assert fast.content == direct.content
        assert fast.headers["content-type"] == direct.headers["content-type"] == "application/json"
        assert fast.headers["content-length"] == direct.headers["content-length"]
        body = fast.json()
        assert body["id"] == sid and body["owner"] == "alice" and body["status"] == "running"
        assert body["spec"]["image"] == EXAMPLE_IMAGE and body["url"].startswith("http://")
        # The list (the ORM's rows) says the same of it.
        listed = (await cluster.hub.get("/api/services", headers=alice)).json()
        assert [s for s in listed if s["id"] == sid] == [body]
        # An admin sees it too: the first time through the application (a token this replica has not
        # accepted yet), then through the lane.
        admin = cluster.as_user(cluster.admin_token)
        assert (await client.get(f"/api/services/{sid}", headers=admin)).json() == body
        assert behind.calls == [("GET", f"/api/services/{sid}")]
        assert (await client.get(f"/api/services/{sid}", headers=admin)).json() == body
        assert len(behind.calls) == 1


async def test_a_read_shows_each_change_of_the_service_however_it_was_made(cluster: Cluster) -> None:
    """The lane renders a service's answer again only when its row changed (``Rendered``): a change made
    behind the hub's back, straight in the database, shows on the next read, and another user still
    cannot see a service whose answer was rendered for its owner."""
    alice, bob, sid = await alices_service_and_bob(cluster)
    client, behind = lane_over(cluster)
    async with client:
        first = await client.get(f"/api/services/{sid}", headers=alice)
        assert first.status_code == 200 and first.json()["status_message"] != "changed in the database"
        assert (await client.get(f"/api/services/{sid}", headers=alice)).content == first.content
        async with cluster.db.session() as session, session.begin():
            await session.execute(text("UPDATE model_services SET status_message = 'changed in the database' "
                                       "WHERE id = :id"), {"id": sid})
        changed = await client.get(f"/api/services/{sid}", headers=alice)
        assert changed.json()["status_message"] == "changed in the database"
        assert {k: v for k, v in changed.json().items() if k != "status_message"} == \
            {k: v for k, v in first.json().items() if k != "status_message"}
        stopped = await cluster.hub.post(f"/api/services/{sid}/stop", headers=alice)
        assert stopped.status_code == 200, stopped.text
        after = await client.get(f"/api/services/{sid}", headers=alice)
        assert after.json()["status"] == "stopped" and after.json()["url"] is None
        assert behind.calls == []  # every read above was the lane's
        refused = await client.get(f"/api/services/{sid}", headers=bob)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "SERVICE_NOT_FOUND"
        assert behind.calls == [("GET", f"/api/services/{sid}")]


async def test_the_lane_hands_everything_else_to_the_application(cluster: Cluster) -> None:
    alice, bob, sid = await alices_service_and_bob(cluster)
    client, behind = lane_over(cluster)
    async with client:
        cases = [
            ("GET", f"/api/services/{sid}", {}, None, 401, "UNAUTHORIZED"),
            ("GET", f"/api/services/{sid}", {"Authorization": "Bearer not-a-token"}, None, 401, "UNAUTHORIZED"),
            ("GET", f"/api/services/{sid}", bob, None, 404, "SERVICE_NOT_FOUND"),  # another user's
            ("GET", "/api/services/no-such-service", alice, None, 404, "SERVICE_NOT_FOUND"),
            ("GET", "/api/services/a%00b", alice, None, 422, "INVALID_VALUE"),  # PostgreSQL refuses NUL in text
            ("GET", f"/api/services/{sid}", alice, b"x" * (2 << 20), 413, "PAYLOAD_TOO_LARGE"),
            ("PATCH", f"/api/services/{sid}", alice, b'{"no_such_field": 1}', 422, "VALIDATION_ERROR"),
            ("GET", f"/api/services/{sid}/history", alice, None, 200, None),
            # Two Authorization headers: the first counts, as in the application.
            ("GET", f"/api/services/{sid}", [("Authorization", "Basic eDp5"), ("Authorization", alice["Authorization"])],
             None, 401, "UNAUTHORIZED"),
            ("GET", f"/api/services/{sid}", [("Authorization", bob["Authorization"]),
                                              ("Authorization", alice["Authorization"])], None, 404,
             "SERVICE_NOT_FOUND"),
        ]
        for method, path, headers, body, status, code in cases:
            before = len(behind.calls)
            r = await client.request(method, path, headers=headers, content=body)
            assert r.status_code == status, (method, path, r.text)
            if code is not None:
                assert r.json()["error"]["code"] == code
            assert behind.calls[before:] == [(method, unquote(path))], (method, path)
    # The application audited the refusals it answered, as ever (bob's two 404s, named as bob).
    rows = (await cluster.hub.get("/api/admin/audit", params={"actor": "bob"})).json()
    assert [(r["method"], r["path"], r["status_code"]) for r in rows] == [("GET", f"/api/services/{sid}", 404)] * 2


async def test_a_caller_over_the_rate_limit_is_refused_by_the_application(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    sid = (await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)).json()["id"]
    services = cluster.parts.services
    reads: list[str] = []
    read, read_json = services.read, services.read_json

    async def counted(user: Any, service_id: str) -> Any:
        reads.append(service_id)
        return await read(user, service_id)

    async def counted_json(user: Any, service_id: str) -> Any:
        reads.append(service_id)
        return await read_json(user, service_id)

    services.read, services.read_json = counted, counted_json  # the application's and the lane's
    cluster.parts.limiter = RateLimiter(rate=0.01, burst=3)
    try:
        client, behind = lane_over(cluster)
        async with client:
            paths = [f"/api/services/{sid}", f"/api/services/{sid}", "/api/services/missing"]
            codes = [(await client.get(path, headers=alice)).status_code for path in paths]
            assert codes == [200, 200, 404]
            # A call the lane took a token for and handed on (a missing service) costs one token, not two.
            assert (await client.get(f"/api/services/{sid}", headers=alice)).status_code == 429
            # The two within the burst by the lane, the 404 and the refusal by the application; the refused
            # call read nothing.
            assert behind.calls == [("GET", "/api/services/missing"), ("GET", f"/api/services/{sid}")]
            assert reads == [sid, sid, "missing", "missing"]
            r = await client.get(f"/api/services/{sid}", headers=alice)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "RATE_LIMITED"
            assert len(reads) == 4
    finally:
        cluster.parts.limiter = None
        del services.read, services.read_json


async def test_status_reads_recover_at_once_when_the_database_cuts_every_connection(cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    sid = (await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)).json()["id"]
    for _ in range(5):
        assert (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).status_code == 200
    # What a restart of PostgreSQL does to the hub's pooled connections.
    url = make_url(cluster.db.url)
    admin = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
    try:
        cut = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()
    assert cut >= 1
    # The lane's read finds its connection gone and hands the call over; the pool replaces its connections.
    codes = [(await cluster.hub.get(f"/api/services/{sid}", headers=alice)).status_code for _ in range(5)]
    assert codes == [200] * 5
    assert (await cluster.hub.get(f"/api/services/{sid}", headers=alice)).json()["id"] == sid
    # And no more connections than the pool keeps: the dropped ones were closed, not left open.
    admin = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
    try:
        open_now = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()
    pool = cluster.parts.db.engine.pool
    assert open_now <= pool.size() + pool._max_overflow + 2  # (+ the fixture's own Database)
