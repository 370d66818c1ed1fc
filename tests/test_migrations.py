"""The migrations and the ORM models describe the same schema, on PostgreSQL
and on SQLite, and the migrations go down and up again cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from hub.migrate import downgrade, upgrade
from hub.models import Base
from tests.support.pg import create_database

TABLES = {
    "mmanager_controllers",
    "container_registry",
    "container_operations",
    "service_deployment_history",
    "model_services",
    "users",
    "api_tokens",
    "controller_keys",
    "audit_log",
    "alerts",
    "service_metrics",
    "model_types",
}


async def _diff_and_tables(url: str) -> tuple[list, set[str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            def check(sync_conn):
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                return compare_metadata(ctx, Base.metadata), set(inspect(sync_conn).get_table_names())

            return await conn.run_sync(check)
    finally:
        await engine.dispose()


async def _audit_log_is_append_only(url: str) -> None:
    """Rows go in; the database itself refuses to change, delete or truncate them."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO audit_log (at, source, actor, method, path, status_code, result, details) "
                "VALUES (CURRENT_TIMESTAMP, 'hub', 'alice', 'POST', '/api/x', 201, 'ok', '{}')"
            ))
        statements = ["UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"]
        if engine.dialect.name == "postgresql":
            # Row triggers do not fire on TRUNCATE; a statement trigger refuses it (SQLite has no TRUNCATE).
            statements += ["TRUNCATE audit_log", "TRUNCATE audit_log RESTART IDENTITY CASCADE"]
        for statement in statements:
            with pytest.raises(DBAPIError, match="append-only"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT actor FROM audit_log"))).scalars().all() == ["alice"]
    finally:
        await engine.dispose()


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
async def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    return await create_database(request.getfixturevalue("pg_server"), "mig")


async def test_upgrade_matches_models_then_down_and_up_again(fresh_url: str) -> None:
    await asyncio.to_thread(upgrade, fresh_url)
    diff, tables = await _diff_and_tables(fresh_url)
    assert diff == []
    assert TABLES <= tables

    await _audit_log_is_append_only(fresh_url)

    await asyncio.to_thread(downgrade, fresh_url, "base")
    _, tables = await _diff_and_tables(fresh_url)
    assert tables & TABLES == set()

    await asyncio.to_thread(upgrade, fresh_url)
    diff, tables = await _diff_and_tables(fresh_url)
    assert diff == []
    assert TABLES <= tables
