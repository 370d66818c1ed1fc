"""API floor: authenticated status reads per second at 32 concurrent connections,
and what they cost the hub in CPU.

A hub and one controller as real processes started with ``mmanager``, real
PostgreSQL (a throwaway cluster, or MMANAGER_BENCH_DATABASE_URL), the real
Docker engine running the one service that is read; the hub's rate limit is
off for the run (MMANAGER_RATE_LIMIT=0). For each route, 32 keep-alive
connections send GETs back to back for ``--seconds`` (after a short warm-up);
every answer must be a 200. Measured per route: requests per second, p50 and
p99 latency, and the hub process's CPU time over the phase (psutil), hence
requests per second per hub core used. PostgreSQL's and the controller's CPU
are measured alongside, as is this load generator's own.

Routes, cheapest first, so the differences say what each layer costs:

- ``GET /docs``: no database, no authentication: the HTTP stack's floor;
- ``GET /health``: unauthenticated, one ``SELECT 1``: the baseline;
- ``GET /api/services/{id}``: the status read the issue's target is about
  (authentication, then the service as the hub knows it, kept current by the
  controller's heartbeats), every connection reading the same service;
- the same read, each connection reading a service of its own (as many
  services as connections): reads that come together share a statement
  (``hub.services.lifecycle.reads.Gathered``) but no row;
- ``GET /api/services/{id}/status``: the same, refreshed from the controller
  first (a call to the controller, which inspects the container in Docker,
  then a write): bounded by the controller and Docker, not by the hub.

The load generator is a minimal HTTP/1.1 client on asyncio streams (one fixed
request per route, Content-Length framed answers), several times cheaper per
request than httpx, so more of the two cores are left to the hub. With
``--profile`` (needs py-spy) the hub is sampled during an extra, untimed phase
per authenticated route and its busiest functions are listed.

    python -m bench.api_floor [--seconds 10] [--connections 32] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import docker
import psutil
from sqlalchemy.engine import make_url

from bench.common import scratch
from bench.pyspy import Recording, print_summary, profile_dir
from examples.images import EXAMPLE_IMAGE, build_example_image
from mmanager.client import ApiError
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk

SPEC: dict[str, Any] = {"image": EXAMPLE_IMAGE, "ports": {"5000": None},
                        "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}, "name": "read-me"}
TARGET_PER_CORE = 5000


class BadAnswer(Exception):
    pass


async def _one_connection(host: str, port: int, request: bytes, until: float, latencies: list[float],
                          warmup_until: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            started = time.perf_counter()
            if started >= until:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise BadAnswer(f"an answer without Content-Length: {head[:200]!r}")
            body = await reader.readexactly(length)
            if status != 200:
                raise BadAnswer(f"HTTP {status}: {body[:300]!r}")
            if started >= warmup_until:
                latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _load(url: str, path: str | list[str], token: str | None, connections: int, seconds: float,
                warmup: float, on_measure: Callable[[], None] = lambda: None) -> list[float]:
    """``connections`` loops of back-to-back GETs for ``warmup`` + ``seconds``; the latencies of the requests
    begun after the warm-up. ``on_measure`` is called when the measured window opens. Given several paths,
    connection i asks for path i (modulo their number)."""
    parsed = urlparse(url)
    assert parsed.hostname is not None and parsed.port is not None
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    paths = [path] if isinstance(path, str) else path
    requests = [(f"GET {p} HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\n{auth}"
                 "Accept: application/json\r\n\r\n").encode() for p in paths]
    latencies: list[float] = []
    now = time.perf_counter()
    warmup_until, until = now + warmup, now + warmup + seconds
    asyncio.get_running_loop().call_later(warmup, on_measure)
    await asyncio.gather(*(_one_connection(parsed.hostname, parsed.port, requests[i % len(requests)], until,
                                           latencies, warmup_until)
                           for i in range(connections)))
    return latencies


def _cpu(procs: Iterable[psutil.Process], children: bool = False) -> float:
    """CPU seconds of ``procs``; with ``children``, of all their descendants too, also those that ended
    (a server's forks: PostgreSQL's backends come and go with the hub's pool)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            descendants = p.children(recursive=True) if children else []
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
        if children:
            total += t.children_user + t.children_system
        for child in descendants:
            try:
                c = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += c.user + c.system
    return total


def _postgres(port: int) -> list[psutil.Process]:
    """The PostgreSQL postmaster listening on ``port`` (its backends are its children); none if not local."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return [psutil.Process(conn.pid)]
    return []


async def _pg_counters(db_url: str) -> dict[str, int]:
    """The database's sessions opened and transactions ended so far (pg_stat_database; PostgreSQL 14+)."""
    url = make_url(db_url)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                 database=url.database)
    try:
        row = await conn.fetchrow("SELECT sessions, xact_commit + xact_rollback AS transactions "
                                  "FROM pg_stat_database WHERE datname = current_database()")
    finally:
        await conn.close()
    assert row is not None  # pg_stat_database has a row for every database
    return {"sessions": row["sessions"], "transactions": row["transactions"]}


