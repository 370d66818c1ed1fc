"""Replica placement: replicas placed and committed per second, creates of many replicas each with ``?wait=false``.

A real hub process on a throwaway PostgreSQL cluster with fsync on, N simulated controllers
(``bench.sim``) registering by heartbeat, and C concurrent clients, each a user of its own,
sending ``POST /api/{user}/bench/services?wait=false`` back to back (``bench.placement``'s hub,
fleet and clients). A 202 comes once one transaction committed the service, its create operation
and a ``creating`` registry row for each of its replicas, each on a controller of its own: the
placement, committed, as Nomad counts its placements. The hub then makes the containers in the
background; the simulator's controllers record when each was started.

Measured per phase, over the window from the first request to the last 202: replicas placed a
second (the 202s times the replicas each) overall and as the median of whole seconds (the first
and last left out), the 202's p50/p99 and the CPU of the hub, PostgreSQL and this process. Then,
until every service runs or ``--start-bound`` passes: containers started a second (the simulator's
count) and the time until the last service was settled ``running``. Then the check, through the
database, the simulator and a sample of ``GET /api/services/{id}``: each service ``running`` with
exactly its replicas serving, each on its own controller (healthy, enabled, alive, of the right
type), at epochs 1..N, its container there at that epoch; no controller over its MAX_CONTAINERS;
no GPU held twice.

Two phases on one fleet, one after the other: the baseline, creates of one replica each (the
cost of a placement made one create at a time), then creates of ``--replicas`` each (one batch a
create); the ratio of their replicas a second is what the batch is worth.

    python -m bench.replica_placement [--controllers 10000] [--services 400] [--replicas 50] [--baseline-services 2000] [--profile [DIR]]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import durable_server, percentile, say
from bench.placement import (
    _client,
    _Creates,
    _rates,
    bench_hub,
    fleet,
    loads,
    make_users,
    measured,
    read_back,
    spec_for,
)
from bench.pyspy import print_summary, profile_dir
from bench.sim import Simulator

TARGET_PER_S = 2000


def _accepted(data: dict[str, Any], gpu: bool, owner: str) -> tuple[str, dict[str, Any]]:
    """A 202's service (the create operation's): its id and what the check needs."""
    return data["service_id"], {"gpu": gpu, "owner": owner, "operation": data["id"]}


def _median(buckets: list[int]) -> float:
    inner = buckets[1:-1] or buckets
    return statistics.median(inner) if inner else 0


async def _settled(conn: asyncpg.Connection, prefix: str) -> tuple[int, int]:
    """Of the phase's services: those settled ``running``, and those given up (``lost``, ``failed``)."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'running') AS running, "
        "count(*) FILTER (WHERE status IN ('lost', 'failed')) AS given_up FROM model_services WHERE name LIKE $1",
        prefix + "%")
    assert row is not None
    return row["running"], row["given_up"]


