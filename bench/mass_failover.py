"""Mass failover: kill 10 % of the controllers at once; how long until every affected service runs elsewhere.

A real hub process (``mmanager hub serve``) on a throwaway PostgreSQL cluster, seeded
(``bench.seed``) with S services on N simulated controllers (``bench.sim``), which start beating
at the hub's interval with the containers the database says they run. Once every controller
beats, ``--kill`` of them (every N/K-th) die at once (``Simulator.kill``: no more heartbeats,
connections dropped). A poller reads ``model_services`` and ``mmanager_controllers`` every 100 ms
on its own connection and records, per affected service, the time from the kill until it is
``running`` on another controller, and per killed controller the time until the hub marked it
lost (``unhealthy``). Then it checks the outcome: every affected service runs on a live
controller at a new epoch, the simulator holds exactly one copy of it there (the one the
database names), no service is left on a dead controller, and no other service moved.

The baseline, measured in the same run, is the small size (100 controllers, 10 killed).

    python -m bench.mass_failover [--sizes 100:200:10,10000:20000:1000] [--interval 2] [--grace 6]
        [--connections 2048] [--workdir DIR] [--profile [--profile-raw FILE]]

``--profile`` records the hub with py-spy (``bench.pyspy``) from the kill until the last service is
back, at the largest size, and prints where its time went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.common import asyncpg_dsn, exit_on_sigterm, percentile, postmaster_pid, say
from bench.heartbeats import _Cpu
from bench.pyspy import Recording
from bench.seed import Seeded, all_beating, seeded_hub
from bench.sim import Simulator
from tests.support.pg import local_cluster

POLL_EVERY = 0.1


def _pct(values: list[float], q: float) -> float | None:
    """A percentile in seconds, to the millisecond."""
    value = percentile(values, q)
    return None if value is None else round(value, 3)


def victims(seeded: Seeded, kill: int) -> list[str]:
    """``kill`` controllers spread evenly over the fleet."""
    step = max(len(seeded.controllers) // kill, 1)
    return seeded.controllers[::step][:kill]


async def outcome(conn: asyncpg.Connection, sim: Simulator, seeded: Seeded, dead: set[str]) -> dict[str, Any]:
    """What the kill left: per service, where the database says it runs against what the simulator runs."""
    rows = {r["id"]: r for r in await conn.fetch(
        "SELECT id, status, controller_id, container_id, epoch FROM model_services")}
    live_copies: dict[str, list[tuple[str, str, int | None]]] = {}
    for controller in sim.controllers.values():
        if controller.id in dead:
            continue
        for c in controller.containers.values():
            if c.service_id is not None and c.status == "running":
                live_copies.setdefault(c.service_id, []).append((controller.id, c.id, c.epoch))
    affected = {sid for sid, cid in seeded.placement.items() if cid in dead}
    problems: list[str] = []
    for sid, home in seeded.placement.items():
        row = rows.get(sid)
        if row is None:
            problems.append(f"{sid}: gone from the database")
            continue
        copies = live_copies.get(sid, [])
        expected = [(row["controller_id"], row["container_id"], row["epoch"])]
        if row["status"] != "running" or row["controller_id"] in dead:
            problems.append(f"{sid}: {row['status']} on {row['controller_id']}")
        elif copies != expected:
            problems.append(f"{sid}: the database says {expected}, live controllers run {copies}")
        elif sid in affected and row["epoch"] < 2:
            problems.append(f"{sid}: moved without a new epoch")
        elif sid not in affected and (row["controller_id"], row["epoch"]) != (home, 1):
            problems.append(f"{sid}: moved although its controller lives")
    lost = await conn.fetchval("SELECT count(*) FROM mmanager_controllers WHERE id = ANY($1::text[]) "
                               "AND status = 'unhealthy'", sorted(dead))
    return {"affected": len(affected), "problems": len(problems), "examples": problems[:5],
            "services_in_database": len(rows), "controllers_marked_lost": lost,
            "copies_on_live_controllers": sum(len(v) for v in live_copies.values())}


async def measure(hub_url: str, db_url: str, sim: Simulator, seeded: Seeded, kill: int, *,
                  beat_timeout: float = 120.0, recover_timeout: float = 300.0, profile: Recording | None = None,
                  pid: int | None = None, pg_pids: list[int] | None = None) -> dict[str, Any]:
    """Start ``sim``, wait until every controller beats, kill ``kill`` of them, time the recovery
    (and, with the hub's ``pid``, the CPU the hub used from the kill until the last service was back)."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        began = time.time()
        async with sim:
            ready = await all_beating(conn, seeded.controllers, began, beat_timeout)
            # One more interval: the first-beat wave is over.
            await asyncio.sleep(max(c.interval for c in sim.controllers.values()))
            dead = victims(seeded, kill)
            dead_set = set(dead)
            affected = sorted(sid for sid, cid in seeded.placement.items() if cid in dead_set)
            say(f"{len(seeded.controllers)} controllers beating after {ready:.1f}s; killing {len(dead)} "
                 f"({len(affected)} services)")
            if profile is not None:
                profile.start()
            cpu_before = _cpu(pid)
            # The rest of this 2-core machine's load meanwhile: the simulator (this process) and PostgreSQL.
            pg_cpu, sim_cpu_before = _Cpu(pg_pids or []), time.process_time()
            killed_at = time.time()
            sim.kill(dead)
            back: dict[str, float] = {}
            marked: dict[str, float] = {}
            deadline = time.monotonic() + recover_timeout
            while (len(back) < len(affected) or len(marked) < len(dead)) and time.monotonic() < deadline:
                now = time.time() - killed_at
                for r in await conn.fetch("SELECT id, status, controller_id FROM model_services "
                                          "WHERE id = ANY($1::text[])", affected):
                    if r["id"] not in back and r["status"] == "running" and r["controller_id"] not in dead_set:
                        back[r["id"]] = now
                for r in await conn.fetch("SELECT id FROM mmanager_controllers WHERE id = ANY($1::text[]) "
                                          "AND status = 'unhealthy'", dead):
                    marked.setdefault(r["id"], now)
                await asyncio.sleep(POLL_EVERY)
            cpu_used = _cpu(pid) - cpu_before
            others = {"simulator": time.process_time() - sim_cpu_before, "postgres": pg_cpu.used()}
            if profile is not None:
                profile.stop()
            # Stale-copy cleanup and heartbeats settle: the moved copies' controllers report them.
            await asyncio.sleep(max(c.interval for c in sim.controllers.values()) * 2)
            result = await outcome(conn, sim, seeded, dead_set)
            result["failed_beats"] = sim.failures()
            operations: dict[str, int] = {r[0]: r[1] for r in await conn.fetch(
                "SELECT operation || ':' || status, count(*) FROM container_operations "
                "WHERE operation <> 'create' GROUP BY 1")}
    finally:
        await conn.close()
    times = list(back.values())
    return {
        "controllers": len(seeded.controllers), "services": seeded.services, "killed": len(dead),
        "beating_after_s": round(ready, 1),
        "recovered": len(back), "not_recovered": len(affected) - len(back),
        "recovery_p50_s": _pct(times, 0.5), "recovery_p99_s": _pct(times, 0.99),
        "recovery_max_s": round(max(times), 3) if times else None,
        "marked_lost_first_s": _pct(list(marked.values()), 0.0),
        "marked_lost_p50_s": _pct(list(marked.values()), 0.5),
        "marked_lost_max_s": round(max(marked.values()), 3) if marked else None,
        "after_lost_to_last_back_s": round(max(times) - max(marked.values()), 3) if times and marked else None,
        "hub_cpu_s": round(cpu_used, 2),
        "simulator_cpu_s": round(others["simulator"], 2),
        "postgres_cpu_s": round(others["postgres"], 2) if pg_pids else None,
        "operations": {k: int(v) for k, v in operations.items()},
        **result,
    }


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _size(text: str) -> tuple[int, int, int]:
    count, services, kill = (int(x) for x in text.split(":"))
    return count, services, kill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100:200:10,10000:20000:1000",
                        help="controllers:services:killed, comma-separated; the first is the baseline")
    parser.add_argument("--interval", type=float, default=2.0, help="MMANAGER_HEARTBEAT_INTERVAL")
    parser.add_argument("--grace", type=float, default=6.0, help="MMANAGER_HEARTBEAT_GRACE")
    parser.add_argument("--healthy-after", type=float, default=0.2,
                        help="seconds from a container's start to its health check passing")
    parser.add_argument("--profile", action="store_true", help="py-spy on the hub during the largest recovery")
    parser.add_argument("--connections", type=int, default=2048,
                        help="the simulator's connections to the hub, for all heartbeats (real controllers have one "
                             "each: too few, and beats queue in the simulator until they time out)")
    parser.add_argument("--workdir", type=Path, help="keep the hubs' logs there (default: a temporary directory)")
    parser.add_argument("--profile-raw", type=Path, help="keep py-spy's raw (collapsed) samples there")
    parser.add_argument("--out", type=Path, default=Path("bench/results/mass_failover.json"))
    args = parser.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {"interval_s": args.interval, "grace_s": args.grace,
                               "healthy_after_s": args.healthy_after, "runs": []}
    exit_on_sigterm()
    with ExitStack() as stack:
        pg_pids: list[int] = []
        server = os.environ.get("MMANAGER_BENCH_DATABASE_URL")
        if not server:
            cluster = stack.enter_context(local_cluster())
            server, pg_pids = cluster.url, [postmaster_pid(cluster)]
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mm-bench-failover-")))
        for count, services, kill in sizes:
            with seeded_hub(server, workdir / str(count), count, services, interval=args.interval,
                            grace=args.grace, healthy_after=args.healthy_after) as hub:
                say(f"seeded {services} services on {count} controllers in {hub.seed_seconds:.1f}s")
                recording = (Recording(hub.pid, args.profile_raw or workdir / "profile.txt", rate=100)
                             if args.profile and count == max(s[0] for s in sizes) else None)
                run = asyncio.run(measure(hub.url, hub.db_url, hub.simulator(connections=args.connections), hub.seeded, kill,
                                          beat_timeout=60 + count / 50, profile=recording, pid=hub.pid,
                                          pg_pids=pg_pids))
                if recording is not None:
                    results["profile"] = {"controllers": count, **recording.summary(25)}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    base = results["runs"][0]
    for run in results["runs"]:
        if run["recovery_p50_s"] and base["recovery_p50_s"]:
            run["p50_vs_baseline"] = round(run["recovery_p50_s"] / base["recovery_p50_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nheartbeat interval {args.interval:g} s, grace {args.grace:g} s, health check passes "
          f"{args.healthy_after:g} s after a start; baseline: {base['controllers']} controllers")
    print("| controllers | services | killed | affected | back p50 / p99 / max | × baseline (p50) "
          "| marked lost p50 / max | lost → last back | CPU kill → last back: hub / postgres / simulator "
          "| problems |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['controllers']} | {r['services']} | {r['killed']} | {r['affected']} "
              f"| {r['recovery_p50_s']} / {r['recovery_p99_s']} / {r['recovery_max_s']} s "
              f"| {r.get('p50_vs_baseline')} | {r['marked_lost_p50_s']} / {r['marked_lost_max_s']} s "
              f"| {r['after_lost_to_last_back_s']} s | {r['hub_cpu_s']} / {r.get('postgres_cpu_s')} / "
              f"{r.get('simulator_cpu_s')} s | {r['problems']} |")
    if "profile" in results:
        prof = results["profile"]
        print(f"\nhub profile during the recovery at {prof['controllers']} controllers ({prof['samples']} samples, "
              "py-spy --gil):")
        for label in ("inclusive", "self", "packages"):
            print(f"{label}:")
            for item in prof[label]:
                print(f"  {100 * item['share']:5.1f}  {item.get('function') or item.get('package')}")


if __name__ == "__main__":
    main()
