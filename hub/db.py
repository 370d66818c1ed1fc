"""The database engine and sessions.

Request handlers get one session (``SessionDep``) that commits once when the
handler returns. Lifecycle work that calls controllers commits in several short
transactions instead (the pending operation must be durable before the
controller is touched), so it opens its own sessions from ``Database.session()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


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
        # Reads that need no transaction: every statement commits on its own, no BEGIN or COMMIT round trips.
        self.readmaker = async_sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                                            expire_on_commit=False)

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

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        """A session for a read that one statement answers (or several that need not agree with each
        other): no transaction around it, so one round trip per statement. Never write through it."""
        async with self.readmaker() as session:
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
