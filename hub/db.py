"""The database engine and sessions.

Request handlers get one session (``SessionDep``) that commits once when the
handler returns. Lifecycle work that calls controllers commits in several short
transactions instead (the pending operation must be durable before the
controller is touched), so it opens its own sessions from ``Database.session()``.
The hottest paths skip the ORM: reads (the status read, ``/health``) through
``Database.first()``, the create's writes through ``Database.transaction()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import asyncpg
from sqlalchemy import ARRAY, ColumnElement, Insert, Table, any_, bindparam, event, insert
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql.base import Executable
from sqlalchemy.util import greenlet_spawn

log = logging.getLogger(__name__)

# What ``Database._compile`` keeps of a statement: its SQL for asyncpg, its parameter names in order, the values
# bound in the statement itself, and the bind processors of the parameters whose type has one.
_Compiled = tuple[str, tuple[str, ...], dict[str, Any], dict[str, Callable[[Any], Any]]]


_NO_VALUE = object()
# A statement's SQL for asyncpg and what makes its arguments, in order, of a mapping of values.
_Binder = tuple[str, Callable[[Mapping[str, Any]], list[Any]]]


def _binder(sql: str, names: tuple[str, ...], bound: dict[str, Any],
            processors: dict[str, Callable[[Any], Any]]) -> _Binder:
    order = [(name, bound.get(name, _NO_VALUE), processors.get(name)) for name in names]

    def arguments(params: Mapping[str, Any]) -> list[Any]:
        args: list[Any] = []
        for name, default, process in order:
            value = params.get(name, default)
            if value is _NO_VALUE:
                raise KeyError(f"parameter {name!r} has no value")
            args.append(process(value) if process is not None and value is not None else value)
        return args

    return sql, arguments


class Tx(Protocol):
    """Core statements in one transaction: ``Database.transaction()``, or an ORM session's (``CoreTx``); or
    the ``Database`` itself, where each statement is a transaction of its own.

    Statements are built once (module constants with ``bindparam``s) and given their values here.
    """

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        """Run a statement; the number of rows it wrote."""
        ...

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The first row a statement answers (a SELECT, or a write with RETURNING), or None."""
        ...

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        """Every row a statement answers."""
        ...

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run a statement once for each of ``rows`` (their values), in one round trip where the driver can."""
        ...


def any_of(column: ColumnElement[Any], name: str, *, sqlite: bool) -> ColumnElement[bool]:
    """``column`` equal to one of the list given as parameter ``name``: on PostgreSQL ``= ANY`` of an array
    (one statement, compiled once, for lists of any length, as ``Tx`` statements must be), on SQLite an IN."""
    if sqlite:
        return column.in_(bindparam(name, expanding=True))
    return column == any_(bindparam(name, type_=ARRAY(column.type)))


_INSERTS: dict[Table, Insert] = {}


async def insert_values(tx: Tx, table: Table, values: Mapping[str, Any]) -> None:
    """Insert one row: ``values`` has every column but the table's autoincremented key (the database's)."""
    statement = _INSERTS.get(table)
    if statement is None:
        statement = _INSERTS[table] = insert(table).inline().values(
            {c.key: bindparam(c.key, type_=c.type) for c in table.columns if c is not table.autoincrement_column}
        )
    await tx.execute(statement, values)


async def insert_row(tx: Tx, obj: Any) -> None:
    """Insert an ORM object's row as it is (no unit of work, no identity map)."""
    table = obj.__table__
    await insert_values(tx, table, {c.key: getattr(obj, c.key) for c in table.columns
                                    if c is not table.autoincrement_column})


class CoreTx:
    """``Tx`` through SQLAlchemy: a Core connection (SQLite's ``Database.transaction()``, ``first``), or an
    ORM session, for the statements a session's work shares with a ``Database.transaction()``'s."""

    def __init__(self, conn: AsyncConnection | AsyncSession) -> None:
        self.conn = conn

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        return int((await self.conn.execute(statement, dict(params))).rowcount)  # type: ignore[attr-defined]

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        row = (await self.conn.execute(statement, dict(params))).first()
        return row._mapping if row is not None else None

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        return (await self.conn.execute(statement, dict(params))).mappings().all()

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            await self.conn.execute(statement, [dict(r) for r in rows])