async def verify(conn: asyncpg.Connection, sim: Simulator, creates: _Creates, replicas: int, *,
                 hub_url: str | None = None, token: str | None = None, sample: int = 20) -> dict[str, Any]:
    """The phase's services checked against the database, the simulator and (a sample) the API; the
    problems, by kind, and what the placement looks like."""
    ids = list(creates.ok)
    services = {r["id"]: r for r in await conn.fetch(
        "SELECT id, status, replicas, (spec->'resources'->>'gpu_count')::int AS gpu_count FROM model_services "
        "WHERE id = ANY($1)", ids)}
    rows = await conn.fetch(
        "SELECT service_id, controller_id, container_id, epoch, status, serving, gpu_devices::text AS gpus "
        "FROM container_registry WHERE service_id = ANY($1) AND status NOT IN ('stale', 'draining')", ids)
    # Every live row of the fleet, this phase's and the others': the caps and the GPUs are the fleet's.
    fleet = await conn.fetch("SELECT controller_id, gpu_devices::text AS gpus FROM container_registry "
                             "WHERE status NOT IN ('stale', 'draining')")
    controllers = {r["id"]: r for r in await conn.fetch(
        "SELECT id, status, server_type, enabled, draining, max_containers FROM mmanager_controllers")}
    bad: collections.Counter[str] = collections.Counter()
    bad["answered 202, not in the table"] = len(set(ids) - set(services))
    by_service: dict[str, list[asyncpg.Record]] = collections.defaultdict(list)
    for r in rows:
        by_service[r["service_id"]].append(r)
    for sid, service in services.items():
        if service["status"] != "running":
            bad[f"service {service['status']}"] += 1
        own = by_service.get(sid, [])
        serving = [r for r in own if r["serving"]]
        if service["replicas"] != replicas or len(serving) != replicas or len(own) != replicas:
            bad[f"not {replicas} rows, all serving"] += 1
        if len({r["controller_id"] for r in own}) != len(own):
            bad["two replicas on one controller"] += 1
        if sorted(r["epoch"] for r in own) != list(range(1, replicas + 1)):
            bad[f"epochs not 1..{replicas}"] += 1
        wants_gpu = bool(service["gpu_count"])
        for r in own:
            controller, simulated = controllers.get(r["controller_id"]), sim.controllers.get(r["controller_id"])
            if controller is None or simulated is None:
                bad["on an unknown controller"] += 1
                continue
            if r["status"] != "running":
                bad[f"replica {r['status']}"] += 1
            if not simulated.alive:
                bad["on a dead controller"] += 1
            if controller["status"] != "healthy" or not controller["enabled"] or controller["draining"]:
                bad[f"on a controller {controller['status']}"] += 1
            if wants_gpu != (controller["server_type"] == "gpu"):
                bad["wrong server type"] += 1
            if len(json.loads(r["gpus"] or "[]")) != (service["gpu_count"] or 0):
                bad["wrong GPU count"] += 1
            container = simulated.containers.get(r["container_id"] or "")
            if container is None or container.service_id != sid or container.epoch != r["epoch"] \
                    or container.status != "running":
                bad["container not there at its epoch"] += 1
    per_controller: collections.Counter[str] = collections.Counter()
    gpus_taken: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in fleet:
        per_controller[r["controller_id"]] += 1
        for g in json.loads(r["gpus"] or "[]"):
            gpus_taken[(r["controller_id"], str(g))] += 1
    bad["GPU held twice"] = sum(1 for n in gpus_taken.values() if n > 1)
    bad["controller over its cap (rows)"] = sum(
        1 for cid, n in per_controller.items() if cid in controllers and n > controllers[cid]["max_containers"])
    bad["controller over its cap (containers)"] = sum(
        1 for c in sim.controllers.values() if len(c.containers) > c.max_containers)
    if hub_url and token:
        for _, status, read in await read_back(hub_url, token, ids, sample):
            listed = read.get("replicas", []) if status == 200 else []
            if status != 200 or read["status"] != "running" or len(listed) != replicas \
                    or len({r["controller_id"] for r in listed}) != replicas \
                    or any(r["state"] != "running" for r in listed):
                bad["GET /api/services/{id} does not list them running"] += 1
    return {
        "services": len(services),
        "running": sum(1 for s in services.values() if s["status"] == "running"),
        "replica_rows": len(rows),
        **loads(n for cid, n in per_controller.items() if cid in sim.controllers),
        "api_sampled": min(sample, len(ids)) if hub_url and token else 0,
        "problems": {k: n for k, n in bad.items() if n},
    }


