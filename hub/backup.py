"""Backing up and restoring the hub's database (``mmanager db backup`` / ``db restore``).

The hub's whole state is its PostgreSQL database (its ``public`` schema), so a backup is ``pg_dump -Fc`` of
it and a restore replaces that schema whole: ``psql`` drops and recreates ``public`` and runs the dump's
SQL (``pg_restore -f -``) in one transaction, committed only once ``pg_restore`` has written all of it, so a
restore that fails anywhere changes nothing, and nothing of the database it replaced (a newer version's
tables) is left beside the dump's. Then the migrations up to head (a dump of an older version is brought up
to this one); a dump of a revision this hub does not know is refused before anything is touched. Both take
``MMANAGER_DATABASE_URL`` as every hub-side command does, turned into libpq's form; the password goes to the
tools through ``PGPASSWORD``, never on a command line another user's ``ps`` could read.

A restore replaces every table, so it is refused while a hub replica is live on the database (a row of
``hub_replicas`` seen within ``LIVE_REPLICA``): a running hub would write into tables being replaced, and
would then serve a state it no longer holds. Ages are taken on the database's clock, the one every hub and
CLI host shares. ``force`` skips that check, for a replica that died without removing its row.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from hub.db import Database
from hub.migrate import alembic_config, upgrade
from hub.models import HubReplicaModel
from hub.outage import DatabaseUnreachable

# A replica beats every second or less (hub.background.leader), and removes its row when it stops.
LIVE_REPLICA = timedelta(seconds=30)
# What a custom-format dump starts with.
_MAGIC = b"PGDMP"
# What the hub's URL may carry that libpq takes under the same name (the rest are asyncpg's or SQLAlchemy's:
# a statement cache, a command timeout, and nothing the tools would understand).
_LIBPQ_SAME = ("passfile", "service", "target_session_attrs", "krbsrvname", "gsslib")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Run by psql before the dump's SQL, in the transaction that holds it. The schema goes whole, so that what a
# newer version of the hub made (a table, a type, a function) goes too; the dump makes all it holds again.
_REPLACE = b"""\\set ON_ERROR_STOP on
SET client_min_messages = warning;
BEGIN;
DROP SCHEMA IF EXISTS public CASCADE;
CREATE SCHEMA public;
"""


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
    given = dict(url.query)
    query = {key: given[key] for key in _LIBPQ_SAME if key in given}
    if "ssl" in given:
        # asyncpg's ssl= takes libpq's sslmode values; a boolean says "require" or "disable".
        mode = {"true": "require", "1": "require", "false": "disable", "0": "disable"}.get(
            str(given["ssl"]).lower(), str(given["ssl"]))
        if mode not in _SSLMODES:
            raise BackupError(f"ssl={given['ssl']} in the database URL is none of libpq's sslmode values "
                              f"({', '.join(_SSLMODES)})")
        query["sslmode"] = mode
    if "timeout" in given:
        # asyncpg's connect timeout, in seconds; libpq's takes whole ones.
        query["connect_timeout"] = str(max(1, math.ceil(float(str(given["timeout"])))))
    if "servicefile" in given:
        env["PGSERVICEFILE"] = str(given["servicefile"])
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
    is live on it unless ``force``, and for a dump of a revision this hub does not know; a restore that fails
    midway changes nothing (one transaction)."""
    db = target(database_url)
    try:
        with file.open("rb") as dump:
            if dump.read(len(_MAGIC)) != _MAGIC:
                raise BackupError(f"{file} is not a dump of `mmanager db backup` (pg_dump -Fc)")
    except OSError as exc:
        raise BackupError(f"cannot read {file}: {exc.strerror}") from None
    try:
        revision = dump_revision(file)
    except BackupError as exc:
        raise BackupError(f"{exc}\n{file} is not a whole dump; nothing was restored: the database is as it was") \
            from None
    scripts = ScriptDirectory.from_config(alembic_config(database_url))
    try:
        if revision is not None:
            scripts.get_revision(revision)
    except CommandError:
        raise BackupError(f"{file} is at revision {revision}, which this hub does not know (a dump of a newer "
                          f"version; this one's head is {scripts.get_current_head()}): restore it with that "
                          "version's mmanager; nothing was changed") from None
    if not force:
        live = asyncio.run(live_replicas(database_url))
        if live:
            raise BackupError(
                f"{len(live)} hub replica(s) are running on this database ({', '.join(live)}): stop every hub "
                "first (a hub writing into tables being replaced would serve a state it no longer holds); "
                "--force if they are already gone")
    _replace(db, file)
    try:
        upgrade(database_url)
    except (CommandError, SQLAlchemyError, OSError) as exc:
        raise BackupError(f"the dump was restored (at revision {revision}), but migrating it to head failed: "
                          f"{exc}\nfix the cause, then `mmanager db upgrade`") from None


