"""The status read (a ``HotRoute``, hub.routers.hot) on real PostgreSQL: a token remembered or one read from
the database, a rendering reused or made again, the answer is the same, byte for byte; refusals, bodies,
other methods, the rate limit and a database that went away are answered and audited as for any route."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

from examples.images import EXAMPLE_IMAGE
from hub.app import create_app
from hub.ratelimit import RateLimiter
from tests.hub.conftest import Cluster

SPEC = {"name": "polled", "image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"memory_limit": "32MB"}}


def client_of(cluster: Cluster) -> httpx.AsyncClient:
    """A client of the hub's application (the parts the cluster runs), in this process."""
    app = create_app(cluster.parts.settings, hub=cluster.parts)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub", timeout=60)


async def alices_service_and_bob(cluster: Cluster) -> tuple[dict[str, str], dict[str, str], str]:
    """Alice's and Bob's headers (both tokens known to the hub) and the id of a service of Alice's."""
    alice = await cluster.user("alice")
    bob = await cluster.user("bob")
    sid = (await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)).json()["id"]
    await cluster.hub.get("/api/services", headers=bob)  # bob's token is known to the hub now
    return alice, bob, sid


async def test_a_status_read_answers_the_same_bytes_however_its_token_and_rendering_were_found(
        cluster: Cluster) -> None:
    alice = await cluster.user("alice")
    created = await cluster.hub.post("/api/alice/lab/services", json=SPEC, headers=alice)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    async with client_of(cluster) as client:
        # The first read: its token read from the database (none is remembered), then one whose token and
        # rendering are remembered.
        users = cluster.parts.users
        ttl, users.ttl = users.ttl, 0
        try:
            first = await client.get(f"/api/services/{sid}", headers=alice)
        finally:
            users.ttl = ttl
        await client.get(f"/api/services/{sid}", headers=alice)
        fast = await client.get(f"/api/services/{sid}", headers=alice)
        assert fast.status_code == first.status_code == 200
        assert fast.content == first.content
        assert fast.headers["content-type"] == first.headers["content-type"] == "application/json"
        assert fast.headers["content-length"] == first.headers["content-length"]
        # The service rendered from scratch (``read``, the model) is the same bytes too.
        who = await users.identity(alice["Authorization"].removeprefix("Bearer "))
        assert (await cluster.parts.services.read(who, sid)).model_dump_json().encode() == fast.content
        body = fast.json()
        assert body["id"] == sid and body["owner"] == "alice" and body["status"] == "running"
        assert body["spec"]["image"] == EXAMPLE_IMAGE and body["url"].startswith("http://")
        # The list (the ORM's rows) says the same of it.
        listed = (await cluster.hub.get("/api/services", headers=alice)).json()
        assert [s for s in listed if s["id"] == sid] == [body]
        # An admin sees it too: the first time with a token this replica has not accepted yet, then again.
        admin = cluster.as_user(cluster.admin_token)
        assert (await client.get(f"/api/services/{sid}", headers=admin)).json() == body
        assert (await client.get(f"/api/services/{sid}", headers=admin)).json() == body


async def test_a_read_shows_each_change_of_the_service_however_it_was_made(cluster: Cluster) -> None:
    """A read renders a service's answer again only when its row changed (``Rendered``): a change made
    behind the hub's back, straight in the database, shows on the next read, and another user still
    cannot see a service whose answer was rendered for its owner."""
    alice, bob, sid = await alices_service_and_bob(cluster)
    async with client_of(cluster) as client:
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
        refused = await client.get(f"/api/services/{sid}", headers=bob)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "SERVICE_NOT_FOUND"