async def phase(name: str, hub_url: str, conn: asyncpg.Connection, sim: Simulator, admin_token: str,
                services: int, replicas: int, *, clients: int, gpu_share: float, max_seconds: float,
                start_bound: float, hub_pids: list[int], pg_pids: list[int],
                profile_out: Path | None = None) -> dict[str, Any]:
    """``services`` creates of ``replicas`` each by ``clients`` users, then their starts, then the check."""
    users = await make_users(hub_url, admin_token, [f"{name}{u}" for u in range(clients)])
    rng = random.Random(2)
    gpu = {i for i in range(services) if rng.random() < gpu_share}

    def spec(i: int, wants_gpu: bool) -> dict[str, Any]:
        return {**spec_for(i, wants_gpu), "name": f"{name}-s{i}", "replicas": replicas}

    creates = _Creates()
    say(f"{name}: {services} creates of {replicas} replicas by {clients} clients")
    async with measured(hub_pids, pg_pids, profile_out) as window:
        await asyncio.gather(*(
            _client(hub_url, user, token, list(range(n, services, clients)), gpu, window.start + max_seconds,
                    creates, spec=spec, query="?wait=false", expect=202, record=_accepted)
            for n, (user, token) in enumerate(users)))
    start, end = window.start, window.end
    placed = len(creates.ok) * replicas
    say(f"{name}: {len(creates.ok)} accepted ({placed} replicas) in {window.wall:.1f} s; waiting for the starts")

    # The starts: until every accepted service is settled (running, or given up) or the bound.
    running = given_up = 0
    starts_profile = profile_out.with_name(profile_out.stem + "-starts.pyspy") if profile_out else None
    async with measured(hub_pids, pg_pids, starts_profile) as starts:
        while time.monotonic() < end + start_bound:
            running, given_up = await _settled(conn, f"{name}-")
            if running + given_up >= len(creates.ok):
                break
            await asyncio.sleep(0.5)
    settled_at = starts.end
    ours = set(creates.ok)
    started = sorted(c.created_at for controller in sim.controllers.values()
                     for c in controller.containers.values() if c.service_id in ours)
    span = (started[-1] - started[0]) if len(started) > 1 else 0.0
    start_buckets, _ = _rates(started, started[0], started[-1]) if started else ([], 0.0)
    say(f"{name}: {len(started)} containers started, {running} services running after {settled_at - start:.1f} s")
    checked = await verify(conn, sim, creates, replicas, hub_url=hub_url, token=admin_token)
    buckets, overall = _rates(creates.done, start, end)
    return {
        "phase": name,
        "replicas_each": replicas,
        "services": services,
        "clients": clients,
        "accepted": len(creates.ok),
        "failed": dict(creates.failed),
        "window_s": round(window.wall, 2),
        "replicas_placed": placed,
        "placed_per_s_overall": round(overall * replicas, 1),
        "placed_per_s_median": _median(buckets) * replicas,
        "creates_per_s_by_second": buckets,
        "accept_p50_ms": round((percentile(creates.latencies, 0.5) or 0) * 1000, 1),
        "accept_p99_ms": round((percentile(creates.latencies, 0.99) or 0) * 1000, 1),
        "cpu_cores": {k: round(v, 2) for k, v in window.cores.items()},
        "started": len(started),
        "started_per_s_overall": round(len(started) / span, 1) if span else None,
        "started_per_s_median": _median(start_buckets),
        "started_by_second": start_buckets,
        "all_running_after_s": round(settled_at - start, 2) if running == len(creates.ok) else None,
        "services_running": running,
        "services_given_up": given_up,
        "start_cpu_cores": {k: round(v, 2) for k, v in starts.cores.items()},
        "check": checked,
        "profile": window.recording.summary(top=25) if window.recording is not None else None,
        "starts_profile": starts.recording.summary(top=25) if starts.recording is not None else None,
    }


async def measure(hub_url: str, db_url: str, admin_token: str, key: str, controllers: int,
                  phases: list[tuple[str, int, int]], *, clients: int = 32, gpu_share: float = 0.05,
                  gpu_servers: float = 0.2, max_seconds: float = 300.0, start_bound: float = 300.0,
                  hub_pids: list[int] | None = None, pg_pids: list[int] | None = None,
                  profile_out: Path | None = None, register_timeout: float | None = None,
                  sim_connections: int = 64, ramp: float | None = None) -> dict[str, Any]:
    """One fleet of ``controllers``, then each of ``phases`` (name, services, replicas each) in turn; the
    profile, if asked for, is of the last phase's window."""
    async with fleet(hub_url, db_url, key, controllers, f"rp{controllers}", gpu_servers=gpu_servers,
                     connections=sim_connections, ramp=ramp, register_timeout=register_timeout) as (conn, sim, healthy):
        runs = []
        for n, (name, services, replicas) in enumerate(phases):
            runs.append(await phase(
                name, hub_url, conn, sim, admin_token, services, replicas, clients=clients, gpu_share=gpu_share,
                max_seconds=max_seconds, start_bound=start_bound, hub_pids=hub_pids or [], pg_pids=pg_pids or [],
                profile_out=profile_out if n == len(phases) - 1 else None))
        failed_beats = sim.failures()
    return {"controllers": controllers, "healthy_at_start": healthy, "phases": runs,
            # Beats the simulated controllers sent in vain: a hub too busy to hear them takes them for lost.
            "failed_beats": failed_beats}


def _check(r: dict[str, Any]) -> str:
    wrong = {**r["check"]["problems"], **r["failed"]}
    return "; ".join(f"{what}: {n}" for what, n in wrong.items()) or "ok"


