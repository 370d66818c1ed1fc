"""What every benchmark script shares: its progress lines, its percentiles, its database address."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tests.support.pg import LocalCluster, local_cluster


def say(line: str) -> None:
    """A progress line, on stderr (stdout carries the results)."""
    print(line, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """The value at quantile ``q`` (nearest rank, no interpolation); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def post_request(port: int, path: str, payload: Any) -> bytes:
    """A whole HTTP/1.1 POST of ``payload`` as JSON to 127.0.0.1:``port``, encoded once, to send as it is."""
    body = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    """Send a prepared request on a keep-alive connection and read its answer's body; a load generator's
    whole cost per call, so that on a machine it shares with the server it takes little of the cores."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if head[9:12] != b"200":
        raise RuntimeError(f"an answer other than 200: {head[:300]!r}")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return await reader.readexactly(length)


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+asyncpg://…``) as asyncpg's own connect() takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, ``kill``) stops this benchmark as Ctrl-C does: its ExitStack stops the hubs,
    controllers and throwaway PostgreSQL cluster it started (an orphaned hub went on retrying its moves on
    most of a core, with 2 GiB, after the benchmark was gone)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def scratch(stack: ExitStack, prefix: str = "mm-bench-", database: bool = True) -> tuple[str, Path]:
    """The PostgreSQL server to measure on (MMANAGER_BENCH_DATABASE_URL, or a throwaway cluster; "" without
    ``database``: the caller has one) and a temporary folder for the run, both closed with ``stack`` (also
    when stopped by SIGTERM)."""
    exit_on_sigterm()
    server = ""
    if database:
        server = os.environ.get("MMANAGER_BENCH_DATABASE_URL") or stack.enter_context(local_cluster()).url
    return server, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def durable_server(stack: ExitStack) -> tuple[str, list[int]]:
    """The PostgreSQL server to measure on, and its postmaster's pid (for its CPU): MMANAGER_BENCH_DATABASE_URL,
    or a throwaway cluster closed with ``stack``, with fsync turned back on (the test cluster runs without
    it; a commit the hub answers for must be durable). Stopped by SIGTERM, it is closed too."""
    exit_on_sigterm()
    from_env = os.environ.get("MMANAGER_BENCH_DATABASE_URL")
    if from_env:
        return from_env, []
    cluster = stack.enter_context(local_cluster())
    asyncio.run(_fsync_on(cluster.url))
    return cluster.url, [postmaster_pid(cluster)]


def postmaster_pid(cluster: LocalCluster) -> int:
    """The pid of a throwaway cluster's server process (its backends are its children)."""
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


async def _fsync_on(server_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute("ALTER SYSTEM SET fsync = on")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
