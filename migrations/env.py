"""Alembic environment, async: runs on PostgreSQL through asyncpg and on SQLite
through aiosqlite. The URL is, in order: one given by the caller
(``config.attributes["url"]`` or the ``sqlalchemy.url`` option), else the hub's
settings (``MMANAGER_DATABASE_URL``)."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from hub.config import DatabaseSettings
from hub.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    return str(url) if url else DatabaseSettings().database_url


def _configure(connection: Connection | None = None, **kw: Any) -> None:
    url = _url()
    context.configure(
        connection=connection,
        url=None if connection is not None else url,
        target_metadata=target_metadata,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


# Any constant will do, as long as nothing else takes it: hub replicas started together on an empty
# database queue on it, and the later ones find the schema at head and have nothing to run.
MIGRATION_LOCK = 0x6D6D6D67


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        context.run_migrations()


async def _run_async() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        await connection.run_sync(_run_sync)
        return
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as conn:
        await conn.run_sync(_run_sync)
        await conn.commit()
    await engine.dispose()


def run_migrations_online() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_run_async())
        return
    raise RuntimeError("run alembic from synchronous code (e.g. in a thread: asyncio.to_thread)")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
