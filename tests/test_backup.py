"""Backup and restore as docs/OPERATIONS.md tells an operator to do it: ``mmanager db backup FILE`` of a live
hub's database, every hub stopped, the data lost, ``mmanager db restore FILE``, the hub started again; every
service, controller, operation and user is back, the database is at the head revision, and its audit log is
still append-only. The commands run as an operator runs them (processes of their own, against a real hub, a
real controller, real PostgreSQL and the real Docker engine)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import docker
import httpx
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from examples.images import EXAMPLE_IMAGE
from hub import backup
from hub.db import Database
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api, stopped_after

ROOT = Path(__file__).resolve().parents[1]


def mmanager(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MMANAGER_DATABASE_URL": db_url,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mmanager.cli", "db", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


async def wipe(db_url: str) -> None:
    """The data lost: every table gone."""
    url = make_url(db_url)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                 database=url.database)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def state(hub: httpx.Client) -> dict[str, Any]:
    """What the admin sees: every service, controller and operation, by id."""
    return {
        "services": sorted((s["id"], s["name"], s["controller_id"]) for s in hub.get("/api/services").json()),
        "controllers": sorted(c["id"] for c in hub.get("/api/admin/controllers").json()),
        "operations": sorted((o["id"], o["status"]) for o in hub.get("/api/admin/operations").json()),
    }


def test_backup_delete_restore_brings_everything_back(
    pg_server: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    db_url = asyncio.run(create_database(pg_server, "backup"))
    dep = LocalDeployment(db_url, tmp_path, extra_hub_env={"MMANAGER_RATE_LIMIT": "0"})
    dep.plan_hubs(1)
    dep.add_controller("a")
    token = dep.create_admin()
    dep.start()
    with stopped_after(dep, request, docker_client):
        hub = api(dep.hub().url, token)
        wait_until(lambda: [c for c in hub.get("/api/admin/controllers").json() if c["status"] == "healthy"], 20,
                   "the controller healthy")
        alice = hub.post("/api/admin/users", json={"username": "alice"})
        assert alice.status_code == 201, alice.text
        alice_token = alice.json()["token"]
        spec = {"image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"cpu_limit": 0.25, "memory_limit": "32MB"}}
        for owner, who in (("root", hub), ("alice", api(dep.hub().url, alice_token))):
            created = who.post(f"/api/{owner}/lab/services", json={**spec, "name": f"{owner}-svc"})
            assert created.status_code == 201, created.text
        before = state(hub)
        assert len(before["services"]) == 2 and before["controllers"] and before["operations"]

        dump = tmp_path / "hub.dump"
        done = mmanager(db_url, "backup", str(dump))
        assert done.returncode == 0, done.stderr
        assert dump.read_bytes().startswith(b"PGDMP")

        # A live hub on the database: refused, nothing touched.
        refused = mmanager(db_url, "restore", str(dump))
        assert refused.returncode == 2
        assert "hub replica(s) are running" in refused.stderr and "stop every hub" in refused.stderr
        assert state(hub) == before

        dep.hubs[0].stop()
        asyncio.run(wipe(db_url))
        done = mmanager(db_url, "restore", str(dump))
        assert done.returncode == 0, done.stderr
        assert "restored" in done.stderr

        dep.hubs[0].start().wait_listening(30)
        assert state(hub) == before
        assert api(dep.hub().url, alice_token).get("/api/me").json()["username"] == "alice"
        # The restored hub still drives the services it knows: the controller's containers are its own.
        for service_id, _, _ in before["services"]:
            assert hub.get(f"/api/services/{service_id}/status").json()["status"] == "running"


async def test_a_restore_is_at_head_and_keeps_the_audit_log_append_only(pg_server: str, tmp_path: Path) -> None:
    source = await create_database(pg_server, "live")
    await asyncio.to_thread(backup.upgrade, source)
    db = Database(source)
    try:
        async with db.session() as session:
            await session.execute(text(
                "INSERT INTO audit_log (at, source, actor, method, path, status_code, result, details) "
                "VALUES (now(), 'hub', 'alice', 'POST', '/api/alice/r/services', 201, 'ok', '{}')"))
    finally:
        await db.dispose()
    dump = tmp_path / "mmanager.dump"
    await asyncio.to_thread(backup.backup, source, dump)
    target = await create_database(pg_server, "restored")
    await asyncio.to_thread(lambda: backup.restore(target, dump))

    restored = Database(target)
    try:
        async with restored.session() as session:
            assert (await session.execute(text("SELECT actor FROM audit_log"))).scalars().all() == ["alice"]
            heads = (await session.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        with pytest.raises(DBAPIError, match="append-only"):
            async with restored.session() as session:
                await session.execute(text("DELETE FROM audit_log"))
    finally:
        await restored.dispose()
    assert heads == [ScriptDirectory.from_config(Config("alembic.ini")).get_current_head()]


async def contents(db_url: str) -> dict[str, Any]:
    """What a database holds, as comparable values: every table of ``public`` with its columns and rows, its
    indexes, its triggers, and the schema's other objects (types, functions)."""
    url = make_url(db_url)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                 database=url.database)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        return {
            "tables": {t: sorted(repr(tuple(r)) for r in await conn.fetch(f'SELECT * FROM public."{t}"'))
                       for t in tables},
            "columns": [tuple(r) for r in await conn.fetch(
                "SELECT table_name, column_name, data_type, is_nullable, column_default FROM "
                "information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position")],
            "indexes": sorted(r["indexdef"] for r in await conn.fetch(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")),
            "triggers": sorted(tuple(r) for r in await conn.fetch(
                "SELECT event_object_table, trigger_name, event_manipulation, action_statement "
                "FROM information_schema.triggers WHERE trigger_schema = 'public'")),
            "types": sorted(r["typname"] for r in await conn.fetch(
                "SELECT typname FROM pg_type WHERE typnamespace = 'public'::regnamespace")),
            "functions": sorted(r["proname"] for r in await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")),
        }
    finally:
        await conn.close()


async def sql(db_url: str, statements: str) -> None:
    db = Database(db_url)
    try:
        async with db.session() as session:
            for statement in statements.split(";\n"):
                await session.execute(text(statement))
    finally:
        await db.dispose()


AUDIT_ROW = ("INSERT INTO audit_log (at, source, actor, method, path, status_code, result, details) "
             "VALUES (now(), 'hub', '{actor}', 'POST', '/api/x', 201, 'ok', '{{}}')")


def head() -> str | None:
    return ScriptDirectory.from_config(Config("alembic.ini")).get_current_head()


async def test_a_restore_over_a_newer_database_is_the_dump_and_nothing_else(pg_server: str, tmp_path: Path) -> None:
    # A dump of an older version (before the jobs' tables), restored over a database at head that holds
    # other rows, a newer version's tables and objects no dump names: the result is what the same dump
    # restored into an empty database is.
    older = await create_database(pg_server, "older")
    await asyncio.to_thread(backup.upgrade, older, "0011")
    await sql(older, AUDIT_ROW.format(actor="alice"))
    dump = tmp_path / "older.dump"
    await asyncio.to_thread(backup.backup, older, dump)

    live = await create_database(pg_server, "head")
    await asyncio.to_thread(backup.upgrade, live)
    await sql(live, AUDIT_ROW.format(actor="bob") + ";\n"
              "CREATE TABLE leftover (x int);\nCREATE TYPE leftover_mood AS ENUM ('ok')")
    await asyncio.to_thread(backup.restore, live, dump)

    empty = await create_database(pg_server, "empty")
    await asyncio.to_thread(backup.restore, empty, dump)
    restored = await contents(live)
    assert restored == await contents(empty)
    assert "leftover" not in restored["tables"] and "leftover_mood" not in restored["types"]
    assert [row for row in restored["tables"]["audit_log"] if "'bob'" in row] == []
    assert restored["tables"]["alembic_version"] == [repr((head(),))]


async def test_a_restore_that_fails_changes_nothing(
    pg_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await create_database(pg_server, "source")
    await asyncio.to_thread(backup.upgrade, source)
    await sql(source, "INSERT INTO audit_log (at, source, actor, method, path, status_code, result, details) "
              "SELECT now(), 'hub', md5(n::text), 'POST', '/api/x', 201, 'ok', '{}' FROM generate_series(1, 20000) n")
    dump = tmp_path / "whole.dump"
    await asyncio.to_thread(backup.backup, source, dump)
    live = await create_database(pg_server, "live")
    await asyncio.to_thread(backup.upgrade, live)
    await sql(live, AUDIT_ROW.format(actor="bob"))
    before = await contents(live)

    # Cut short: pg_restore writes the schema's SQL and part of the audit log's rows (the bulk of the dump),
    # then fails on the missing rest; no COMMIT follows it.
    data = dump.read_bytes()
    cut = tmp_path / "cut.dump"
    cut.write_bytes(data[: len(data) * 3 // 4])
    assert await asyncio.to_thread(backup.dump_revision, cut) == head()
    with pytest.raises(backup.BackupError, match="(?s)pg_restore failed.*the database is as it was"):
        await asyncio.to_thread(backup.restore, live, cut)
    assert await contents(live) == before

    # psql refuses a statement of the dump half way (a role this server does not have).
    await sql(source, "CREATE ROLE mm_gone;\nGRANT SELECT ON audit_log TO mm_gone")
    granting = tmp_path / "granting.dump"
    await asyncio.to_thread(backup.backup, source, granting)
    await sql(source, "REVOKE SELECT ON audit_log FROM mm_gone;\nDROP ROLE mm_gone")
    with pytest.raises(backup.BackupError, match="(?s)psql failed.*mm_gone.*the database is as it was"):
        await asyncio.to_thread(backup.restore, live, granting)
    assert await contents(live) == before

    # A newer version's dump: refused before anything is touched.
    await sql(source, "UPDATE alembic_version SET version_num = '9999'")
    newer = tmp_path / "newer.dump"
    await asyncio.to_thread(backup.backup, source, newer)
    with pytest.raises(backup.BackupError, match="at revision 9999, which this hub does not know"):
        await asyncio.to_thread(backup.restore, live, newer)
    assert await contents(live) == before

    # Migrations that fail after the restore: a clear error, not a traceback.
    def broken(url: str) -> None:
        raise CommandError("a migration failed")

    monkeypatch.setattr(backup, "upgrade", broken)
    with pytest.raises(backup.BackupError, match="restored .*but migrating it to head failed: a migration failed"):
        await asyncio.to_thread(backup.restore, live, dump)


def test_the_tools_get_libpq_urls_and_the_password_only_in_their_environment() -> None:
    target = backup.target("postgresql+asyncpg://hub:s3cr%40t@db-host:5433/mmanager?ssl=require")
    assert target.url == "postgresql://hub@db-host:5433/mmanager?sslmode=require"
    assert target.env["PGPASSWORD"] == "s3cr@t"
    # asyncpg's and SQLAlchemy's own parameters mean nothing to libpq, which refuses any it does not know.
    target = backup.target("postgresql+asyncpg://hub@db/mm?ssl=true&prepared_statement_cache_size=0"
                           "&command_timeout=60&timeout=2.5&target_session_attrs=read-write")
    assert target.url == "postgresql://hub@db/mm?connect_timeout=3&sslmode=require&target_session_attrs=read-write"
    with pytest.raises(backup.BackupError, match="ssl=sometimes .* none of libpq's sslmode values"):
        backup.target("postgresql+asyncpg://hub@db/mm?ssl=sometimes")
    with pytest.raises(backup.BackupError, match="backups are for PostgreSQL"):
        backup.target("sqlite+aiosqlite:///dev.db")


def test_clear_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql+asyncpg://hub@127.0.0.1:1/mmanager"
    not_a_dump = tmp_path / "notes.txt"
    not_a_dump.write_text("hello")
    with pytest.raises(backup.BackupError, match="is not a dump of `mmanager db backup`"):
        backup.restore(url, not_a_dump)
    with pytest.raises(backup.BackupError, match="cannot read"):
        backup.restore(url, tmp_path / "missing.dump")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(backup.BackupError, match="pg_dump is not installed.*postgresql-client"):
        backup.backup(url, tmp_path / "out.dump")
    assert not (tmp_path / "out.dump").exists()
