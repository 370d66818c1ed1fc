"""``Database.transaction()`` on real PostgreSQL (straight through asyncpg): all of a transaction or
none of it, whatever ends it (an error in its body, a statement the database refuses, a cancel), and
the pool's connections fit for the next one afterwards; and reads made together (``Gathered``)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Select, func, select

from hub.db import Database, any_of, insert_row
from hub.metrics import HubMetrics
from hub.models import OperationModel
from hub.services.lifecycle.reads import Gathered
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


async def test_a_statement_run_on_the_database_itself_is_committed_alone(db: Database) -> None:
    """``Database.execute``: each statement a transaction of its own, seen by every other connection once it
    returns; one the database refuses writes nothing and leaves the pool's connections fit; an operation
    ended there (``OperationLog.finish``) is ended in the table."""
    ops = OperationLog(db, HubMetrics())
    op = ops.new("create", "alice")
    await insert_row(db, op)
    assert await stored(db) == {op.id}
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_row(db, op)
    assert await stored(db) == {op.id}
    ended = await ops.finish(op, "it failed")
    assert ended.status == "failed"
    # Ended although its row was never written (its beginning rolled back): inserted as it ends.
    orphan = ops.new("stop", "bob")
    await ops.finish(orphan)
    async with db.session() as session:
        rows = {r.id: (r.status, r.error) for r in await session.scalars(select(OperationModel))}
    assert rows == {op.id: ("failed", "it failed"), orphan.id: ("succeeded", None)}
    await asyncio.gather(*(insert_row(db, ops.new("restart", "carol")) for _ in range(8)))
    assert len(await stored(db)) == 10


async def two_operations(db: Database) -> tuple[OperationModel, OperationModel, Select[Any]]:
    """Two operations stored, and the statement that reads operations by a list of ids (``keys``)."""
    ops = OperationLog(db, HubMetrics())
    first, second = ops.new("create", "alice"), ops.new("stop", "alice")
    async with db.transaction() as tx:
        await insert_row(tx, first)
        await insert_row(tx, second)
    table = OperationModel.__table__
    return first, second, select(table.c.id, table.c.status).where(any_of(table.c.id, "keys", sqlite=db.is_sqlite))


async def test_reads_made_together_share_a_statement_and_see_what_was_committed_before_them(db: Database) -> None:
    first, second, statement = await two_operations(db)
    table = OperationModel.__table__
    sent: list[list[str]] = []
    hold = asyncio.Event()
    hold.set()
    real_all = db.all

    async def counted(stmt: object, params: dict[str, list[str]]) -> object:
        sent.append(sorted(params["keys"]))
        rows = await real_all(stmt, params)
        await hold.wait()  # read already, answered late
        return rows

    db.all = counted
    reads = Gathered(db, statement, "id", in_flight=1)

    # Fifty reads at once, of two rows and one that does not exist: a statement or two, every answer right.
    keys = [first.id, second.id, "missing"] * 17
    rows = await asyncio.gather(*(reads.first(k) for k in keys[:50]))
    assert [(r["id"], r["status"]) if r else None for r in rows] == [
        (first.id, first.status) if k == first.id else (second.id, second.status) if k == second.id else None
        for k in keys[:50]]
    assert 1 <= len(sent) <= 2 and sorted(set(sum(sent, []))) == sorted({first.id, second.id, "missing"})

    # A read made while a statement is on its way waits for the next one: it sees what was committed before it.
    sent.clear()
    hold.clear()
    early = asyncio.create_task(reads.first(first.id))
    while not sent:
        await asyncio.sleep(0.01)
    async with db.transaction() as tx:
        await tx.execute(table.update().where(table.c.id == first.id).values(status="succeeded"), {})
    late = asyncio.create_task(reads.first(first.id))
    await asyncio.sleep(0.1)
    hold.set()
    assert first.status != "succeeded" and (await early)["status"] == first.status
    assert (await late)["status"] == "succeeded"
    assert len(sent) == 2

    # A statement that fails fails every read it carried, and the next read goes through.
    async def broken(stmt: object, params: object) -> object:
        raise asyncpg.PostgresConnectionError("gone")

    db.all = broken
    failed = await asyncio.gather(*(reads.first(k) for k in (first.id, second.id)), return_exceptions=True)
    assert all(isinstance(f, asyncpg.PostgresConnectionError) for f in failed)
    db.all = real_all
    assert (await reads.first(second.id))["status"] == second.status


async def test_a_read_made_as_the_last_statement_ends_is_sent_and_a_refused_key_fails_only_its_own(
        db: Database) -> None:
    first, second, statement = await two_operations(db)
    reads = Gathered(db, statement, "id", in_flight=1)

    async def one_then_another() -> tuple[object, object]:
        row = await reads.first(first.id)
        # Made as soon as its own read is answered, while the statement's sender is ending: it is sent too.
        return row, await reads.first(second.id)

    one, another = await asyncio.wait_for(one_then_another(), 5)
    assert (one["id"], another["id"]) == (first.id, second.id)

    # PostgreSQL refuses a NUL in a string: the statement of the three keys fails, the two good ones are
    # read again alone and answered; only the bad one's call fails.
    got = await asyncio.gather(reads.first(first.id), reads.first("bad\x00id"), reads.first(second.id),
                               return_exceptions=True)
    assert got[0]["id"] == first.id and got[2]["id"] == second.id
    assert isinstance(got[1], asyncpg.PostgresError)
