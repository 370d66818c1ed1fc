"""The database's outages in the hub's log (hub.outage): what counts as the database away, and one WARNING
when an outage starts and one INFO when its probe gets an answer, however many failures come between."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, ProgrammingError

from hub.errors import Overloaded
from hub.outage import DatabaseOutage, database_away, database_failed
from tests.support.poll import eventually


def chained(outer: Exception, cause: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(("exc", "away"), [
    (ConnectionRefusedError(111, "Connect call failed"), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
    (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"), True),
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
    (asyncpg.exceptions.InternalClientError("another operation is in progress"), True),
    (DBAPIError("SELECT 1", {}, Exception("closed"), connection_invalidated=True), True),
    (chained(RuntimeError("wrapped"), ConnectionRefusedError(111, "refused")), True),
    (Overloaded("a heartbeat not recorded", retry_after=1, code="DATABASE_UNAVAILABLE"), True),
    # A statement the database refused, or a bug: a traceback's business, not an outage's.
    (ProgrammingError("SELEC 1", {}, Exception("syntax error")), False),
    (asyncpg.exceptions.UndefinedTableError("relation does not exist"), False),
    (Overloaded("too many waiting", retry_after=1), False),
    (ValueError("a bug"), False),
])
def test_what_counts_as_the_database_away(exc: Exception, away: bool) -> None:
    assert database_away(exc) is away
    if away and not isinstance(exc, Overloaded):
        assert database_failed(exc), "the API answers 503 for every outage"


class FakeDatabase:
    """``db.engine.connect()`` refused until ``up``."""

    def __init__(self) -> None:
        self.up = False
        self.engine = self

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        if not self.up:
            raise ConnectionRefusedError(111, "Connect call failed")

        class Conn:
            async def execute(self, _: object) -> None:
                return None

        yield Conn()


async def test_one_warning_when_it_starts_and_one_info_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    db = FakeDatabase()
    outage = DatabaseOutage(cast(Any, db), probe_interval=0.01)
    with caplog.at_level(logging.INFO, logger="hub.outage"):
        assert outage.failed("reconciler", ConnectionRefusedError(111, "refused"))
        for source in ("job-watcher", "heartbeats", "an API call"):
            assert outage.failed(source, asyncpg.exceptions.CannotConnectNowError("starting up"))
        assert not outage.failed("poller", ValueError("a bug")), "not the database: the caller logs it"
        assert outage.open
        db.up = True
        await eventually(lambda: not outage.open, 5, "the probe's answer")
        assert outage.failed("reconciler", ConnectionRefusedError(111, "refused")), "a second outage"
        await outage.close()
    said = [(r.levelname, r.getMessage().split(" (")[0].split(" after")[0]) for r in caplog.records]
    assert said == [("WARNING", "the database is unavailable"), ("INFO", "the database is available again"),
                    ("WARNING", "the database is unavailable")]
    assert "4 failed attempt(s)" in caplog.records[1].getMessage()
