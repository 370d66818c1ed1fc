"""The gateway: its cost against calling the container directly, an idle service's cold start against a
plain create, and a lost single copy's failover as a client of the gateway sees it.

A hub, one controller and one gateway (``mmanager gateway serve``: HAProxy) as real processes on real
PostgreSQL and Docker, running the example model service (busybox httpd, which closes each connection
after its answer). Each phase sends GETs of ``/health`` back to back on ``--connections`` connections
for ``--seconds`` (after a warm-up): ``direct`` to the port the container publishes, ``gateway`` to
the service's gateway URL (``/s/{owner}/{name}/health``, keep-alive to HAProxy, which opens a
connection to the container per request, as the direct client must). The phases alternate
(direct, gateway, direct, gateway, …, ``--rounds`` each) so that drift hits both alike; reported: the
median of each phase's requests per second and p50/p99, the gateway's added p50 (goal ≤ 1 ms) and its
throughput ratio (goal ≥ 0.9).

Then, ``--runs`` times each (medians): a create of the service (``?wait=true``: placed, started, healthy)
against its cold start once idle (the first request through the gateway, which wakes it, until its
answer); and a failover: the controller running the service's only copy is killed (``kill -9``, and its
container with ``docker kill``) while a client sends 200 requests a second through the gateway: the time
from the kill until a request sent after it is answered, and the requests that failed.
Results: ``bench/results/gateway.json``.

    python -m bench.gateway [--seconds 5] [--connections 32] [--rounds 3] [--runs 3]
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
from mmanager.client import Client
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk

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


def measure(workdir: Path, db_url: str, *, seconds: float, connections: int, rounds: int,
            runs: int) -> dict[str, Any]:
    dep = LocalDeployment(db_url, workdir, extra_hub_env={"MMANAGER_RATE_LIMIT": "0"})
    dep.plan_hubs(1)
    dep.add_controller("c1", max_containers=8)
    dep.add_controller("c2", max_containers=8)
    gateway = dep.add_gateway()
    token = dep.create_admin()
    dep.start()
    try:
        with sdk(dep.hub().url, token) as hub:
            service = hub.services.create(SPEC, owner="root", repo="bench")

            def at_gateway() -> str:
                url = hub.services.get(service.id).url or ""
                return url if url.startswith(gateway.url) else ""

            url = wait_until(at_gateway, 30, "the service's URL at the gateway") + "health"
        assert service.endpoint is not None
        direct = f"http://127.0.0.1:{service.endpoint.ports['5000']}/health"
        wait_until(lambda: httpx.get(url).status_code == 200, 30, "the gateway answering for the service")
        phases: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        for _ in range(rounds):
            for name, target in (("direct", direct), ("gateway", url)):
                result = asyncio.run(phase(target, connections, seconds, min(1.0, seconds / 5)))
                say(f"{name}: {result['requests_per_s']:.0f}/s p50 {result['p50_ms']:.2f} ms "
                    f"p99 {result['p99_ms']:.2f} ms errors {result['errors']}")
                phases[name].append(result)
        with sdk(dep.hub().url, token) as hub:
            hub.services.delete(service.id)
            cold = [cold_start(hub, gateway.url, i) for i in range(runs)]
            failovers = [failover(dep, hub, i) for i in range(runs)]
    finally:
        dep.stop(docker.from_env())
    med = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
           for name, results in phases.items()}
    create_s = statistics.median(c["create_s"] for c in cold)
    cold_s = statistics.median(c["cold_start_s"] for c in cold)
    return {"connections": connections, "seconds": seconds, "rounds": rounds, "runs": phases, "median": med,
            "added_p50_ms": med["gateway"]["p50_ms"] - med["direct"]["p50_ms"],
            "throughput_ratio": med["gateway"]["requests_per_s"] / med["direct"]["requests_per_s"],
            "cold": cold, "create_s": create_s, "cold_start_s": cold_s, "cold_over_create": cold_s / create_s,
            "failovers": failovers,
            "failover_back_s": statistics.median(f["back_s"] for f in failovers),
            "failover_failed": statistics.median(f["failed"] for f in failovers)}


def cold_start(hub: Client, gateway: str, i: int) -> dict[str, float]:
    started = time.monotonic()
    sid = hub.services.create({**SPEC, "name": f"cold{i}", "idle_timeout": 1}, owner="root", repo="bench").id
    create_s = time.monotonic() - started
    url = f"{gateway}/s/root/cold{i}/health"
    wait_until(lambda: httpx.get(url).status_code == 200, 30, "the gateway serving it")
    wait_until(lambda: hub.services.get(sid).status == "idle", 60, "the service idle")
    started = time.monotonic()
    answer = httpx.get(url, timeout=60)
    cold_s = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    hub.services.delete(sid)
    say(f"create {create_s:.2f}s, cold start through the gateway {cold_s:.2f}s")
    return {"create_s": create_s, "cold_start_s": cold_s}


def failover(dep: LocalDeployment, hub: Client, i: int) -> dict[str, float]:
    from tests.support.gateway import Load

    service = hub.services.create({**SPEC, "name": f"lost{i}"}, owner="root", repo="bench")
    assert service.controller_id is not None and service.container_id is not None
    url = f"{dep.gateways['gw'].url}/s/root/lost{i}/health"
    wait_until(lambda: httpx.get(url).status_code == 200, 30, "the gateway serving it")
    load = Load(url, rate=200, connections=8).start()
    try:
        wait_until(lambda: load.outcomes["200"] >= 100, 10, "the load flowing")
        victim = dep.controllers[service.controller_id]
        victim.kill()
        docker.from_env().containers.get(service.container_id).kill()
        killed = time.monotonic()
        wait_until(lambda: any(sent > killed for sent, _ in load.answered), 30, "an answer from the new copy")
    finally:
        load.stop()
    back = min(done for sent, done in load.answered if sent > killed) - killed
    victim.start().wait_listening()
    wait_until(lambda: hub.controllers.get(victim.name).status == "healthy", 30, "the killed controller back")
    hub.services.delete(service.id)
    say(f"failover: answered again {back:.2f}s after the kill, {load.failures} failed of {load.sent}")
    return {"back_s": back, "failed": load.failures, "sent": load.sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    build_example_image(docker.from_env())
    with ExitStack() as stack:
        server, workdir = scratch(stack, "mm-bench-gateway-")
        db_url = asyncio.run(create_database(server, "bench"))
        result = measure(workdir / "run", db_url, seconds=args.seconds, connections=args.connections,
                         rounds=args.rounds, runs=args.runs)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    say(f"added p50 {result['added_p50_ms']:.2f} ms (goal ≤ 1), throughput ratio {result['throughput_ratio']:.2f} "
        f"(goal ≥ 0.9); cold start {result['cold_start_s']:.2f}s against a create's {result['create_s']:.2f}s "
        f"({result['cold_over_create']:.2f}); a lost copy answered again after {result['failover_back_s']:.2f}s; "
        f"{RESULTS}")


if __name__ == "__main__":
    main()
