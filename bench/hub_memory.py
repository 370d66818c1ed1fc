"""Hub memory: resident memory of a hub with N controllers and S services, at rest, under steady
heartbeats, and after its API has been read.

A real hub process (``mmanager hub serve``, as ``bench.heartbeats`` starts it) on a throwaway
PostgreSQL cluster seeded (``bench.seed``) with S running services on N simulated controllers
(``bench.sim``), which beat at the hub's interval with the containers the database says they run,
each running one with its stats sample (``--usage-every``: a new one every 10 s, as a real
controller's, so the hub keeps and exports every container's usage). Measured on the hub process
(psutil): RSS and USS (memory only this process holds) once every controller's heartbeat has been
recorded, then every 10 s over ``--steady`` seconds of beats (does it grow?), then after the API has
been read: every page of the service and controller lists, the first pages of containers and
operations, the fleet-wide resource usage and Prometheus targets, and ``/metrics`` (its size and
time; it carries series per controller).
The seed must cause no churn: over the steady window no operation is recorded and no service
changes (``bench.seed.churn``).

The baseline, measured in the same run, is the small size (100 controllers, 1,000 services).

    python -m bench.hub_memory [--sizes 100:1000,10000:100000] [--interval 2] [--steady 180]

With 10,000 controllers at the default 2 s interval the hub must take 5,000 heartbeats a second;
``--interval`` lengthens it for a hub that cannot (the value is in the results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from bench.common import asyncpg_dsn, say, scratch
from bench.seed import Seeded, all_beating, churn, seeded_hub, state
from bench.sim import Simulator

MIB = 1024**2
SAMPLE_EVERY = 10.0
PAGE = 1000


def memory(pid: int | None) -> dict[str, float]:
    """RSS and USS of ``pid`` in MiB (USS reads /proc/PID/smaps: a few ms)."""
    if pid is None:
        return {}
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mib": round(info.rss / MIB, 1), "uss_mib": round(info.uss / MIB, 1)}


async def read_api(hub_url: str, token: str, services: int, controllers: int) -> dict[str, Any]:
    """Read the API as an operator's dashboards would; per route: requests, seconds, bytes, all 200."""
    routes: dict[str, list[str]] = {
        "services": [f"/api/services?limit={PAGE}&offset={o}" for o in range(0, services, PAGE)],
        "controllers": [f"/api/admin/controllers?limit={PAGE}&offset={o}" for o in range(0, controllers, PAGE)],
        "containers": [f"/api/admin/containers?limit={PAGE}&offset={o}" for o in range(0, min(services, 10 * PAGE),
                                                                                         PAGE)],
        "operations": [f"/api/admin/operations?limit={PAGE}"],
        "resources_usage": ["/api/admin/resources/usage"],
        "prometheus_targets": ["/api/admin/prometheus/targets"],
        "metrics": ["/metrics"] * 3,
    }
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=hub_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=300) as client:
        for name, paths in routes.items():
            times, sizes, items = [], [], 0
            for path in paths:
                began = time.perf_counter()
                answer = await client.get(path)
                times.append(time.perf_counter() - began)
                if answer.status_code != 200:
                    raise AssertionError(f"GET {path}: {answer.status_code} {answer.text[:300]}")
                sizes.append(len(answer.content))
                if name in ("services", "controllers", "containers"):
                    items += len(answer.json())
            out[name] = {"requests": len(paths), "seconds": round(sum(times), 3),
                         "median_ms": round(statistics.median(times) * 1000, 1), "bytes": sum(sizes),
                         **({"items": items} if items else {})}
            if name == "metrics":
                out[name]["series"] = sum(1 for line in answer.text.splitlines() if line and line[0] != "#")
    return out


