"""Failover benchmark: from the moment a controller dies to every one of its
services running and healthy elsewhere.

Real processes (a hub and three controllers started with ``mmanager``), real
PostgreSQL (a throwaway cluster, or MMANAGER_BENCH_DATABASE_URL), the real
Docker engine. Each run deploys N services with an HTTP health check, kills -9
the controller holding the most of them and ``docker kill``s its containers
(the server is gone), then watches the hub's API every 50 ms.

Reported per scenario, over all moved services of all runs: p50 and max of the
time to running+healthy elsewhere, p50 of the time to running elsewhere (the
new copy started, before its first health check), the time until the hub marked the
controller lost, and, as the baseline measured in the same run, how long a
plain create of one such service takes until healthy (the floor below which no
failover can go once the loss is detected).

``--presence both`` runs each scenario twice, with the controllers' presence
streams (controller.presence: a dead process is detected at once) and without
(``MMANAGER_PRESENCE=false``: the grace alone detects it), side by side.

    python -m bench.failover [--services 24] [--runs 3] [--presence on|off|both] [--scenario 1s]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import docker

from bench.common import scratch
from examples.images import EXAMPLE_IMAGE, build_example_image
from hub.schemas import ServiceOut
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk

SPEC = {
    "image": EXAMPLE_IMAGE,
    "ports": {"5000": None},
    "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"},
    "health_check": {"path": "/health", "port": 5000, "interval": 1},
}
SCENARIOS = {"defaults (2 s heartbeat, 6 s grace)": (2.0, 6.0), "1 s heartbeat, 3 s grace": (1.0, 3.0)}


def ready(service: ServiceOut, avoid: str) -> bool:
    return service.status == "running" and service.health == "healthy" and service.controller_id != avoid


def one_run(db_url: str, workdir: Path, interval: float, grace: float, n: int,
            docker_client: docker.DockerClient, presence: bool = True) -> dict[str, Any]:
    dep = LocalDeployment(db_url, workdir, interval=interval, grace=grace,
                          extra_controller_env={"MMANAGER_PRESENCE": str(presence).lower()})
    dep.plan_hubs(1)
    for name in ("alpha", "beta", "gamma"):
        dep.add_controller(name)
    token = dep.create_admin()
    try:
        dep.start()
        client = sdk(dep.hub(0).url, token)
        wait_until(lambda: all(c.status == "healthy" for c in client.controllers.list()), 30)
        # Baseline: one plain create, until its health check passes.
        started = time.monotonic()
        base = client.services.create({**SPEC, "name": "baseline"}, owner="root", repo="bench")
        wait_until(lambda: client.services.get(base.id).health == "healthy", 60, interval=0.05)
        baseline = time.monotonic() - started
        client.services.delete(base.id)

        services = [client.services.create({**SPEC, "name": f"svc-{i}"}, owner="root", repo="bench")
                    for i in range(n)]
        wait_until(lambda: all(s.health == "healthy" for s in client.services.list(limit=1000)), 60)
        victim = collections.Counter(s.controller_id for s in services).most_common(1)[0][0]
        assert victim is not None
        moving = {s.id for s in services if s.controller_id == victim}

        dep.controllers[victim].kill()
        died = time.monotonic()
        for c in docker_client.containers.list(filters={"label": f"mmanager.controller={victim}"}):
            c.kill()
        done: dict[str, float] = {}
        running: dict[str, float] = {}
        lost_at = None
        while len(done) < len(moving) and time.monotonic() - died < 120:
            now = time.monotonic() - died
            for s in client.services.list(limit=1000):
                if s.id in moving and s.id not in running and s.status == "running" and s.controller_id != victim:
                    running[s.id] = now
                if s.id in moving and s.id not in done and ready(s, victim):
                    done[s.id] = now
            if lost_at is None and client.controllers.get(victim).status == "unhealthy":
                lost_at = now
            time.sleep(0.05)
        if len(done) < len(moving):
            raise RuntimeError(f"only {len(done)} of {len(moving)} services came back:\n{dep.logs()}")
        return {"moved": len(moving), "times": sorted(done.values()), "running": sorted(running.values()),
                "detected": lost_at, "baseline": baseline}
    finally:
        dep.stop(docker_client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--presence", choices=("on", "off", "both"), default="on",
                        help="the controllers' presence streams (MMANAGER_PRESENCE), or each scenario both ways")
    parser.add_argument("--scenario", default="", help="only the scenarios whose label contains this")
    parser.add_argument("--out", type=Path, default=Path("bench/results/failover.json"))
    args = parser.parse_args()
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.presence]
    docker_client = docker.from_env()
    build_example_image(docker_client, EXAMPLE_IMAGE)
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        server, workdir = scratch(stack)
        for (scenario, (interval, grace)), presence in itertools.product(SCENARIOS.items(), modes):
            if args.scenario not in scenario:
                continue
            label = f"{scenario}, {'presence' if presence else 'no presence'}"
            runs = []
            for r in range(args.runs):
                db_url = asyncio.run(create_database(server, "bench"))
                runs.append(one_run(db_url, workdir / f"{interval}-{presence}-{r}", interval, grace, args.services,
                                    docker_client, presence))
                print(f"{label} run {r + 1}: {runs[-1]['moved']} services, running after "
                      f"{min(runs[-1]['running']):.2f}s, max {max(runs[-1]['times']):.2f}s to healthy", flush=True)
            times = [t for run in runs for t in run["times"]]
            results[label] = {
                "interval": interval,
                "grace": grace,
                "presence": presence,
                "running_p50_s": round(statistics.median(t for run in runs for t in run["running"]), 2),
                "runs": args.runs,
                "services_per_run": args.services,
                "moved": sum(run["moved"] for run in runs),
                "p50_s": round(statistics.median(times), 2),
                "max_s": round(max(times), 2),
                "detected_p50_s": round(statistics.median(run["detected"] for run in runs if run["detected"]), 2),
                "baseline_create_p50_s": round(statistics.median(run["baseline"] for run in runs), 2),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| scenario | services moved | running elsewhere (p50) | healthy (p50) | healthy (max) "
          "| lost detected (p50) | baseline: one create to healthy (p50) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['moved']} | {r['running_p50_s']} s | {r['p50_s']} s | {r['max_s']} s "
              f"| {r['detected_p50_s']} s | {r['baseline_create_p50_s']} s |")


if __name__ == "__main__":
    main()
