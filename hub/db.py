"""The database engine and sessions.

Request handlers get one session (``SessionDep``) that commits once when the
handler returns. Lifecycle work that calls controllers commits in several short
transactions instead (the pending operation must be durable before the
controller is touched), so it opens its own sessions from ``Database.session()``.
The hottest reads (the status read, ``/health``) skip the ORM: ``Database.first()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.base import Executable
from sqlalchemy.util import greenlet_spawn

log = logging.getLogger(__name__)


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
        # Statements ``first`` ran, compiled for the driver (``_compile``).
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

        For the hottest reads (the status read, ``/health``): on PostgreSQL the statement, compiled once, goes
        straight to asyncpg on a pooled connection (no SQLAlchemy connection, execution context or result
        around it: a third of the read's cost). What SQLAlchemy's types would do to values is skipped, so
        only for statements whose columns need nothing done (strings, numbers, ``timestamptz``, JSON, which
        the driver decodes with SQLAlchemy's codecs); no expanding (IN list) parameters. A connection that
        fails as disconnected is dropped and the pool's older ones are replaced as they are next taken,
        as SQLAlchemy does after a disconnect.
        """
        if self.is_sqlite:
            async with self.autocommit.connect() as conn:
                row = (await conn.execute(statement, params)).first()
            return row._mapping if row is not None else None
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = self._compile(statement)
        sql, names, bound = compiled
        args = []
        for name in names:
            if name in params:
                args.append(params[name])
            elif name in bound:
                args.append(bound[name])
            else:
                raise KeyError(f"parameter {name!r} has no value")
        raw = await self.engine.raw_connection()
        conn = raw.driver_connection
        try:
            row = await conn.fetchrow(sql, *args)
        except (TimeoutError, asyncio.CancelledError) as exc:
            # Cut off half-way: what the connection holds is unknown.
            await greenlet_spawn(raw.invalidate, exc)
            raise
        except BaseException as exc:
            if _disconnect(exc, conn):
                log.warning("a database connection failed (%s): replacing the pool's connections",
                            type(exc).__name__)
                # SQLAlchemy's own handling of a disconnect (Connection._handle_dbapi_exception): this one is
                # closed, and every connection opened before now is replaced when it is next taken.
                await greenlet_spawn(self.engine.sync_engine.pool._invalidate, raw, exc)
            else:
                await greenlet_spawn(raw.close)
            raise
        await greenlet_spawn(raw.close)
        return row

    def _compile(self, statement: Executable) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """(SQL for the driver, its parameter names in order, the values bound in the statement itself)."""
        done = statement.compile(dialect=self.engine.dialect)
        if any(bind.expanding for bind in done.binds.values()):
            raise ValueError("Database.first takes no expanding (IN list) parameters")
        bound = {name: bind.value for name, bind in done.binds.items() if not bind.required}
        return str(done), tuple(done.positiontup or ()), bound

    async def dispose(self) -> None:
        await self.engine.dispose()


def _disconnect(exc: BaseException, conn: Any) -> bool:
    """Whether the connection is unusable after ``exc``, as opposed to the statement having failed.

    A connection the server cut while it sat in the pool fails as closed, reset, "terminating connection due
    to administrator command", or, when the cut arrived just before the statement, with asyncpg's
    ``InternalClientError`` ("another operation is in progress").
    """
    if isinstance(exc, (ValueError, asyncpg.exceptions.QueryCanceledError)):
        # An argument asyncpg cannot encode (the input's fault); a statement timeout or a cancel.
        return False
    if isinstance(exc, (OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
                        asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)):
        return True
    return bool(conn.is_closed())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