# The table's columns: each a heading and what a phase shows under it.
_COLUMNS: list[tuple[str, Any]] = [
    ("creates", lambda r, _: f"{r['accepted']} of {r['services']} × {r['replicas_each']}"),
    ("replicas placed", lambda r, _: r["replicas_placed"]),
    ("placed per s (median of seconds)", lambda r, _: f"**{r['placed_per_s_median']:g}**"),
    ("per s (overall)", lambda r, _: f"{r['placed_per_s_overall']:g}"),
    ("vs baseline", lambda r, base: f"{r['placed_per_s_median'] / max(base['placed_per_s_median'], 1e-9):.1f} ×"),
    ("202 p50 / p99", lambda r, _: f"{r['accept_p50_ms']} / {r['accept_p99_ms']} ms"),
    ("hub / postgres / sim+clients cores", lambda r, _: " / ".join(str(v) for v in r["cpu_cores"].values())),
    ("started per s (median / overall)", lambda r, _: f"{r['started_per_s_median']:g} / {r['started_per_s_overall']}"),
    ("all running after", lambda r, _: f"{r['all_running_after_s']} s" if r["all_running_after_s"] is not None
     else f"{r['services_running']} of {r['accepted']} running"),
    ("check", lambda r, _: _check(r)),
]


def _table(result: dict[str, Any]) -> None:
    base = result["phases"][0]
    print(f"\n{result['controllers']} controllers ({result['healthy_at_start']} healthy at the start)")
    print("| " + " | ".join(heading for heading, _ in _COLUMNS) + " |")
    print("|" + "---|" * len(_COLUMNS))
    for r in result["phases"]:
        print("| " + " | ".join(str(show(r, base)) for _, show in _COLUMNS) + " |")
    for r in result["phases"]:
        if r.get("profile"):
            print_summary(r["profile"], f"hub profile, {r['phase']} window", own=None, inclusive=None)
        if r.get("starts_profile"):
            print_summary(r["starts_profile"], f"hub profile, {r['phase']} starts", own=None, inclusive=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controllers", type=int, default=10000)
    parser.add_argument("--services", type=int, default=400, help="creates of --replicas each")
    parser.add_argument("--replicas", type=int, default=50)
    parser.add_argument("--baseline-services", type=int, default=2000,
                        help="creates of one replica each, measured first (0: none)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients, each a user of its own")
    parser.add_argument("--gpu-share", type=float, default=0.05, help="share of services asking for one GPU each")
    parser.add_argument("--interval", type=float, default=30.0, help="MMANAGER_HEARTBEAT_INTERVAL")
    parser.add_argument("--grace", type=float, default=90.0, help="MMANAGER_HEARTBEAT_GRACE")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="at most this long per window of creates")
    parser.add_argument("--start-bound", type=float, default=300.0,
                        help="at most this long after a window for its services to be running")
    parser.add_argument("--connections", type=int, default=2048, help="the simulator's connections to the hub")
    parser.add_argument("--profile", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                        help="py-spy on the hub during the window of the creates of --replicas")
    parser.add_argument("--hub-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of the hub's for the run (to see what a part costs), again for more")
    parser.add_argument("--out", type=Path, default=Path("bench/results/replica_placement.json"))
    parser.add_argument("--workdir", type=Path, help="keep the hub's logs here (default: a temporary folder)")
    args = parser.parse_args()
    phases = [("one", args.baseline_services, 1)] if args.baseline_services else []
    phases.append(("many", args.services, args.replicas))
    # Each user's creates, replicas counted (the quota counts every replica).
    quota = max((args.services // args.clients + 1) * args.replicas, args.baseline_services // args.clients + 1)
    with ExitStack() as stack:
        server, pg_pids = durable_server(stack)
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mm-bench-rp-")))
        profiles = profile_dir(args.profile, workdir)
        env = {"MMANAGER_MAX_SERVICES_PER_USER": str(quota), "MMANAGER_MAX_REPLICAS": str(max(args.replicas, 64)),
               **dict(setting.split("=", 1) for setting in args.hub_env)}
        with bench_hub(server, workdir, interval=args.interval, grace=args.grace, env=env) as (dep, hub, token, db):
            assert hub.popen is not None
            result = asyncio.run(measure(
                hub.url, db, token, dep.key, args.controllers, phases, clients=args.clients,
                gpu_share=args.gpu_share, max_seconds=args.max_seconds, start_bound=args.start_bound,
                sim_connections=args.connections, hub_pids=[hub.popen.pid], pg_pids=pg_pids,
                profile_out=profiles / "replica-placement.pyspy" if profiles else None))
    result.update(clients=args.clients, interval_s=args.interval, gpu_share=args.gpu_share,
                  target_per_s=TARGET_PER_S, hub_env=args.hub_env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["phases"]:
        print(json.dumps({k: v for k, v in r.items()
                          if k not in ("profile", "starts_profile", "creates_per_s_by_second", "started_by_second")}), flush=True)
    _table(result)


if __name__ == "__main__":
    main()