async def steady(db_url: str, sim: Simulator, seeded: Seeded, seconds: float, *, pid: int | None = None,
                 beat_timeout: float = 120.0) -> dict[str, Any]:
    """Start ``sim``, wait until every controller beats, then watch ``seconds`` of steady beats:
    the hub's memory (when ``pid`` is given) and what changed in the database (nothing should)."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        began = time.time()
        await sim.start()
        ready = await all_beating(conn, seeded.controllers, began, beat_timeout)
        at_ready = memory(pid)
        say(f"{len(seeded.controllers)} controllers beating after {ready:.1f}s: {at_ready}")
        before = await state(conn)
        samples = []
        window = time.monotonic()
        while (elapsed := time.monotonic() - window) < seconds:
            await asyncio.sleep(min(SAMPLE_EVERY, seconds - elapsed))
            samples.append({"t_s": round(time.monotonic() - window, 1), **memory(pid)})
        after = await state(conn)
        beats = {**sim.stats(), "failed_by_why": sim.failures()}
    finally:
        await conn.close()
    return {"beating_after_s": round(ready, 1), "at_ready": at_ready, "samples": samples,
            "churn": churn(before, after), "sim": beats}


async def measure(hub_url: str, db_url: str, sim: Simulator, seeded: Seeded, seconds: float, *,
                  pid: int | None = None, beat_timeout: float = 120.0) -> dict[str, Any]:
    try:
        run = await steady(db_url, sim, seeded, seconds, pid=pid, beat_timeout=beat_timeout)
        run["api"] = await read_api(hub_url, seeded.token, seeded.services, len(seeded.controllers))
        run["after_api"] = memory(pid)
    finally:
        await sim.stop()
    return {"controllers": len(seeded.controllers), "services": seeded.services, **run}


def _size(text: str) -> tuple[int, int]:
    count, services = (int(x) for x in text.split(":"))
    return count, services


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100:1000,10000:100000",
                        help="controllers:services, comma-separated; the first is the baseline")
    parser.add_argument("--interval", type=float, default=2.0, help="MMANAGER_HEARTBEAT_INTERVAL")
    parser.add_argument("--grace", type=float, help="MMANAGER_HEARTBEAT_GRACE (default: 3 intervals)")
    parser.add_argument("--steady", type=float, default=180.0, help="seconds of steady beats watched")
    parser.add_argument("--usage-every", type=float, default=10.0,
                        help="seconds between the stats samples of each container in the beats, as a real "
                             "controller sends them (0: no usage in the beats)")
    parser.add_argument("--connections", type=int, default=2048,
                        help="the simulator's connections to the hub, for all heartbeats (real controllers have one "
                             "each; 64 leaves beats waiting for one past their timeout)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hub_memory.json"))
    args = parser.parse_args()
    grace = args.grace or 3 * args.interval
    results: dict[str, Any] = {"interval_s": args.interval, "grace_s": grace, "steady_s": args.steady,
                               "usage_every_s": args.usage_every or None, "connections": args.connections, "runs": []}
    with ExitStack() as stack:
        server, workdir = scratch(stack, "mm-bench-memory-")
        for count, services in (_size(s) for s in args.sizes.split(",")):
            with seeded_hub(server, workdir / str(count), count, services, interval=args.interval, grace=grace,
                            hub_env={"MMANAGER_RATE_LIMIT": "0"}, usage_every=args.usage_every or None,
                            connections=args.connections) as hub:
                say(f"seeded {services} services on {count} controllers in {hub.seed_seconds:.1f}s; "
                     f"hub at start: {memory(hub.pid)}")
                at_start = memory(hub.pid)
                run = asyncio.run(measure(hub.url, hub.db_url, hub.simulator(), hub.seeded, args.steady,
                                          pid=hub.pid, beat_timeout=60 + count / 20))
                run["at_start"] = at_start
                run["seed_s"] = round(hub.seed_seconds, 1)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    base = results["runs"][0]
    for run in results["runs"]:
        last = run["samples"][-1] if run["samples"] else run["at_ready"]
        run["steady_growth_mib"] = round(last["rss_mib"] - run["at_ready"]["rss_mib"], 1)
        run["rss_vs_baseline"] = round(run["after_api"]["rss_mib"] / base["after_api"]["rss_mib"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nheartbeat interval {args.interval:g} s, {args.steady:g} s of steady beats; "
          f"baseline: {base['controllers']} controllers")
    print("| controllers | services | RSS at start | RSS all beating (USS) | RSS after steady (growth) "
          "| RSS after API reads (USS) | × baseline | /metrics size / time | churn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        last = r["samples"][-1] if r["samples"] else r["at_ready"]
        m = r["api"]["metrics"]
        print(f"| {r['controllers']} | {r['services']} | {r['at_start']['rss_mib']} MiB "
              f"| {r['at_ready']['rss_mib']} ({r['at_ready']['uss_mib']}) MiB "
              f"| {last['rss_mib']} MiB ({r['steady_growth_mib']:+}) "
              f"| {r['after_api']['rss_mib']} ({r['after_api']['uss_mib']}) MiB | {r['rss_vs_baseline']} "
              f"| {m['bytes'] / 3 / 1024:.0f} KiB / {m['median_ms']} ms | {r['churn']} |")


if __name__ == "__main__":
    main()
