"""Core statements without the ORM: the ``Tx`` protocol and the two connectors that run them.

On PostgreSQL (``AsyncpgConnector``) a statement is compiled once for asyncpg and sent straight to the driver
on one of the engine's pooled connections: no SQLAlchemy connection, execution context or result around it.
On SQLite (``CoreConnector``) the same statements go through SQLAlchemy Core connections. ``hub.db.Database``
hands its ``first``, ``all``, ``execute``, ``executemany`` and ``transaction`` to one of them.

Invariant: a pooled connection that failed as disconnected, or was cut off half-way, never goes back to the
pool as it is; a disconnect also marks every older connection of the pool to be replaced, as SQLAlchemy does
after one on its own path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import ARRAY, ClauseElement, ColumnElement, Dialect, Insert, Table, any_, bindparam, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler

# Private to SQLAlchemy (its version is pinned to one minor in pyproject.toml, and
# tests/unit/test_sqlalchemy_privates.py checks it): the asyncio extension's own bridge from async code to the
# pool's synchronous methods (closing or invalidating a pooled connection runs the driver's close).
from sqlalchemy.util import greenlet_spawn

from hub.outage import DISCONNECTS

log = logging.getLogger(__name__)


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


class Connector(Tx, Protocol):
    """``Tx`` over the whole database, each statement a transaction of its own, and ``transaction()`` for
    several in one."""

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One transaction of Core statements, committed on success and rolled back on any error."""
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
        result = await self.conn.execute(statement, dict(params))
        return int(result.rowcount)  # type: ignore[attr-defined]  # a DML statement's result is a CursorResult

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        row = (await self.conn.execute(statement, dict(params))).first()
        return cast(Mapping[str, Any], row._mapping) if row is not None else None

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        return cast(Sequence[Mapping[str, Any]], (await self.conn.execute(statement, dict(params))).mappings().all())

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            await self.conn.execute(statement, [dict(r) for r in rows])


class CoreConnector:
    """``Connector`` through SQLAlchemy Core connections (SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Reads that need no transaction: no BEGIN or COMMIT around the statement.
        self.autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        async with self.autocommit.connect() as conn:
            return await CoreTx(conn).first(statement, params)

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        async with self.autocommit.connect() as conn:
            return await CoreTx(conn).all(statement, params)

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        async with self.transaction() as tx:
            return await tx.execute(statement, params)

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(statement, rows)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.engine.begin() as conn:
            yield CoreTx(conn)


_NO_VALUE = object()
# A statement's SQL for asyncpg and what makes its arguments, in order, of a mapping of values.
_Binder = tuple[str, Callable[[Mapping[str, Any]], list[Any]]]


class Binders:
    """Each statement's SQL for asyncpg and its binder, compiled once a statement and kept.

    Values go in through the columns' own bind processors; no expanding (IN list) parameters (``any_of``).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._binders: dict[Executable, _Binder] = {}

    def bind(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        """The statement's SQL for asyncpg and its arguments in order."""
        sql, arguments = self.binder(statement)
        return [sql, *arguments(params)]

    def binder(self, statement: Executable) -> _Binder:
        binder = self._binders.get(statement)
        if binder is None:
            binder = self._binders[statement] = self._compile(statement)
        return binder

    def _compile(self, statement: Executable) -> _Binder:
        # Every statement a Tx runs is a Core one, so a ClauseElement that compiles to an SQLCompiler.
        done = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=self.dialect))
        if any(bind.expanding for bind in done.binds.values()):
            raise ValueError("raw statements take no expanding (IN list) parameters")
        bound = {name: bind.value for name, bind in done.binds.items() if not bind.required}
        processors = {name: process for name, bind in done.binds.items()
                      if (process := bind.type.bind_processor(self.dialect)) is not None}
        # In the order of the SQL's $n: each name, the value bound in the statement itself (if any) and the
        # bind processor of its type (if it has one).
        order = [(name, bound.get(name, _NO_VALUE), processors.get(name)) for name in done.positiontup or ()]

        def arguments(params: Mapping[str, Any]) -> list[Any]:
            args: list[Any] = []
            for name, default, process in order:
                value = params.get(name, default)
                if value is _NO_VALUE:
                    raise KeyError(f"parameter {name!r} has no value")
                args.append(process(value) if process is not None and value is not None else value)
            return args

        return str(done), arguments


