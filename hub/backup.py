"""Backing up and restoring the hub's database (``mmanager db backup`` / ``db restore``).

The hub's whole state is its PostgreSQL database, so a backup is ``pg_dump -Fc`` of it and a restore is
``pg_restore --clean --if-exists --no-owner`` into it, in one transaction, then the migrations up to head
(a dump of an older version is brought up to this one). Both take ``MMANAGER_DATABASE_URL`` as every
hub-side command does, turned into libpq's form; the password goes to the tools through ``PGPASSWORD``,
never on a command line another user's ``ps`` could read.

A restore replaces every table, so it is refused while a hub replica is live on the database (a row of
``hub_replicas`` seen within ``LIVE_REPLICA``): a running hub would write into tables being replaced, and
would then serve a state it no longer holds. ``force`` skips that check, for a replica that died without
removing its row.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from hub.db import Database
from hub.migrate import upgrade
from hub.models import HubReplicaModel, utcnow

# A replica beats every second or less (hub.background.leader), and removes its row when it stops.
LIVE_REPLICA = timedelta(seconds=30)
# What a custom-format dump starts with.
_MAGIC = b"PGDMP"


class BackupError(Exception):
    """A backup or restore that did not happen; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """A database as the PostgreSQL tools take it: a libpq URL without the password, and their environment."""

    url: str
    env: dict[str, str]


def target(database_url: str) -> Target:
    url = make_url(database_url)
    if not url.drivername.startswith("postgresql"):
        raise BackupError(f"backups are for PostgreSQL; {url.drivername} is not (a dev SQLite database is one "
                          "file: copy it while the hub is stopped)")
    env = {**os.environ}
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    query = dict(url.query)
    if "ssl" in query:
        # asyncpg's ssl= takes libpq's sslmode values.
        query["sslmode"] = query.pop("ssl")
    # (URL.set cannot unset a password: None there means "keep it".)
    plain = url._replace(drivername="postgresql", password=None).set(query=query)
    return Target(plain.render_as_string(hide_password=False), env)


def backup(database_url: str, file: Path) -> None:
    """A consistent online dump of the database into ``file`` (written whole or not at all)."""
    db = target(database_url)
    partial = file.with_name(file.name + ".partial")
    try:
        # Which hub processes run is no state to restore: a restored row would pass for a live replica.
        _run("pg_dump", ["-Fc", "--exclude-table-data=hub_replicas", "-f", str(partial), "-d", db.url], db.env)
        partial.replace(file)
    finally:
        partial.unlink(missing_ok=True)


def restore(database_url: str, file: Path, *, force: bool = False) -> None:
    """Replace the database's content with the dump's, then migrate it to head. Refused while a hub replica
    is live on it unless ``force``; a restore that fails midway changes nothing (one transaction)."""
    db = target(database_url)
    try:
        with file.open("rb") as dump:
            if dump.read(len(_MAGIC)) != _MAGIC:
                raise BackupError(f"{file} is not a dump of `mmanager db backup` (pg_dump -Fc)")
    except OSError as exc:
        raise BackupError(f"cannot read {file}: {exc.strerror}") from None
    if not force:
        live = asyncio.run(live_replicas(database_url))
        if live:
            raise BackupError(
                f"{len(live)} hub replica(s) are running on this database ({', '.join(live)}): stop every hub "
                "first (a hub writing into tables being replaced would serve a state it no longer holds); "
                "--force if they are already gone")
    _run("pg_restore", ["--clean", "--if-exists", "--no-owner", "--single-transaction", "-d", db.url, str(file)],
         db.env)
    upgrade(database_url)


async def live_replicas(database_url: str) -> list[str]:
    """``host:pid`` of each hub replica seen on the database within ``LIVE_REPLICA`` (none on an empty one)."""
    db = Database(database_url)
    try:
        async with db.session() as session:
            rows = await session.execute(select(HubReplicaModel.hostname, HubReplicaModel.pid)
                                         .where(HubReplicaModel.last_seen_at >= utcnow() - LIVE_REPLICA))
            return [f"{host}:{pid}" for host, pid in rows]
    except DBAPIError as exc:
        if "hub_replicas" in str(exc.orig) and "does not exist" in str(exc.orig):
            return []
        raise BackupError(f"cannot reach the database: {exc.orig}") from None
    except OSError as exc:
        raise BackupError(f"cannot reach the database: {exc}") from None
    finally:
        await db.dispose()


def _run(tool: str, args: list[str], env: dict[str, str]) -> None:
    path = shutil.which(tool)
    if path is None:
        raise BackupError(f"{tool} is not installed: install PostgreSQL's client tools of the server's major "
                          "version or newer (Debian: apt-get install postgresql-client)")
    done = subprocess.run([path, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    message = done.stderr.strip() or f"exit status {done.returncode}"
    if "version mismatch" in message or "unsupported version" in message:
        message += (f"\n{tool} is older than the server or the dump: install PostgreSQL's client tools of the "
                    "server's major version or newer")
    raise BackupError(f"{tool} failed: {message}")
