"""What the database failing looks like, and one account of each outage in the hub's log.

The API answers ``503 DATABASE_UNAVAILABLE`` for anything ``database_failed()``
recognises (``hub.app``'s error handlers). The narrower ``database_away()`` is
the database being out of reach (refused, reset or cut connections, a server
shutting down or starting up, no pooled connection free in time): expected
while it restarts, and no bug.

``DatabaseOutage`` is the hub's one account of such an outage: whatever fails
because the database is away (a background loop's iteration, a heartbeat
batch, an API call) reports it there. Invariant: one WARNING when the first
report opens an outage, one INFO with its length when the database answers
again (its own probe, ``SELECT 1``, decides), and nothing above DEBUG between
them, however many loops keep failing meanwhile. An error that is not the
database being away is not its business: ``failed()`` returns False and the
caller logs it as it always did, traceback included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from hub.errors import HubError

if TYPE_CHECKING:
    from hub.db import Database

log = logging.getLogger(__name__)


class DatabaseUnreachable(Exception):
    """No connection to the database could be opened: refused, reset, timed out, its name not resolved.

    asyncpg raises these as bare ``OSError``s and SQLAlchemy passes them on as they are, so ``hub.db``'s
    connect hook raises this from them instead: a bare ``OSError`` elsewhere (a full disk, a controller's
    refused connection) is never taken for the database."""


# What the database failing looks like: SQLAlchemy's wrapped errors, a connection that could not be opened, no
# connection free in the pool in time, and what asyncpg raises unwrapped on the hub's direct path
# (``hub.db_direct``): "the database system is starting up", a connection cut just before a statement
# ("another operation is in progress").
DATABASE_ERRORS: tuple[type[BaseException], ...] = (DBAPIError, DatabaseUnreachable, PoolTimeout,
                                                     asyncpg.PostgresError, asyncpg.InterfaceError,
                                                     asyncpg.exceptions.InternalClientError)

# The connection is gone, as opposed to one statement having failed: it could not be opened, or it was
# closed, reset, "terminating connection due to administrator command", "the database system is starting
# up", or, when the cut arrived just before the statement, asyncpg's "another operation is in progress".
# (asyncpg's ``DataError``, an argument it cannot encode, is an ``InterfaceError`` too, and a ``ValueError``:
# the input's fault, never a disconnect.)
DISCONNECTS: tuple[type[BaseException], ...] = (DatabaseUnreachable, asyncpg.PostgresConnectionError,
                                                asyncpg.exceptions.OperatorInterventionError, asyncpg.InterfaceError,
                                                asyncpg.exceptions.InternalClientError)

# Seconds between the probes that tell an outage's end.
PROBE_INTERVAL = 0.5


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what caused it (ten links at most), as a traceback tells them: the explicit cause
    (``raise ... from``), else the exception being handled when it was raised, unless that was suppressed
    (``raise ... from None``: whoever raised it said it is not the story)."""
    for _ in range(10):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__


def caused_by(exc: BaseException | None, types: tuple[type[BaseException], ...]) -> bool:
    """Is ``exc``, or what caused it, one of ``types``?"""
    return any(isinstance(link, types) for link in causes(exc))


def database_failed(exc: BaseException) -> bool:
    """Is this (or what caused it) the database failing? The API answers 503 for it.

    The first of the hub's own errors on the way decides: the database's only when it says so (a
    controller's error raised while handling a database error is the controller's)."""
    for link in causes(exc):
        if isinstance(link, HubError):
            return link.code == "DATABASE_UNAVAILABLE"
        if isinstance(link, DATABASE_ERRORS):
            return True
    return False


def database_away(exc: BaseException) -> bool:
    """Is this the database out of reach (as opposed to a statement it refused, or a bug)?

    A pool with no connection free within its timeout counts: while the database is cut off, the
    connections the pool holds hang in their statements and every other caller waits for one of them;
    the outage's WARNING names it (``QueuePool limit ... reached``), and its probe, which needs a
    connection too, ends the outage when one is free again."""
    for link in causes(exc):
        # The hub's own answer for it (a heartbeat batch that could not be written), or another of its
        # errors: that one's business, whatever it was raised from.
        if isinstance(link, HubError):
            return link.code == "DATABASE_UNAVAILABLE"
        if isinstance(link, DISCONNECTS) and not isinstance(link, ValueError):
            return True
        if isinstance(link, PoolTimeout) or (isinstance(link, DBAPIError) and link.connection_invalidated):
            return True
    return False


def _brief(exc: BaseException) -> str:
    if isinstance(exc, DatabaseUnreachable) and exc.__cause__ is not None:
        exc = exc.__cause__  # what the connection failed with says it all
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class DatabaseOutage:
    """The hub's one account of a database outage (see the module's docstring)."""

    def __init__(self, db: Database, probe_interval: float = PROBE_INTERVAL) -> None:
        self.db = db
        self.probe_interval = probe_interval
        self._since: float | None = None
        self._failures = 0
        self._probe: asyncio.Task[None] | None = None
        # Set by close(): the engine is going away, and a report after it (a loop's last iteration, a call
        # in flight) starts no probe that would outlive it.
        self._closed = False

    @property
    def open(self) -> bool:
        return self._since is not None

    def failed(self, source: str, exc: BaseException) -> bool:
        """``source`` failed with ``exc``. True: the database is away, and this is logged here (once per
        outage); False: something else, for the caller to log."""
        if not database_away(exc):
            return False
        if self._closed:
            log.debug("%s: the database is unavailable (the hub is stopping): %s", source, _brief(exc))
            return True
        self._failures += 1
        if self._since is not None:
            log.debug("%s: the database is still unavailable: %s", source, _brief(exc))
            return True
        self._since = time.monotonic()
        self._failures = 1
        log.warning("the database is unavailable (%s: %s); calls that need it answer 503 DATABASE_UNAVAILABLE "
                    "and the background loops retry until it is back", source, _brief(exc))
        self._probe = asyncio.get_running_loop().create_task(self._until_back(), name="database-outage-probe")
        return True

    async def _until_back(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                async with asyncio.timeout(max(self.probe_interval, 2.0)), self.db.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            except Exception as exc:  # noqa: BLE001 (whatever it is, the database does not answer yet)
                log.debug("the database is still unavailable: %s", _brief(exc))
                continue
            break
        assert self._since is not None
        log.info("the database is available again after %.1fs (%d failed attempt(s) meanwhile)",
                 time.monotonic() - self._since, self._failures)
        self._since = None
        self._probe = None

    async def close(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
