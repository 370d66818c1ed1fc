"""A throwaway PostgreSQL cluster for the tests.

``MMANAGER_TEST_DATABASE_URL`` (an asyncpg URL to a server where we may create
databases) wins when set. Otherwise a cluster is made with the server binaries
on this machine in a temporary directory; ``initdb`` refuses to run as root, so
as root the cluster belongs to the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from tests.support.net import free_port


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if candidates:
        return candidates[-1]
    raise RuntimeError(f"PostgreSQL's {name} is missing: `apt-get install postgresql` (make test does this)")


class LocalCluster:
    """A PostgreSQL cluster in a temporary directory, run by the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mmanager-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.prefix, *cmd], check=True, capture_output=True)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        subprocess.run([*self.prefix, _bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Yield a server URL ``postgresql+asyncpg://postgres@127.0.0.1:PORT/postgres``."""
    from_env = os.environ.get("MMANAGER_TEST_DATABASE_URL")
    if from_env:
        yield from_env
        return
    with local_cluster() as cluster:
        yield cluster.url


async def create_database(server_url: str, prefix: str = "mm") -> str:
    """Create a fresh, empty database on the server and return its asyncpg URL."""
    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database=url.database or "postgres"
    )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)