class _RawTx:
    """``Tx`` straight through asyncpg (PostgreSQL's ``Database.transaction()``)."""

    def __init__(self, db: Database, conn: asyncpg.Connection) -> None:
        self.db = db
        self.conn = conn

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        status: str = await self.conn.execute(*self.db._bind(statement, params))
        # "INSERT 0 1", "UPDATE 3", "DELETE 0": the count is the last word.
        last = status.rpartition(" ")[2]
        return int(last) if last.isdigit() else 0

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return await self.conn.fetchrow(*self.db._bind(statement, params))

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        return await self.conn.fetch(*self.db._bind(statement, params))

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            sql, arguments = self.db._binder(statement)
            await self.conn.executemany(sql, [arguments(r) for r in rows])


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
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        # Reads that need no transaction (``first`` on SQLite): no BEGIN or COMMIT around the statement.
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # Statements run straight through asyncpg (``first``, ``transaction``), compiled for it (``_compile``).
        self._binders: dict[Executable, _Binder] = {}

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

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The first row of a read that one statement answers, as a mapping, outside any transaction.

        For the hottest reads (the status read, ``/health``): on PostgreSQL the statement, compiled once, goes
        straight to asyncpg on a pooled connection (no SQLAlchemy connection, execution context or result
        around it: a third of the read's cost). Values go in through the columns' own bind processors; what
        comes out is the driver's (strings, numbers, ``timestamptz``, JSON, which the driver decodes with
        SQLAlchemy's codecs), so only for reads whose columns need nothing more done. No expanding (IN list)
        parameters. A connection that fails as disconnected is dropped and the pool's older ones are
        replaced as they are next taken, as SQLAlchemy does after a disconnect.
        """
        if self.is_sqlite:
            async with self.autocommit.connect() as conn:
                return await CoreTx(conn).first(statement, params)
        async with self._raw() as conn:
            return await _RawTx(self, conn).first(statement, params)

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        """Every row of a read, outside any transaction, as ``first`` reads (the heartbeats' batches)."""
        if self.is_sqlite:
            async with self.autocommit.connect() as conn:
                return await CoreTx(conn).all(statement, params)
        async with self._raw() as conn:
            return await _RawTx(self, conn).all(statement, params)

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        """A write that stands alone, committed by itself; the number of rows it wrote.

        On PostgreSQL the statement goes straight to asyncpg outside any transaction block: the server runs
        it in a transaction of its own and commits it before answering, as durable as one in
        ``transaction()``, in one round trip where BEGIN, the statement and COMMIT take three (an audit
        row, written before every mutating call is answered, is one). On SQLite in a transaction.
        """
        if self.is_sqlite:
            async with self.transaction() as tx:
                return await tx.execute(statement, params)
        async with self._raw() as conn:
            return await _RawTx(self, conn).execute(statement, params)

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """``Tx.executemany`` in a transaction of its own (so the rows are written all or none)."""
        async with self.transaction() as tx:
            await tx.executemany(statement, rows)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One transaction of Core statements (``Tx``), committed on success and rolled back on any error.

        For the writes on the create path, the hub's busiest: on PostgreSQL each statement, compiled once,
        goes straight to asyncpg (no ORM session, SQLAlchemy connection or result: most of a create's CPU
        went there), with the same handling of a lost connection as ``first``. On SQLite a Core connection.
        """
        if self.is_sqlite:
            async with self.engine.begin() as conn:
                yield CoreTx(conn)
            return
        async with self._raw() as conn:
            began = conn.transaction()
            await began.start()
            try:
                yield _RawTx(self, conn)
            except BaseException as exc:
                if not isinstance(exc, TimeoutError | asyncio.CancelledError):  # those drop the connection (_raw)
                    try:
                        await began.rollback()
                    except BaseException as failed:
                        conn.terminate()  # a connection that cannot roll back is not given back to the pool
                        if isinstance(failed, asyncio.CancelledError):
                            raise  # the caller's cancellation, not the body's error
                raise
            await began.commit()

    @asynccontextmanager
    async def _raw(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection, given back when done; dropped (and the pool's older ones with it)
        when it failed as disconnected or was cut off half-way."""
        raw = await self.engine.raw_connection()
        conn = raw.driver_connection
        try:
            yield conn
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
            elif conn.is_closed():
                await greenlet_spawn(raw.invalidate, exc)  # closed here (a failed rollback): this one only
            else:
                await greenlet_spawn(raw.close)
            raise
        await greenlet_spawn(raw.close)

    def _bind(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        """The statement's SQL for asyncpg and its arguments in order, through the columns' bind processors."""
        sql, arguments = self._binder(statement)
        return [sql, *arguments(params)]

    def _binder(self, statement: Executable) -> _Binder:
        """The statement's SQL for asyncpg, and what makes its arguments of a mapping of values; made once
        a statement."""
        binder = self._binders.get(statement)
        if binder is None:
            binder = self._binders[statement] = _binder(*self._compile(statement))
        return binder

    def _compile(self, statement: Executable) -> _Compiled:
        """(SQL for the driver, its parameter names in order, the values bound in the statement itself, the
        bind processors of the parameters whose type has one)."""
        dialect = self.engine.dialect
        done = statement.compile(dialect=dialect)
        if any(bind.expanding for bind in done.binds.values()):
            raise ValueError("raw statements take no expanding (IN list) parameters")
        bound = {name: bind.value for name, bind in done.binds.items() if not bind.required}
        processors = {name: process for name, bind in done.binds.items()
                      if (process := bind.type.bind_processor(dialect)) is not None}
        return str(done), tuple(done.positiontup or ()), bound, processors

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
