"""The gateway against calling the container directly, at ``--connections`` (32) connections.

A hub, one controller and one gateway (``mmanager gateway serve``: HAProxy) as real processes on real
PostgreSQL and Docker, running the example model service (busybox httpd, which closes each connection
after its answer). Each phase sends GETs of ``/health`` back to back on ``--connections`` connections
for ``--seconds`` (after a warm-up): ``direct`` to the port the container publishes, ``gateway`` to
the service's gateway URL (``/s/{owner}/{name}/health``, keep-alive to HAProxy, which opens a
connection to the container per request, as the direct client must). The phases alternate
(direct, gateway, direct, gateway, …, ``--rounds`` each) so that drift hits both alike; reported: the
median of each phase's requests per second and p50/p99, the gateway's added p50 (goal ≤ 1 ms) and its
throughput ratio (goal ≥ 0.9). Results: ``bench/results/gateway.json``.

    python -m bench.gateway [--seconds 5] [--connections 32] [--rounds 3]
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
from urllib.parse import urlparse

import docker
import httpx

from bench.common import percentile, say, scratch
from examples.images import EXAMPLE_IMAGE, build_example_image
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api

SPEC: dict[str, Any] = {"name": "bench", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
                        "health_check": {"path": "/health", "port": 5000, "interval": 1},
                        "rate_limit_per_minute": 0, "resources": {"cpu_limit": 1.0, "memory_limit": "64MB"}}
RESULTS = Path(__file__).parent / "results" / "gateway.json"


async def _connection(host: str, port: int, request: bytes, until: float, warm_until: float,
                      latencies: list[float], errors: list[str]) -> None:
    """Back-to-back requests on one connection, opened again whenever the server closes it."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while (started := time.perf_counter()) < until:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {name.strip().lower(): value.strip() for name, _, value in
                       (line.partition(b":") for line in head.split(b"\r\n")[1:])}
            await reader.readexactly(int(headers[b"content-length"]))
            if head[9:12] != b"200":
                errors.append(head[:12].decode(errors="replace"))
            elif started >= warm_until:
                latencies.append(time.perf_counter() - started)
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def phase(url: str, connections: int, seconds: float, warmup: float) -> dict[str, Any]:
    parsed = urlparse(url)
    assert parsed.hostname and parsed.port
    request = f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors: list[str] = []
    now = time.perf_counter()
    await asyncio.gather(*(_connection(parsed.hostname, parsed.port, request, now + warmup + seconds, now + warmup,
                                       latencies, errors) for _ in range(connections)))
    return {"requests_per_s": len(latencies) / seconds, "p50_ms": 1000 * (percentile(latencies, 0.5) or 0),
            "p99_ms": 1000 * (percentile(latencies, 0.99) or 0), "errors": len(errors)}


def measure(workdir: Path, db_url: str, *, seconds: float, connections: int, rounds: int) -> dict[str, Any]:
    dep = LocalDeployment(db_url, workdir, extra_hub_env={"MMANAGER_RATE_LIMIT": "0"})
    dep.plan_hubs(1)
    dep.add_controller("c1", max_containers=4)
    gateway = dep.add_gateway()
    token = dep.create_admin()
    dep.start()
    try:
        with api(dep.hub().url, token) as hub:
            created = hub.post("/api/root/bench/services", json=SPEC)
            assert created.status_code == 201, created.text
            service = created.json()
            wait_until(lambda: hub.get(f"/api/services/{service['id']}").json()["url"].startswith(gateway.url),
                       30, "the service's URL at the gateway")
            url = hub.get(f"/api/services/{service['id']}").json()["url"] + "health"
        direct = f"http://127.0.0.1:{service['endpoint']['ports']['5000']}/health"
        wait_until(lambda: httpx.get(url).status_code == 200, 30, "the gateway answering for the service")
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        for _ in range(rounds):
            for name, target in (("direct", direct), ("gateway", url)):
                result = asyncio.run(phase(target, connections, seconds, min(1.0, seconds / 5)))
                say(f"{name}: {result['requests_per_s']:.0f}/s p50 {result['p50_ms']:.2f} ms "
                    f"p99 {result['p99_ms']:.2f} ms errors {result['errors']}")
                runs[name].append(result)
    finally:
        dep.stop(docker.from_env())
    med = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
           for name, results in runs.items()}
    return {"connections": connections, "seconds": seconds, "rounds": rounds, "runs": runs, "median": med,
            "added_p50_ms": med["gateway"]["p50_ms"] - med["direct"]["p50_ms"],
            "throughput_ratio": med["gateway"]["requests_per_s"] / med["direct"]["requests_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    build_example_image(docker.from_env())
    with ExitStack() as stack:
        server, workdir = scratch(stack, "mm-bench-gateway-")
        db_url = asyncio.run(create_database(server, "bench"))
        result = measure(workdir / "run", db_url, seconds=args.seconds, connections=args.connections,
                         rounds=args.rounds)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    say(f"added p50 {result['added_p50_ms']:.2f} ms (goal ≤ 1), throughput ratio {result['throughput_ratio']:.2f} "
        f"(goal ≥ 0.9); {RESULTS}")


if __name__ == "__main__":
    main()
