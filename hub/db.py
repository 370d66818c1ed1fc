"""The database engine and sessions.

Request handlers get one session (``SessionDep``) that commits once when the
handler returns. Lifecycle work that calls controllers commits in several short
transactions instead (the pending operation must be durable before the
controller is touched), so it opens its own sessions from ``Database.session()``.
The hottest reads (the status read, ``/health``) skip the ORM: ``Database.first()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.base import Executable
from sqlalchemy.util import greenlet_spawn


class Database:
    def __init__(self, url: str, **engine_kw: Any) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            engine_kw.setdefault("connect_args", {"timeout": 30})
        else:
            # Connections beyond pool_size are closed when returned and opened again on the next burst (a
            # new PostgreSQL backend each time): at 32 concurrent reads a pool of 20 opened one connection
            # per 14 requests (bench.api_floor). Kept open up to 40.
            engine_kw.setdefault("pool_size", 40)
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
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        # Reads that need no transaction (``first`` on SQLite): no BEGIN or COMMIT around the statement.
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # Statements ``first`` ran, compiled for the driver: (SQL, parameter names in order, their values when bound).
        self._compiled: dict[Executable, tuple[str, tuple[str, ...], dict[str, Any]]] = {}

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

    async def first(self, statement: Executable, params: dict[str, Any]) -> Mapping[str, Any] | None:
        """The first row of a read that one statement answers, as a mapping, outside any transaction.

        For the hottest reads (the status read): on PostgreSQL the statement, compiled once, goes straight
        to asyncpg on a pooled connection (no SQLAlchemy connection, execution context or result around it:
        a third of the read's cost; the driver's codecs are SQLAlchemy's, so JSON comes back decoded and
        times as they are). A connection that failed is dropped from the pool, not handed out again.
        """
        if self.is_sqlite:
            async with self.autocommit.connect() as conn:
                row = (await conn.execute(statement, params)).first()
            return row._mapping if row is not None else None
        compiled = self._compiled.get(statement)
        if compiled is None:
            done = statement.compile(dialect=self.engine.dialect)
            compiled = self._compiled[statement] = (str(done), tuple(done.positiontup or ()), done.params)
        sql, names, defaults = compiled
        args = [params[name] if name in params else defaults[name] for name in names]
        raw = await self.engine.raw_connection()
        try:
            row = await raw.driver_connection.fetchrow(sql, *args)
        except (TimeoutError, asyncio.CancelledError) as exc:
            # Cut off half-way: what the connection holds is unknown.
            await greenlet_spawn(raw.invalidate, exc)
            raise
        except BaseException as exc:
            if _disconnect(exc):
                await greenlet_spawn(raw.invalidate, exc)
                # As SQLAlchemy does on a disconnect: every pooled connection is suspect (the server restarted),
                # so the pool starts afresh and the next call gets a new one.
                await self.engine.dispose(close=False)
            else:
                await greenlet_spawn(raw.close)
            raise
        await greenlet_spawn(raw.close)
        return row

    async def dispose(self) -> None:
        await self.engine.dispose()


def _disconnect(exc: BaseException) -> bool:
    """Whether the connection may be unusable: anything but an error the server sent about the statement.

    A connection the server cut while it sat in the pool can fail as closed, reset, "terminating connection
    due to administrator command", or, when the cut arrived just before the statement, with asyncpg's
    ``InternalClientError`` ("another operation is in progress"): all of them drop it.
    """
    if isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError)):
        return True
    # (asyncpg refusing to encode an argument is a ValueError: the input's fault, not the connection's.)
    return not isinstance(exc, (asyncpg.PostgresError, ValueError))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
