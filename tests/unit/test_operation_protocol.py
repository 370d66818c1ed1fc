"""The operations' one protocol (``OperationLog.running``): an operation is active from the call on, ended
as failed with the error that escaped its body unless its end was already committed, and an end written
inside a transaction that did not commit is no end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from hub.errors import Conflict
from hub.metrics import HubMetrics
from hub.services.operations import OperationLog


class Written:
    """A database that takes every statement: what each operation's end wrote."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str | None]] = []

    async def execute(self, _statement: object, params: Mapping[str, Any]) -> int:
        self.ends.append((params["status"], params["error"]))
        return 1


def log_on(db: Written) -> OperationLog:
    return OperationLog(db, HubMetrics())


async def test_an_error_that_escapes_the_body_ends_the_operation_once() -> None:
    db = Written()
    ops = log_on(db)
    op = ops.new("restart", "alice")
    running = ops.running(op)
    assert op.id in ops.active  # from the call on, before its body runs
    with pytest.raises(Conflict):
        async with running:
            raise Conflict("service has no container", code="NO_CONTAINER")
    assert db.ends == [("failed", "NO_CONTAINER: service has no container")]
    assert op.id not in ops.active

    other = ops.new("stop", "alice")
    with pytest.raises(RuntimeError):
        async with ops.running(other):
            raise RuntimeError("boom")
    assert db.ends[-1] == ("failed", "INTERNAL_ERROR: RuntimeError: boom") and other.status == "failed"


async def test_an_operation_ended_in_its_body_keeps_its_end() -> None:
    db = Written()
    ops = log_on(db)
    op = ops.new("start", "alice")
    with pytest.raises(Conflict):
        async with ops.running(op):
            await ops.finish(op, "SUPERSEDED: another operation completed this service first")
            raise Conflict("another operation completed this service first", code="CONCURRENT_CHANGE")
    assert db.ends == [("failed", "SUPERSEDED: another operation completed this service first")]
    ok = ops.new("start", "alice")
    async with ops.running(ok):
        await ops.finish(ok)
    assert db.ends[-1] == ("succeeded", None) and not ops.active


async def test_an_end_whose_transaction_did_not_commit_is_no_end() -> None:
    db = Written()
    ops = log_on(db)
    op = ops.new("create", "alice")
    with pytest.raises(ConnectionResetError):
        async with ops.running(op):
            await ops.finish_in(db, op, controller_id="c1")
            raise ConnectionResetError("the commit failed")
    assert db.ends == [("succeeded", None), ("failed", "INTERNAL_ERROR: ConnectionResetError: the commit failed")]
    assert op.status == "failed" and op.controller_id == "c1" and not ops.active

    committed = ops.new("create", "alice")
    async with ops.running(committed):
        await ops.finish_in(db, committed)
        ops.finished(committed)
    assert committed.status == "succeeded" and not ops.active
