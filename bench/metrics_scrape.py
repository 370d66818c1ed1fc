"""What a Prometheus scrape of the hub's ``/metrics`` costs with a large fleet.

The hub's registry (``hub.metrics.HubMetrics``) filled as a fleet of ``N`` controllers and ``S`` services
fills it once it has run for a while: each controller's gauges (up, containers, load, memory, disk),
each service's health, each running container's seven usage gauges, and the hub's calls to each
controller (create, inspect, delete, list) timed in ``mmanager_controller_call_duration_seconds``.
Then the exposition the ``/metrics`` route answers (``hub.metrics.exposition``) is made
``--scrapes`` times: its median seconds (the hub's one core is busy for that long, every scrape, while
heartbeats and creates wait), its size, and its lines by metric family.

In process, no hub: the registry and its rendering are the hub's own; the numbers are what each scrape
adds to the hub's work. Prometheus scrapes every 15 s by default and gives up after 10 s.

    python -m bench.metrics_scrape [--sizes 100:1000,10000:100000] [--scrapes 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import generate_latest

import hub.metrics as hub_metrics
from bench.common import say
from hub.metrics import HubMetrics

CALLS = ("create", "inspect", "delete", "list")


def filled(controllers: int, services: int) -> HubMetrics:
    """The hub's metrics as a fleet of this size leaves them: every series a running hub would have set.
    (Through the hub's own calls, so that it also fills older code's metrics, for paired runs.)"""
    metrics = HubMetrics()
    wide = hasattr(metrics, "containers")
    # The older code's per-series gauges (the else branches) are not attributes of today's class.
    older: Any = metrics
    ids = [f"ctl-{i:05d}" for i in range(controllers)]
    for cid in ids:
        metrics.observe_controller(cid, True, services // max(1, controllers), 40.0, 55.5)
        if wide:
            metrics.controllers.set((cid,), disk=61.2)
        else:
            older.disk_usage_percent.labels(cid).set(61.2)
    health = {}
    for i in range(services):
        sid = f"{i:016x}"
        cid = ids[i % controllers]
        health[sid] = "healthy" if i % 10 else "unhealthy"
        labels = (cid, sid, f"mm-{sid}-1-{cid}")
        if wide:
            metrics.containers.set_all(labels, [12345.0] * len(metrics.containers.fields))
        else:
            for gauge in older.container_usage.values():
                gauge.labels(*labels).set(12345.0)
    metrics.set_service_health(health)
    by_controller = "controller" in metrics.controller_calls._labelnames  # as the hub's metrics name them
    for cid in ids:
        for call in CALLS:
            call_labels = {"call": call, "controller": cid} if by_controller else {"call": call}
            metrics.controller_calls.labels(**call_labels).observe(0.012)
    return metrics


def scrape(metrics: HubMetrics) -> bytes:
    """What the hub's ``/metrics`` answers, its database reads left out."""
    written = getattr(hub_metrics, "exposition", None)  # the route's own; older code, run for pairs, has none
    return written(metrics) if written is not None else generate_latest(metrics.registry)


def measure(controllers: int, services: int, scrapes: int) -> dict[str, Any]:
    began = time.perf_counter()
    metrics = filled(controllers, services)
    fill_s = time.perf_counter() - began
    rss = psutil.Process().memory_info().rss
    seconds, cpu = [], []
    text = b""
    for _ in range(scrapes):
        began, began_cpu = time.perf_counter(), time.process_time()
        text = scrape(metrics)
        seconds.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    families: collections.Counter[str] = collections.Counter()
    for line in text.split(b"\n"):
        if line and not line.startswith(b"#"):
            name = line.split(b"{", 1)[0].split(b" ", 1)[0].decode()
            for suffix in ("_bucket", "_count", "_sum", "_created", "_total"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            families[name] += 1
    return {
        "controllers": controllers,
        "services": services,
        "scrape_s_median": round(statistics.median(seconds), 3),
        "scrape_cpu_s_median": round(statistics.median(cpu), 3),
        "bytes": len(text),
        "fill_s": round(fill_s, 1),
        "rss_mib_after_fill": round(rss / 2**20),
        "series_lines": sum(families.values()),
        "lines_by_family": dict(families.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100:1000,10000:100000", help="controllers:services,…")
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/metrics_scrape.json"))
    args = parser.parse_args()
    runs = []
    for size in args.sizes.split(","):
        controllers, services = (int(x) for x in size.split(":"))
        result = measure(controllers, services, args.scrapes)
        runs.append(result)
        top = ", ".join(f"{name} {n:,}" for name, n in list(result["lines_by_family"].items())[:4])
        say(f"{controllers:,} controllers, {services:,} services: a scrape {result['scrape_s_median']} s "
            f"({result['bytes'] / 1e6:.1f} MB, {result['series_lines']:,} lines; most: {top})")
    base = runs[0]["scrape_s_median"]
    for run in runs:
        run["x_first_size"] = round(run["scrape_s_median"] / base, 1) if base else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scrapes": args.scrapes, "runs": runs}, indent=2) + "\n")
    say(f"results: {args.out}")


if __name__ == "__main__":
    main()
