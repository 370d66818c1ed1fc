"""``Database.transaction()`` on real PostgreSQL (straight through asyncpg): all of a transaction or
none of it, whatever ends it (an error in its body, a statement the database refuses, a cancel), and
the pool's connections fit for the next one afterwards."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import func, select

from hub.db import Database, insert_row
from hub.metrics import HubMetrics
from hub.models import OperationModel
from hub.services.operations import OperationLog


async def stored(db: Database) -> set[str]:
    async with db.session() as session:
        return set(await session.scalars(select(OperationModel.id)))


async def test_a_transaction_is_written_whole_or_not_at_all(db: Database) -> None:
    ops = OperationLog(db, HubMetrics())
    kept = ops.new("create", "alice", details={"epoch": 1})
    async with db.transaction() as tx:
        await insert_row(tx, kept)
    assert await stored(db) == {kept.id}

    # An error in the body: nothing of it stays.
    dropped = ops.new("create", "alice")
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await insert_row(tx, dropped)
            raise RuntimeError("changed my mind")
    # A statement the database refuses (a duplicate key) rolls back what came before it too.
    before = ops.new("stop", "alice")
    with pytest.raises(asyncpg.UniqueViolationError):
        async with db.transaction() as tx:
            await insert_row(tx, before)
            await insert_row(tx, kept)
    # Cancelled while it waits inside: nothing committed.
    inside = asyncio.Event()
    cancelled = ops.new("start", "alice")

    async def slow() -> None:
        async with db.transaction() as tx:
            await insert_row(tx, cancelled)
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(slow())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await stored(db) == {kept.id}

    # Every pooled connection is still fit: more transactions at once than the failures above touched.
    more = [ops.new("restart", "bob") for _ in range(8)]

    async def write(op: OperationModel) -> None:
        async with db.transaction() as tx:
            await insert_row(tx, op)
            assert await tx.first(select(func.count()).select_from(OperationModel), {}) is not None

    await asyncio.gather(*(write(op) for op in more))
    assert await stored(db) == {kept.id} | {op.id for op in more}
    async with db.session() as session:
        [row] = await session.scalars(select(OperationModel).where(OperationModel.id == kept.id))
    assert (row.details, row.status, row.created_at.tzinfo is not None) == ({"epoch": 1}, "running", True)