def phase(url: str, path: str | list[str], token: str | None, connections: int, seconds: float, warmup: float,
          procs: dict[str, list[psutil.Process]], db_url: str) -> dict[str, Any]:
    """One route under load; CPU per process group over the measured window (the warm-up left out), and
    what the requests cost PostgreSQL: connections opened and transactions, per request."""
    marks: list[tuple[float, dict[str, float]]] = []

    def mark() -> None:
        marks.append((time.perf_counter(), {name: _cpu(group, children=name == "postgres")
                                            for name, group in procs.items()}))

    hub = procs["hub"][0]
    hub_before = hub.cpu_times()
    pg_before = asyncio.run(_pg_counters(db_url))
    latencies = asyncio.run(_load(url, path, token, connections, seconds, warmup, on_measure=mark))
    mark()
    hub_after = hub.cpu_times()
    pg_after = asyncio.run(_pg_counters(db_url))
    (t0, before), (t1, after) = marks
    # Over the whole phase (warm-up too), so per request of the whole phase; our two counter reads left out.
    all_requests = len(latencies) * (warmup + seconds) / seconds
    wall = t1 - t0
    cores = {name: (after[name] - before[name]) / wall for name in procs}
    ordered = sorted(latencies)
    rps = len(latencies) / wall
    return {
        "path": path if isinstance(path, str) else f"{path[0]} … ({len(path)} services)",
        "requests": len(latencies),
        "requests_per_s": round(rps),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2),
        "cores_used": {name: round(v, 2) for name, v in cores.items()},
        "requests_per_s_per_hub_core": round(rps / cores["hub"]) if cores["hub"] > 0 else None,
        # The kernel's part of the hub's CPU (socket sends and receives, on loopback the peer's receive too).
        "hub_system_share": round((hub_after.system - hub_before.system)
                                  / max(1e-9, hub_after.system - hub_before.system + hub_after.user - hub_before.user), 2),
        "pg_connections_per_request": round((pg_after["sessions"] - pg_before["sessions"] - 1) / all_requests, 3),
        "pg_transactions_per_request": round(
            (pg_after["transactions"] - pg_before["transactions"] - 1) / all_requests, 2),
    }


