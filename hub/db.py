"""The database engine and sessions.

Request handlers get one session (``SessionDep``) that commits once when the
handler returns. Lifecycle work that calls controllers commits in several short
transactions instead (the pending operation must be durable before the
controller is touched), so it opens its own sessions from ``Database.session()``.
The hottest paths skip the ORM: ``Database.first``, ``all``, ``execute``,
``executemany`` and ``transaction()`` run Core statements through
``hub.db_direct`` (straight through asyncpg on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

# The direct path's names that the rest of the hub imports from here, with the Database they run on.
from hub.db_direct import AsyncpgConnector, Connector, CoreConnector, CoreTx, Tx, any_of, insert_row, insert_values
from hub.outage import DatabaseUnreachable

__all__ = ["Database", "CoreTx", "Tx", "any_of", "insert_row", "insert_values"]


class Database:
    """The engine, its sessions, and the Core statements that skip the ORM (``hub.db_direct``)."""

    def __init__(self, url: str, **engine_kw: Any) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            engine_kw.setdefault("connect_args", {"timeout": 30})
        else:
            # Connections beyond pool_size are closed when returned and opened again on the next burst (a
            # new PostgreSQL backend each time): enough are kept open for the concurrent reads of a busy API.
            engine_kw.setdefault("pool_size", 40)
            # The most recently returned connection first: a burst's statements find it prepared (asyncpg
            # prepares a statement once per connection), and connections a quiet spell leaves idle are
            # the ones recycled. A FIFO pool handed each of a slow trickle of creates a cold one.
            engine_kw.setdefault("pool_use_lifo", True)
            engine_kw.setdefault("max_overflow", 10)
            # No ping before each checkout (a round trip on every session): a connection the server dropped
            # fails its first statement instead, which invalidates the whole pool at once (SQLAlchemy treats a
            # disconnect as "every connection older than now is suspect"), so a restart costs the calls in
            # flight a 503 and nothing more. Recycled before idle timeouts on the way can cut them.
            engine_kw.setdefault("pool_pre_ping", False)
            engine_kw.setdefault("pool_recycle", 600)
            # Fail fast while the server is down or restarting: callers get a 503, not a hang.
            engine_kw.setdefault("pool_timeout", 10)
            engine_kw.setdefault("connect_args", {"timeout": 5})
        self.engine: AsyncEngine = create_async_engine(url, **engine_kw)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine.sync_engine, "do_connect", _connect_or_unreachable)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        # Core statements outside the ORM (``Tx``): the hub's hottest calls, so the connector's own methods,
        # not wrappers around them. Each statement of ``first``, ``all`` and ``execute`` is a transaction of
        # its own; ``executemany``'s rows are written all or none.
        self.connector: Connector = CoreConnector(self.engine) if self.is_sqlite else AsyncpgConnector(self.engine)
        self.first = self.connector.first
        self.all = self.connector.all
        self.execute = self.connector.execute
        self.executemany = self.connector.executemany
        self.transaction = self.connector.transaction

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session that commits on success and rolls back on any error."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def dispose(self) -> None:
        await self.engine.dispose()


def _connect_or_unreachable(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """Every new connection of the pool (the ORM's sessions and ``hub.db_direct``'s alike). asyncpg raises a
    refused, reset or timed-out connect as a bare ``OSError``, and SQLAlchemy passes it on unwrapped: raised
    as ``DatabaseUnreachable`` instead, it is the database's and nothing else's (``hub.outage``)."""
    try:
        return dialect.connect(*cargs, **cparams)
    except OSError as exc:  # TimeoutError (the connect timeout) and socket.gaierror included
        raise DatabaseUnreachable(f"{type(exc).__name__}: {exc}") from exc


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
