"""A heartbeat's cost in the usage monitor, with alerts open on other controllers.

Every heartbeat (and every poll) goes through ``hub.services.monitoring.Monitor.observe``: the
controller's readings (its disk, each running container's CPU and memory) judged against the open
alerts, and each container's usage exported as Prometheus series. In a lab with full disks, thousands of
alerts can be open at once. This measures one call, in process and without a database (``observe``
touches none; ``flush`` writes): a controller with two running containers whose report opens and
resolves nothing, a new stats sample every fifth report (a controller samples every 10 s and beats
every 2 s, by default), with N alerts open on other controllers (loaded as a hub loads them from the
table); the median over 7 repeats of ``--calls`` calls each. Baseline: no alert open, in the same run.
Results: ``bench/results/monitor_observe.json``.

    python -m bench.monitor_observe [--open 0,100,1000,10000] [--calls 2000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import timeit
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from hub.config import HubSettings
from hub.metrics import HubMetrics
from hub.services.monitoring import AlertKey, Monitor, Reading
from mmanager.wire import (
    ContainerUsage,
    ControllerHealth,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    HeartbeatContainer,
)

RESULTS = Path(__file__).parent / "results" / "monitor_observe.json"


def _report(sampled_at: datetime) -> tuple[ControllerHealth, list[HeartbeatContainer]]:
    """What a controller with two running containers reports, all of it under every threshold."""
    health = ControllerHealth(
        status="healthy", server_id="beating", server_type="cpu", version="bench", docker=True,
        containers=HealthContainers(running=2, max_allowed=20), load_percentage=30, memory_usage_percent=40,
        resources=HealthResources(cpu_cores=8, memory_total_gb=32, memory_available_gb=20),
        capabilities=HealthCapabilities(gpu_support=False, max_memory_gb=32), disk_usage_percent=50,
    )
    usage = ContainerUsage(sampled_at=sampled_at, cpu_percent=20, memory_bytes=1 << 30, memory_percent=10)
    containers = [HeartbeatContainer(container_id=f"k{i}", name=f"svc-{i}", service_id=f"s{i}", state="running",
                                     usage=usage) for i in range(2)]
    return health, containers


def measure(open_alerts: int, calls: int, repeats: int = 7) -> dict[str, Any]:
    """Microseconds per ``observe`` of one controller, with ``open_alerts`` open on others."""
    settings = HubSettings(api_key=SecretStr("k" * 32), _env_file=None)
    monitor = Monitor(None, settings, HubMetrics())  # type: ignore[arg-type]  # observe never reads the database
    others: dict[AlertKey, Reading] = {
        ("disk", f"full-{i:05d}", None): Reading(("disk", f"full-{i:05d}", None), 95.0) for i in range(open_alerts)}
    monitor._reloaded(others)
    # Two samples, five reports each: every fifth report brings a new one.
    now = datetime.now(UTC)
    reports = [_report(now)] * 5 + [_report(now + timedelta(seconds=10))] * 5
    current = {c.container_id for c in reports[0][1]}
    cycle = itertools.cycle(reports)

    def observe() -> None:
        health, containers = next(cycle)
        monitor.observe("beating", health, containers, current)

    times = timeit.repeat(observe, number=calls, repeat=repeats)
    # The report opened and resolved nothing, and left the others' alerts as they were.
    assert {key for alerts in monitor._active.values() for key in alerts} == others.keys()
    assert not monitor._to_open and not monitor._to_resolve
    return {"open_alerts": open_alerts, "us_per_observe": round(statistics.median(times) / calls * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open", default="0,100,1000,10000", help="open alerts on other controllers, comma-separated")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    runs = [measure(int(n), args.calls) for n in args.open.split(",")]
    base = runs[0]["us_per_observe"]
    print(f"| open alerts elsewhere | µs per observe | × baseline ({runs[0]['open_alerts']} open) |")
    print("|---|---|---|")
    for run in runs:
        run["x_baseline"] = round(run["us_per_observe"] / base, 2)
        print(f"| {run['open_alerts']:,} | {run['us_per_observe']} | {run['x_baseline']} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"calls": args.calls, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