def measure(db_url: str, workdir: Path, docker_client: docker.DockerClient, *, seconds: float = 10.0,
            warmup: float = 1.0, connections: int = 32, profile_dir: Path | None = None) -> dict[str, Any]:
    dep = LocalDeployment(db_url, workdir, extra_hub_env={
        "MMANAGER_RATE_LIMIT": "0", "MMANAGER_MAX_SERVICES_PER_USER": str(connections + 1)})
    dep.plan_hubs(1)
    ctl = dep.add_controller("alpha")
    token = dep.create_admin()
    try:
        dep.start()
        # The set-up through the SDK; the load itself is this module's own raw HTTP (its cost is measured).
        with sdk(dep.hub(0).url, token) as client:
            wait_until(lambda: client.controllers.get(ctl.name).status == "healthy", 30, what="the controller healthy")
            service_id = client.services.create(SPEC, owner="root", repo="bench").id
            # As many more as connections, one for each: reads of different services, which share no row.
            others = []
            for i in range(connections):
                try:
                    made = client.services.create({**SPEC, "name": f"read-me-{i}",
                                                   "resources": {**SPEC["resources"], "cpu_limit": 0.02}},
                                                  owner="root", repo="bench")
                except ApiError as exc:
                    raise BadAnswer(f"service {i} of {connections}: HTTP {exc.status}: {exc}") from exc
                others.append(f"/api/services/{made.id}")
        hub_popen = dep.hub(0).popen
        assert hub_popen is not None and ctl.popen is not None
        hub = psutil.Process(hub_popen.pid)
        pg_port = urlparse(db_url.replace("+asyncpg", "")).port or 5432
        # Each route's path, or paths read in turn, and its bearer token.
        routes: dict[str, tuple[str | list[str], str | None]] = {
            "docs": ("/docs", None),
            "health": ("/health", None),
            "service": (f"/api/services/{service_id}", token),
            "services": (others, token),
            "status": (f"/api/services/{service_id}/status", token),
        }
        results: dict[str, Any] = {"connections": connections, "seconds": seconds}
        for name, (path, auth) in routes.items():
            # PostgreSQL's backends as they are now: the hub's pool has opened its connections by the first phase.
            procs = {"hub": [hub], "postgres": _postgres(pg_port), "controller": [psutil.Process(ctl.popen.pid)],
                     "load generator": [psutil.Process()]}
            results[name] = phase(dep.hub(0).url, path, auth, connections, seconds, warmup, procs, db_url)
        if profile_dir is not None:
            results["profiles"] = {}
            for name in ("service", "status"):
                path, auth = routes[name]
                with Recording(hub.pid, profile_dir / f"api_floor-{name}.pyspy") as recording:
                    asyncio.run(_load(dep.hub(0).url, path, auth, connections, seconds, 0.0))
                results["profiles"][name] = recording.summary(top=20)
        return results
    finally:
        dep.stop(docker_client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--profile", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                        help="sample the hub with py-spy (an extra phase per route); keep the raw samples in DIR")
    parser.add_argument("--out", type=Path, default=Path("bench/results/api_floor.json"))
    args = parser.parse_args()
    docker_client = docker.from_env()
    build_example_image(docker_client, EXAMPLE_IMAGE)
    with ExitStack() as stack:
        server, workdir = scratch(stack)
        db_url = asyncio.run(create_database(server, "bench"))
        result = measure(db_url, workdir / "run", docker_client, seconds=args.seconds, connections=args.connections,
                         profile_dir=profile_dir(args.profile, workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.connections} connections, {args.seconds:g} s per route")
    print("\n| route | requests/s | p50 | p99 | hub cores | requests/s per hub core | postgres cores "
          "| controller cores | load generator cores | PG connections opened / request | PG transactions / request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("docs", "health", "service", "services", "status"):
        r = result[name]
        c = r["cores_used"]
        print(f"| `GET {r['path']}` | {r['requests_per_s']} | {r['p50_ms']} ms | {r['p99_ms']} ms | {c['hub']} "
              f"| **{r['requests_per_s_per_hub_core']}** | {c['postgres']} | {c['controller']} "
              f"| {c['load generator']} | {r['pg_connections_per_request']} | {r['pg_transactions_per_request']} |")
    per_core = result["service"]["requests_per_s_per_hub_core"]
    print(f"\nstatus reads (GET /api/services/{{id}}): {per_core} per hub core (target >= {TARGET_PER_CORE}); "
          f"ratio to /health: {result['service']['requests_per_s'] / result['health']['requests_per_s']:.2f}; "
          f"reads of {args.connections} services, one per connection: "
          f"{result['services']['requests_per_s_per_hub_core']} per hub core")
    for name, summary in result.get("profiles", {}).items():
        print_summary(summary, f"hub profile, {name}")


if __name__ == "__main__":
    main()
