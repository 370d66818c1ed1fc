"""The database's outages in the hub's log (hub.outage): what counts as the database away, and one WARNING
when an outage starts and one INFO when its probe gets an answer, however many failures come between."""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import httpx
import pytest
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from hub.errors import Conflict, ControllerUnavailable, HubError, Overloaded
from hub.outage import DatabaseOutage, DatabaseUnreachable, database_away, database_failed
from tests.support.poll import eventually


def chained(outer: Exception, cause: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


def unreachable(cause: OSError) -> DatabaseUnreachable:
    """What hub.db's connect hook raises for a connection that could not be opened."""
    try:
        raise DatabaseUnreachable(f"{type(cause).__name__}: {cause}") from cause
    except DatabaseUnreachable as exc:
        return exc


def controller_refused() -> HubError:
    """As the controller client raises it: inside its retry's ``except``, ``from None``, the context chain
    below it holding httpx's ConnectError and the OS's ConnectionRefusedError."""
    try:
        try:
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except ConnectionRefusedError as refused:
                raise httpx.ConnectError("All connection attempts failed") from refused
        except httpx.ConnectError as exc:
            raise RuntimeError("retryable") from exc
    except RuntimeError:
        try:
            raise ControllerUnavailable("controller edge-1 is unreachable: ConnectError", {}) from None
        except ControllerUnavailable as unavailable:
            return unavailable


def raised_while_handling(outer: Exception, handled: Exception) -> Exception:
    """``outer`` raised in an ``except`` of ``handled``, without ``from``: the context a traceback shows."""
    try:
        try:
            raise handled
        except Exception:
            raise outer  # noqa: B904 (the implicit context is what is tested)
    except Exception as exc:
        return exc


@pytest.mark.parametrize(("exc", "away"), [
    (unreachable(ConnectionRefusedError(111, "Connect call failed")), True),
    (unreachable(TimeoutError()), True),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
    (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"), True),
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
    (asyncpg.exceptions.InternalClientError("another operation is in progress"), True),
    (asyncpg.InterfaceError("connection is closed"), True),
    (DBAPIError("SELECT 1", {}, Exception("closed"), connection_invalidated=True), True),
    (chained(RuntimeError("wrapped"), unreachable(ConnectionRefusedError(111, "refused"))), True),
    (raised_while_handling(RuntimeError("while handling"), unreachable(ConnectionResetError(104, "reset"))), True),
    (Overloaded("a heartbeat not recorded", retry_after=1, code="DATABASE_UNAVAILABLE"), True),
    # No connection free in the pool within its timeout: the connections it holds hang on a cut-off database.
    (SATimeoutError("QueuePool limit of size 40 overflow 10 reached, connection timed out, timeout 10.00"), True),
    # A statement the database refused, or a bug: a traceback's business, not an outage's.
    (ProgrammingError("SELEC 1", {}, Exception("syntax error")), False),
    (asyncpg.exceptions.UndefinedTableError("relation does not exist"), False),
    (asyncpg.exceptions._base.DataError("invalid input for query argument $1"), False),
    (Overloaded("too many waiting", retry_after=1), False),
    (ValueError("a bug"), False),
    # Not the database at all, however OS-level: a controller out of reach, the artifact store refusing a
    # file or full, a wait that timed out.
    (controller_refused(), False),
    (PermissionError(13, "Permission denied", "/var/lib/mmanager/artifacts/a1"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (ConnectionRefusedError(111, "Connect call failed"), False),
    (TimeoutError(), False),  # asyncio.TimeoutError: a wait (asyncio.timeout) that ran out
    (raised_while_handling(ValueError("a bug"), PermissionError(13, "denied")), False),
    # The hub's own error of another kind decides, whatever it was raised from.
    (chained(ControllerUnavailable("unreachable", {}), unreachable(ConnectionRefusedError(111, "refused"))), False),
    (chained(RuntimeError("wrapped"), chained(Conflict("busy"), DBAPIError("x", {}, Exception("closed"),
                                                                          connection_invalidated=True))), False),
])
def test_what_counts_as_the_database_away(exc: Exception, away: bool) -> None:
    assert database_away(exc) is away
    if away and not isinstance(exc, Overloaded):
        assert database_failed(exc), "the API answers 503 for every outage"
    if not isinstance(exc, DBAPIError | asyncpg.PostgresError | asyncpg.InterfaceError):
        assert database_failed(exc) is away, "503 DATABASE_UNAVAILABLE for the database's failures only"


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
        assert outage.failed("reconciler", unreachable(ConnectionRefusedError(111, "refused")))
        for source in ("job-watcher", "heartbeats", "an API call"):
            assert outage.failed(source, asyncpg.exceptions.CannotConnectNowError("starting up"))
        assert not outage.failed("poller", ValueError("a bug")), "not the database: the caller logs it"
        assert outage.open
        db.up = True
        await eventually(lambda: not outage.open, 5, "the probe's answer")
        assert outage.failed("reconciler", unreachable(ConnectionRefusedError(111, "refused"))), "a second outage"
        await outage.close()
    said = [(r.levelname, r.getMessage().split(" (")[0].split(" after")[0]) for r in caplog.records]
    assert said == [("WARNING", "the database is unavailable"), ("INFO", "the database is available again"),
                    ("WARNING", "the database is unavailable")]
    assert "4 failed attempt(s)" in caplog.records[1].getMessage()
    assert "(reconciler: ConnectionRefusedError: [Errno 111] refused)" in caplog.records[0].getMessage(), \
        "what the connection failed with, as docs/OPERATIONS.md shows it"


async def test_a_report_after_close_starts_no_probe(caplog: pytest.LogCaptureFixture) -> None:
    outage = DatabaseOutage(cast(Any, FakeDatabase()), probe_interval=0.01)
    await outage.close()
    with caplog.at_level(logging.DEBUG, logger="hub.outage"):
        assert outage.failed("job-watcher", unreachable(ConnectionRefusedError(111, "refused"))), \
            "still the database's: the caller logs nothing"
    assert not outage.open and outage._probe is None, "no probe against an engine being disposed"
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