async def test_refusals_bodies_and_other_routes_are_answered_and_audited(cluster: Cluster) -> None:
    alice, bob, sid = await alices_service_and_bob(cluster)
    async with client_of(cluster) as client:
        cases = [
            ("GET", f"/api/services/{sid}", {}, None, 401, "UNAUTHORIZED"),
            ("GET", f"/api/services/{sid}", {"Authorization": "Bearer not-a-token"}, None, 401, "UNAUTHORIZED"),
            ("GET", f"/api/services/{sid}", bob, None, 404, "SERVICE_NOT_FOUND"),  # another user's
            ("GET", "/api/services/no-such-service", alice, None, 404, "SERVICE_NOT_FOUND"),
            ("GET", "/api/services/a%00b", alice, None, 422, "INVALID_VALUE"),  # PostgreSQL refuses NUL in text
            ("GET", f"/api/services/{sid}", alice, b"x" * (2 << 20), 413, "PAYLOAD_TOO_LARGE"),
            ("PATCH", f"/api/services/{sid}", alice, b'{"no_such_field": 1}', 422, "VALIDATION_ERROR"),
            ("GET", f"/api/services/{sid}/history", alice, None, 200, None),
            # Two Authorization headers: the first counts, as ``Request.headers`` reads them.
            ("GET", f"/api/services/{sid}", [("Authorization", "Basic eDp5"), ("Authorization", alice["Authorization"])],
             None, 401, "UNAUTHORIZED"),
            ("GET", f"/api/services/{sid}", [("Authorization", bob["Authorization"]),
                                              ("Authorization", alice["Authorization"])], None, 404,
             "SERVICE_NOT_FOUND"),
        ]
        for method, path, headers, body, status, code in cases:
            r = await client.request(method, path, headers=headers, content=body)
            assert r.status_code == status, (method, path, unquote(path), r.text)
            if code is not None:
                assert r.json()["error"]["code"] == code
    # The refusals are audited, as ever (bob's two 404s, named as bob).
    rows = (await cluster.hub.get("/api/admin/audit", params={"actor": "bob"})).json()
    assert [(r["method"], r["path"], r["status_code"]) for r in rows] == [("GET", f"/api/services/{sid}", 404)] * 2


async def test_a_caller_over_the_rate_limit_is_refused_before_anything_is_read(cluster: Cluster) -> None:
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

    services.read, services.read_json = counted, counted_json
    cluster.parts.limiter = RateLimiter(rate=0.01, burst=3)
    try:
        async with client_of(cluster) as client:
            paths = [f"/api/services/{sid}", f"/api/services/{sid}", "/api/services/missing"]
            codes = [(await client.get(path, headers=alice)).status_code for path in paths]
            assert codes == [200, 200, 404]
            # A refused read (a missing service) costs one token, as any call.
            assert (await client.get(f"/api/services/{sid}", headers=alice)).status_code == 429
            # The refused call read nothing.
            assert reads == [sid, sid, "missing"]
            r = await client.get(f"/api/services/{sid}", headers=alice)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "RATE_LIMITED"
            assert len(reads) == 3
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
    # The read finds its connection gone and reads once more; the pool replaces its connections.
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


async def test_the_status_read_refuses_as_an_ordinary_route_and_is_documented(cluster: Cluster) -> None:
    """The same refusal from the hot route and from a route FastAPI runs: the same status, envelope and
    headers (but the request id); and the OpenAPI document describes both hot routes."""
    alice, bob, sid = await alices_service_and_bob(cluster)
    async with client_of(cluster) as client:
        pairs = [
            ({}, f"/api/services/{sid}", "/api/services", 401),  # no token
            (bob, f"/api/services/{sid}", f"/api/services/{sid}/history", 404),  # another user's service
        ]
        for headers, hot, ordinary, status in pairs:
            fast = await client.get(hot, headers=headers)
            slow = await client.get(ordinary, headers=headers)
            assert fast.status_code == slow.status_code == status, (hot, fast.text, slow.text)
            assert fast.content == slow.content
            assert {k: v for k, v in fast.headers.items() if k != "x-request-id"} == \
                   {k: v for k, v in slow.headers.items() if k != "x-request-id"}
            assert fast.headers["x-request-id"] and slow.headers["x-request-id"]
        # Another method on the hot path: the router's 405, as for any route.
        wrong = await client.put(f"/api/services/{sid}", headers=alice)
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "METHOD_NOT_ALLOWED")
        paths = (await client.get("/openapi.json")).json()["paths"]
    read = paths["/api/services/{service_id}"]["get"]
    assert read["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ServiceOut"}
    beat = paths["/api/controllers/{controller_id}/heartbeat"]["post"]
    assert beat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Heartbeat"}
    assert beat["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/HeartbeatAnswer"}