def dump_revision(file: Path) -> str | None:
    """The alembic revision a dump is at (None: a dump of no migrated database)."""
    sql = _output("pg_restore", ["--data-only", "--table=alembic_version", "-f", "-", str(file)])
    # COPY's rows follow its line, one a line, up to "\.".
    found = re.search(r"^COPY \S*alembic_version .*FROM stdin;\n(.*?)\n", sql, re.MULTILINE)
    return found.group(1) if found and found.group(1) != "\\." else None


def _replace(db: Target, file: Path) -> None:
    """The dump's SQL, after ``_REPLACE``, into psql: a ``COMMIT`` follows only once pg_restore has written all
    of it. psql stops at the first error (ON_ERROR_STOP), and a session that ends without the COMMIT is rolled
    back, so every failure, of either tool, leaves the database as it was."""
    pg_restore, psql = _tool("pg_restore"), _tool("psql")
    with tempfile.TemporaryFile() as made_err, tempfile.TemporaryFile() as applied_err:
        applying = subprocess.Popen([psql, "-X", "-q", "-d", db.url], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=applied_err, env=db.env)
        making = subprocess.Popen([pg_restore, "--no-owner", "-f", "-", str(file)], stdout=subprocess.PIPE,
                                  stderr=made_err, env=db.env)
        assert applying.stdin is not None and making.stdout is not None
        stopped = False
        try:
            applying.stdin.write(_REPLACE)
            shutil.copyfileobj(making.stdout, applying.stdin, 1 << 20)
            if making.wait() == 0:
                applying.stdin.write(b"COMMIT;\n")
            applying.stdin.close()
        except BrokenPipeError:
            stopped = True  # psql stopped at an error (pg_restore then fails to write): psql's stderr says why.
        finally:
            making.stdout.close()
            made, applied = making.wait(), applying.wait()
        if applied != 0 or made != 0:
            # Whichever failed first; psql fails too when pg_restore's SQL ends half way.
            failure = (_failed("pg_restore", made, _text(made_err)) if made != 0 and not stopped
                       else _failed("psql", applied, _text(applied_err)))
            raise BackupError(f"{failure}\nnothing was restored: the database is as it was")


async def live_replicas(database_url: str) -> list[str]:
    """``host:pid`` of each hub replica seen on the database within ``LIVE_REPLICA`` (none on an empty one)."""
    db = Database(database_url)
    try:
        async with db.session() as session:
            rows = await session.execute(select(HubReplicaModel.hostname, HubReplicaModel.pid)
                                         .where(HubReplicaModel.last_seen_at >= func.now() - LIVE_REPLICA))
            return [f"{host}:{pid}" for host, pid in rows]
    except DBAPIError as exc:
        if "hub_replicas" in str(exc.orig) and "does not exist" in str(exc.orig):
            return []
        raise BackupError(f"cannot reach the database: {exc.orig}") from None
    except DatabaseUnreachable as exc:
        raise BackupError(f"cannot reach the database: {exc.__cause__ or exc}") from None
    finally:
        await db.dispose()


def _tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BackupError(f"{tool} is not installed: install PostgreSQL's client tools of the server's major "
                          "version or newer (Debian: apt-get install postgresql-client)")
    return path


def _run(tool: str, args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([_tool(tool), *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise _failed(tool, done.returncode, done.stderr)


def _output(tool: str, args: list[str]) -> str:
    done = subprocess.run([_tool(tool), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise _failed(tool, done.returncode, done.stderr)
    return done.stdout


def _text(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def _failed(tool: str, status: int, stderr: str) -> BackupError:
    message = stderr.strip() or f"exit status {status}"
    if "version mismatch" in message or "unsupported version" in message:
        message += (f"\n{tool} is older than the server or the dump: install PostgreSQL's client tools of the "
                    "server's major version or newer")
    return BackupError(f"{tool} failed: {message}")
