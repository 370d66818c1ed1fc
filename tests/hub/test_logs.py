"""Logs through the hub cannot exhaust it: followed logs are capped per user, and a tail is cut to its newest bytes.

The hub and its controllers run in process, where a followed log answers only once the container
stops (httpx's in-process transport buffers whole responses): the streams run as tasks and the hub's
slots show which are open.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import select

from examples.images import EXAMPLE_IMAGE
from hub.models import UserModel
from tests.hub.conftest import Cluster
from tests.support.poll import eventually


async def service_of(cluster: Cluster, name: str, **spec: object) -> tuple[dict[str, str], str, int]:
    headers = await cluster.user(name)
    r = await cluster.hub.post(f"/api/{name}/repo/services", json={"name": "m", "image": EXAMPLE_IMAGE, **spec},
                               headers=headers)
    assert r.status_code == 201, r.text
    async with cluster.db.session() as session:
        user_id = await session.scalar(select(UserModel.id).where(UserModel.username == name))
    assert user_id is not None
    return headers, r.json()["id"], user_id


async def test_a_user_over_the_follow_cap_is_refused_while_another_user_still_follows(cluster: Cluster) -> None:
    slots = cluster.parts.services.log_streams
    cap = cluster.parts.settings.max_log_streams_per_user
    alice, alice_sid, alice_id = await service_of(cluster, "alice")
    bob, bob_sid, bob_id = await service_of(cluster, "bob")

    def follow(headers: dict[str, str], sid: str) -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(cluster.hub.get(f"/api/services/{sid}/logs", params={"follow": "true"},
                                                   headers=headers))

    alices = [follow(alice, alice_sid) for _ in range(cap)]
    await eventually(lambda: slots.open_for(alice_id) == cap, 10, "alice's streams to open", interval=0.02)

    refused = await cluster.hub.get(f"/api/services/{alice_sid}/logs", params={"follow": "true"}, headers=alice)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "TOO_MANY_LOG_STREAMS"
    assert int(refused.headers["retry-after"]) >= 1
    # Logs without follow hold nothing open and are still answered.
    assert (await cluster.hub.get(f"/api/services/{alice_sid}/logs", headers=alice)).status_code == 200

    bobs = follow(bob, bob_sid)
    await eventually(lambda: slots.open_for(bob_id) == 1, 10, "bob's stream let through", interval=0.02)
    assert not bobs.done()

    # Streams end with their containers, and give their slots back.
    assert (await cluster.hub.post(f"/api/services/{alice_sid}/stop", headers=alice)).status_code == 200
    for answer in await asyncio.wait_for(asyncio.gather(*alices), 20):
        assert answer.status_code == 200 and "listening on 5000" in answer.text
    assert slots.open_for(alice_id) == 0
    assert (await cluster.hub.post(f"/api/services/{bob_sid}/stop", headers=bob)).status_code == 200
    assert (await asyncio.wait_for(bobs, 20)).status_code == 200
    assert slots.open == 0


async def test_a_tail_through_the_hub_keeps_the_newest_bytes(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.parts.settings, "max_log_bytes", 2048)
    script = "for i in $(seq 1 1000); do echo line-$i-bbbbbbbbbbbbbbbbbbbbbbbb; done; exec sleep 600"
    alice, sid, _ = await service_of(cluster, "alice", command=["sh", "-c", script])
    async def whole() -> str | None:
        logs = (await cluster.hub.get(f"/api/services/{sid}/logs", params={"tail": 100_000}, headers=alice)).text
        return logs if "line-1000-" in logs else None

    logs = await eventually(whole, 10, "the last line in the tail", interval=0.05)
    assert len(logs.encode()) <= 2048
    assert logs.startswith("line-") and logs.endswith("line-1000-bbbbbbbbbbbbbbbbbbbbbbbb\n")
