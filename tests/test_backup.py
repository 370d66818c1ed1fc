"""Backup and restore as docs/OPERATIONS.md tells an operator to do it: ``pg_dump -Fc`` of a live hub
database, ``pg_restore --clean --if-exists --no-owner`` into another one; the restored database holds
the same rows, is at the head revision, and its audit log is still append-only."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from hub.db import Database
from hub.migrate import upgrade
from hub.services.users import create_user
from tests.support.pg import _bin, create_database


def libpq(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def test_a_dump_restores_into_an_empty_database(pg_server: str, tmp_path: Path) -> None:
    source = await create_database(pg_server, "live")
    await asyncio.to_thread(upgrade, source)
    db = Database(source)
    try:
        async with db.session() as session:
            await create_user(session, "alice")
            await session.execute(text(
                "INSERT INTO audit_log (at, source, actor, method, path, status_code, result, details) "
                "VALUES (now(), 'hub', 'alice', 'POST', '/api/alice/r/services', 201, 'ok', '{}')"))
    finally:
        await db.dispose()

    dump = tmp_path / "mmanager.dump"
    subprocess.run([_bin("pg_dump"), "-Fc", "-d", libpq(source), "-f", str(dump)], check=True)
    target = await create_database(pg_server, "restored")
    subprocess.run([_bin("pg_restore"), "-d", libpq(target), "--clean", "--if-exists", "--no-owner", str(dump)],
                   check=True, capture_output=True)
    await asyncio.to_thread(upgrade, target)  # what the hub image's entrypoint does next: nothing left to do

    restored = Database(target)
    try:
        async with restored.session() as session:
            assert (await session.execute(text("SELECT username FROM users"))).scalars().all() == ["alice"]
            assert (await session.execute(text("SELECT actor FROM audit_log"))).scalars().all() == ["alice"]
            heads = (await session.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        with pytest.raises(DBAPIError, match="append-only"):
            async with restored.session() as session:
                await session.execute(text("DELETE FROM audit_log"))
    finally:
        await restored.dispose()
    assert heads == [ScriptDirectory.from_config(Config("alembic.ini")).get_current_head()]
