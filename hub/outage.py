"""What the database failing looks like, and one account of each outage in the hub's log.

The API answers ``503 DATABASE_UNAVAILABLE`` for anything ``database_failed()``
recognises (``hub.app``'s error handlers). The narrower ``database_away()`` is
the database being out of reach (refused, reset or cut connections, a server
shutting down or starting up): expected while it restarts, and no bug.

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
from typing import TYPE_CHECKING

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from hub.errors import HubError

if TYPE_CHECKING:
    from hub.db import Database

log = logging.getLogger(__name__)

# What the database failing looks like: SQLAlchemy's wrapped errors, and what asyncpg raises unwrapped
# (refused or reset connections, "the database system is starting up", a connection cut just before a
# statement: "another operation is in progress").
DATABASE_ERRORS: tuple[type[BaseException], ...] = (DBAPIError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                                                     asyncpg.exceptions.InternalClientError)

# The connection is gone, as opposed to one statement having failed: closed, reset, refused, "terminating
# connection due to administrator command", "the database system is starting up", or, when the cut arrived
# just before the statement, asyncpg's "another operation is in progress".
DISCONNECTS: tuple[type[BaseException], ...] = (OSError, asyncpg.PostgresConnectionError,
                                                asyncpg.exceptions.OperatorInterventionError, asyncpg.InterfaceError,
                                                asyncpg.exceptions.InternalClientError)

# Seconds between the probes that tell an outage's end.
PROBE_INTERVAL = 0.5


def caused_by(exc: BaseException | None, types: tuple[type[BaseException], ...]) -> bool:
    """Is ``exc``, or what caused it (ten links at most), one of ``types``?"""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, types):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def database_failed(exc: BaseException) -> bool:
    """Is this (or what caused it) the database failing? The API answers 503 for it.

    asyncpg raises some connection failures (refused, reset, "the database
    system is starting up") without SQLAlchemy's wrapping; the hub talks to
    controllers only through its client, which turns transport errors into
    ``HubError``, so an OS-level error left here is the database's.
    """
    return caused_by(exc, DATABASE_ERRORS)


def database_away(exc: BaseException) -> bool:
    """Is this the database out of reach (as opposed to a statement it refused, or a bug)?"""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, DISCONNECTS):
            return True
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        # The hub's own answer for it (a heartbeat batch that could not be written).
        if isinstance(seen, HubError) and seen.code == "DATABASE_UNAVAILABLE":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _brief(exc: BaseException) -> str:
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

    @property
    def open(self) -> bool:
        return self._since is not None

    def failed(self, source: str, exc: BaseException) -> bool:
        """``source`` failed with ``exc``. True: the database is away, and this is logged here (once per
        outage); False: something else, for the caller to log."""
        if not database_away(exc):
            return False
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
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
