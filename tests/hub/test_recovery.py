"""The loops of a quiet hub, on real PostgreSQL (statements straight through asyncpg) and on SQLite (the
same statements through SQLAlchemy Core, ``mmanager dev``'s database).

Operations nobody will finish are failed: a replica's own whose end was lost to a database outage
(``OperationLog.recover_own``, every replica every second), and those of replicas that stopped (the
leader's reconciler); a drain, the young, and what a live replica still runs are left alone. A replica's
row: written on its first beat, kept fresh on the next. And a whole reconciler tick: a silent controller
is marked lost, one that beats is not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hub.background.leader import Supervisor
from hub.background.reconciler import Reconciler
from hub.db import Database, insert_row
from hub.metrics import HubMetrics
from hub.migrate import upgrade
from hub.models import ControllerModel, HubReplicaModel, OperationModel, utcnow
from hub.services.operations import OperationLog
from tests.conftest import emptied
from tests.hub.test_controller_keys import key_hub


@pytest.fixture(params=["postgresql", "sqlite"])
async def db(request: pytest.FixtureRequest, pg_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgresql":
        database = await emptied(Database(pg_url))
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}"
        await asyncio.to_thread(upgrade, url)
        database = Database(url)
    yield database
    await database.dispose()


async def statuses(db: Database) -> dict[str, tuple[str, str | None]]:
    async with db.session() as session:
        return {op.id: (op.status, op.error) for op in await session.scalars(select(OperationModel))}


async def test_operations_nobody_will_finish_are_failed_and_no_others(db: Database) -> None:
    here = OperationLog(db, HubMetrics(), replica_id="here")
    old = utcnow() - timedelta(seconds=30)

    def op(operation: str, actor: str, created_at: datetime | None = None, **changes: Any) -> OperationModel:
        made = here.new(operation, actor)
        for key, value in {"created_at": created_at or made.created_at, **changes}.items():
            setattr(made, key, value)
        return made

    ops = {
        "lost_end": op("create", "alice", created_at=old),  # ours, not running here any more
        "still_running": op("create", "alice", created_at=old),
        "young": op("stop", "alice"),
        "our_drain": op("drain", "admin", created_at=old),
        "live_other": op("start", "bob", created_at=old, hub_replica="other"),
        "dead_other": op("start", "bob", created_at=old, hub_replica="gone"),
        "nobodys": op("delete", "bob", created_at=old, hub_replica=None),
        "dead_drain": op("drain", "admin", created_at=old, hub_replica="gone"),
        "done": op("create", "alice", created_at=old, status="succeeded", finished_at=old),
    }
    async with db.transaction() as tx:
        for op in ops.values():
            await insert_row(tx, op)
    here.active.add(ops["still_running"].id)
    names = {op.id: name for name, op in ops.items()}

    assert await here.recover_own() == 1
    failed = {names[i]: error for i, (status, error) in (await statuses(db)).items() if status == "failed"}
    assert list(failed) == ["lost_end"] and "database outage" in str(failed["lost_end"])

    async with key_hub(db) as hub:
        parts = hub.parts
        reconciler = Reconciler(parts.db, parts.settings, parts.services, parts.metrics, "here",
                                utcnow() - timedelta(hours=1), ingest=parts.ingest)
        await reconciler._recover_operations(utcnow(), {"here", "other"})
    now = await statuses(db)
    failed = {names[i]: error for i, (status, error) in now.items() if status == "failed"}
    assert set(failed) == {"lost_end", "dead_other", "nobodys"}
    assert "hub replica running it stopped" in str(failed["dead_other"])
    assert {names[i]: s for i, (s, _) in now.items() if names[i] not in failed} == {
        "still_running": "running", "young": "running", "our_drain": "running", "live_other": "running",
        "dead_drain": "running", "done": "succeeded"}


async def test_a_replica_writes_its_row_then_keeps_it_fresh(db: Database) -> None:
    async def nothing(*_: object) -> None:
        return None

    supervisor = Supervisor(db, "replica-1", 1.0, nothing, nothing)
    await supervisor._beat()
    async with db.session() as session:
        first = await session.get(HubReplicaModel, "replica-1")
    assert first is not None and not first.is_leader and utcnow() - first.last_seen_at < timedelta(seconds=5)
    await asyncio.sleep(0.05)
    supervisor.leading = True
    await supervisor._beat()
    async with db.session() as session:
        again = await session.get(HubReplicaModel, "replica-1")
    assert again is not None and again.is_leader and again.last_seen_at > first.last_seen_at
    assert again.started_at == first.started_at


async def test_a_tick_marks_a_silent_controller_lost_and_no_other(db: Database) -> None:
    async with key_hub(db, heartbeat_interval=0.5, heartbeat_grace=1.5) as hub:
        now = utcnow()
        async with db.session() as session:
            for cid, heard in (("silent", now - timedelta(seconds=30)), ("beating", now)):
                session.add(ControllerModel(id=cid, url=f"http://{cid}.test:8001", status="healthy",
                                            last_heartbeat_at=heard))
        parts = hub.parts
        reconciler = Reconciler(parts.db, parts.settings, parts.services, parts.metrics, parts.replica_id,
                                utcnow() - timedelta(hours=1), ingest=parts.ingest)
        await reconciler.run_once()
        assert reconciler._last_ok is not None  # the whole tick ran
        async with db.session() as session:
            found = {c.id: (c.status, c.error_message) for c in await session.scalars(
                select(ControllerModel).where(ControllerModel.id.in_(["silent", "beating"])))}
    assert found["beating"] == ("healthy", None)
    assert found["silent"][0] == "unhealthy" and "no heartbeat" in str(found["silent"][1])