class AsyncpgTx:
    """``Tx`` straight through asyncpg, on one connection."""

    def __init__(self, binders: Binders, conn: asyncpg.Connection) -> None:
        self.binders = binders
        self.conn = conn

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        status: str = await self.conn.execute(*self.binders.bind(statement, params))
        # "INSERT 0 1", "UPDATE 3", "DELETE 0": the count is the last word.
        last = status.rpartition(" ")[2]
        return int(last) if last.isdigit() else 0

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return await self.conn.fetchrow(*self.binders.bind(statement, params))  # type: ignore[return-value]  # a Record is a Mapping

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        return await self.conn.fetch(*self.binders.bind(statement, params))  # type: ignore[return-value]  # Records are Mappings

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            sql, arguments = self.binders.binder(statement)
            await self.conn.executemany(sql, [arguments(r) for r in rows])


class AsyncpgConnector:
    """``Connector`` straight through asyncpg on the engine's pooled connections (PostgreSQL).

    What comes out is the driver's (strings, numbers, ``timestamptz``, JSON, which the driver decodes with
    SQLAlchemy's codecs), so only for statements whose columns need nothing more done.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.binders = Binders(engine.dialect)

    async def first(self, statement: Executable, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        async with self._raw() as conn:
            return await AsyncpgTx(self.binders, conn).first(statement, params)

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        async with self._raw() as conn:
            return await AsyncpgTx(self.binders, conn).all(statement, params)

    async def execute(self, statement: Executable, params: Mapping[str, Any]) -> int:
        """Outside any transaction block: the server runs the statement in a transaction of its own and
        commits it before answering, as durable as one in ``transaction()``, in one round trip where BEGIN,
        the statement and COMMIT take three."""
        async with self._raw() as conn:
            return await AsyncpgTx(self.binders, conn).execute(statement, params)

    async def executemany(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(statement, rows)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._raw() as conn:
            began = conn.transaction()
            await began.start()
            try:
                yield AsyncpgTx(self.binders, conn)
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
        conn: asyncpg.Connection = raw.driver_connection  # type: ignore[assignment]  # a pooled connection has its driver's
        try:
            yield conn
        except (TimeoutError, asyncio.CancelledError) as exc:
            # Cut off half-way: what the connection holds is unknown.
            await greenlet_spawn(raw.invalidate, exc)
            raise
        except BaseException as exc:
            if _disconnect(exc, conn):
                # DEBUG: the error goes on to the caller, which tells it (hub.outage: once per outage).
                log.debug("a database connection failed (%s): replacing the pool's connections", type(exc).__name__)
                # SQLAlchemy's own handling of a disconnect (Connection._handle_dbapi_exception), through its
                # private Pool._invalidate (pinned, see greenlet_spawn): this one is closed, and every
                # connection opened before now is replaced when it is next taken.
                await greenlet_spawn(self.engine.sync_engine.pool._invalidate, raw, exc)
            elif conn.is_closed():
                await greenlet_spawn(raw.invalidate, exc)  # closed here (a failed rollback): this one only
            else:
                await greenlet_spawn(raw.close)
            raise
        await greenlet_spawn(raw.close)


def _disconnect(exc: BaseException, conn: Any) -> bool:
    """Whether the connection is unusable after ``exc``, as opposed to the statement having failed.

    A connection the server cut while it sat in the pool fails as closed, reset, "terminating connection due
    to administrator command", or, when the cut arrived just before the statement, with asyncpg's
    ``InternalClientError`` ("another operation is in progress").
    """
    if isinstance(exc, (ValueError, asyncpg.exceptions.QueryCanceledError)):
        # An argument asyncpg cannot encode (the input's fault); a statement timeout or a cancel.
        return False
    if isinstance(exc, (OSError, *DISCONNECTS)):
        return True  # a socket error on this connection: it is unusable, whatever it says of the server
    return bool(conn.is_closed())
