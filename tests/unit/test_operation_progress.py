"""A running operation's progress (``OperationLog.progress``, ``advance``, ``pulling``): writers running side
by side keep each other's keys, ``done`` never goes back, a pull shows in ``progress`` only for an operation
that counts no steps, and an ended operation leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from hub.metrics import HubMetrics
from hub.services.operations import OperationLog


class Table:
    """A database that takes every statement, letting other tasks run inside each: the details written."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    async def execute(self, _statement: object, params: Mapping[str, Any]) -> int:
        await asyncio.sleep(0)
        if "details" in params:
            self.written.append(params["details"])
        return 1

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Table]:
        await asyncio.sleep(0)
        yield self


PULL = {"image": "img", "status": "pulling", "bytes_done": 10, "bytes_total": 100, "layers_done": 0,
        "layers_total": 2}


async def test_replicas_made_side_by_side_keep_the_pull_and_never_count_back() -> None:
    table = Table()
    ops = OperationLog(table, HubMetrics())  # type: ignore[arg-type]
    op = ops.new("create", "alice", details={"replicas": 3})
    async with ops.running(op):
        ops.expect_steps(op)
        await ops.pulling(op, "a", PULL, "pulling img on a")
        assert table.written[-1] == {"replicas": 3, "image_pull": {**PULL, "controller_id": "a"}}
        # Two controllers' coroutines report at once, the later count first.
        await asyncio.gather(ops.advance(op, 2, 3, "replicas", "replica 2 of 3 made"),
                             ops.advance(op, 1, 3, "replicas", "replica 1 of 3 made"))
        assert [w["progress"]["done"] for w in table.written[1:]] == [2]
        await ops.pulling(op, "b", {**PULL, "bytes_done": 50}, "pulling img on b")
        last = table.written[-1]
        assert last["progress"] == {"done": 2, "total": 3, "unit": "replicas", "step": "replica 2 of 3 made"}
        assert [p["controller_id"] for p in last["image_pull"]] == ["a", "b"]
        assert last["replicas"] == 3
        await ops.finish(op)
    assert ops._shown == {}


async def test_a_single_copys_pull_shows_in_bytes_until_it_counts_steps() -> None:
    table = Table()
    ops = OperationLog(table, HubMetrics())  # type: ignore[arg-type]
    op = ops.new("create", "alice")
    async with ops.running(op):
        await ops.pulling(op, "a", PULL, "pulling img on a")
        assert table.written[-1]["progress"] == {"done": 10, "total": 100, "unit": "bytes",
                                                 "step": "pulling img on a"}
        await ops.progress(op, note="x")
        assert table.written[-1]["image_pull"]["bytes_done"] == 10 and table.written[-1]["note"] == "x"
        await ops.advance(op, 1, 1, "replicas", "1 replica running")
        await ops.pulling(op, "a", {**PULL, "bytes_done": 90}, "pulling img on a")
        assert table.written[-1]["progress"]["unit"] == "replicas"
        assert table.written[-1]["image_pull"]["bytes_done"] == 90
        await ops.finish(op)
    # A write that lands after the end keeps nothing for it.
    await ops.progress(op, late=True)
    assert ops._shown == {}
