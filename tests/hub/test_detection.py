"""Failure detection counts silence from when this hub heard a controller, not from when it got round to
writing that down: a hub behind on recording beats (a mass failover taking its CPU, a slow database) must
not declare the controllers that sent them lost, which would move their services for nothing. And beats
never wait for a database connection behind the moves: they have a pool of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from hub.background.reconciler import Reconciler
from hub.db import Database
from hub.models import ControllerModel, utcnow
from tests.hub.conftest import KEY
from tests.hub.test_controller_keys import CONTROLLERS, KeyHub, key_hub
from tests.hub.test_failure_handling import heartbeat

GRACE = 1.5


@pytest.fixture
async def hub(db: Database) -> AsyncIterator[KeyHub]:
    """Nothing writes beats here but an explicit flush (no loops run)."""
    async with key_hub(db, heartbeat_interval=0.5, heartbeat_grace=GRACE) as found:
        yield found


async def statuses(hub: KeyHub) -> dict[str, str]:
    async with hub.db.session() as session:
        return {cid: (await session.get(ControllerModel, cid)).status for cid in CONTROLLERS}


async def test_a_beat_heard_but_not_yet_written_keeps_its_controller(hub: KeyHub) -> None:
    for cid in CONTROLLERS:
        assert (await hub.beat(cid, KEY)).status_code == 200
    await hub.parts.ingest.flush()
    assert set((await statuses(hub)).values()) == {"healthy"}
    parts = hub.parts
    reconciler = Reconciler(parts.db, parts.settings, parts.services, parts.metrics, parts.replica_id,
                            utcnow() - timedelta(hours=1), ingest=parts.ingest)
    # ctl-x keeps beating; nothing writes its beats down (no flush) while the others fall silent.
    for _ in range(4):
        await asyncio.sleep(GRACE / 2)
        assert (await hub.beat("ctl-x", KEY)).status_code == 200
    async with hub.db.session() as session:
        written = (await session.get(ControllerModel, "ctl-x")).last_heartbeat_at
    assert utcnow() - written > timedelta(seconds=GRACE)  # the table alone would call it lost
    await reconciler.run_once()
    assert await statuses(hub) == {"ctl-x": "healthy", "ctl-y": "unhealthy", "ctl-z": "unhealthy"}
    # Its beats written at last, it is as healthy in the table as it was to the hub.
    await hub.parts.ingest.flush()
    async with hub.db.session() as session:
        assert utcnow() - (await session.get(ControllerModel, "ctl-x")).last_heartbeat_at < timedelta(seconds=GRACE)


async def test_a_controller_that_says_it_is_unhealthy_is_not_heard(hub: KeyHub) -> None:
    for cid in CONTROLLERS:
        assert (await hub.beat(cid, KEY)).status_code == 200
    await hub.parts.ingest.flush()
    parts = hub.parts
    reconciler = Reconciler(parts.db, parts.settings, parts.services, parts.metrics, parts.replica_id,
                            utcnow() - timedelta(hours=1), ingest=parts.ingest)
    sick = heartbeat("ctl-x", [])
    sick["health"]["status"] = "unhealthy"
    for _ in range(4):
        await asyncio.sleep(GRACE / 2)
        for cid in CONTROLLERS:
            body = sick if cid == "ctl-x" else heartbeat(cid, [])
            assert (await hub.beat(cid, KEY, body)).status_code == 200
    await reconciler.run_once()
    assert await statuses(hub) == {"ctl-x": "unhealthy", "ctl-y": "healthy", "ctl-z": "healthy"}


async def test_beats_are_answered_while_the_main_pool_is_taken(hub: KeyHub) -> None:
    """A mass failover's moves can hold every connection of the main pool; the heartbeats have their own."""
    assert (await hub.beat("ctl-x", KEY)).status_code == 200  # the key is remembered
    engine = hub.parts.db.engine
    held = []
    try:
        for _ in range(engine.pool.size() + engine.pool._max_overflow):
            held.append(await engine.connect())
        # Answered within 5 s: not after the main pool's 10 s timeout.
        answered = await asyncio.wait_for(hub.beat("ctl-x", KEY), 5)
        assert answered.status_code == 200, answered.text
        await hub.parts.ingest.flush()
        async with hub.parts.ingest.db.session() as session:
            seen = (await session.get(ControllerModel, "ctl-x")).last_heartbeat_at
        assert utcnow() - seen < timedelta(seconds=5)
    finally:
        for conn in held:
            await conn.close()
