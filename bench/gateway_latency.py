"""What the gateway's latency histograms (gateway/latency.lua) cost: requests through HAProxy with and
without them, side by side in one run.

Three real HAProxy processes (Debian's 2.6): an upstream that answers every request itself
(``http-request return``, so no model server bounds the rate), and two gateways in front of it, the same
configuration (``--threads`` threads, one service backend with its ``set-var(txn.mm_service)``) except
that ``lua`` has the histogram's two rules (the start's ``set-var`` and the observation in
``http-after-response``) and ``plain`` has neither. ``--connections`` keep-alive connections send GETs
back to back for ``--seconds`` per phase (after a warm-up); the two gateways take turns, ``--rounds``
times, in a shuffled order each round, so that whatever else the machine does falls on both alike.
Measured per phase: requests per second, p50 and p99 latency, and the gateway process's CPU time per
request (psutil), the cost that stays when the load generator, not HAProxy, bounds the rate. The
medians over the rounds are reported. At the end the ``lua`` gateway's histogram must count every
request it answered.

    python -m bench.gateway_latency [--seconds 5] [--rounds 3] [--connections 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.common import exchange, exit_on_sigterm, percentile, say
from gateway import latency
from tests.support.haproxy import running_haproxy
from tests.support.net import free_port

UPSTREAM = """\
global
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend upstream
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string "ok"
"""

GATEWAY = """\
global
    nbthread {threads}
{load}
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend gateway
    bind 127.0.0.1:{port}
{start}
{observe}
    default_backend model
backend model
    {service_rule}
    server replica 127.0.0.1:{upstream}
frontend metrics
    bind 127.0.0.1:{metrics}
    http-request use-service prometheus-exporter if {{ path /metrics }}
{serve}
"""
LUA_LINES = {"load": "    " + latency.LOAD, "start": "    " + latency.START,
             "observe": "\n".join("    " + line for line in latency.OBSERVE), "serve": "    " + latency.SERVE}


async def _connection(port: int, until: float, measure_from: float, latencies: list[float], done: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /s/bench/model/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        while (started := time.perf_counter()) < until:
            await exchange(reader, writer, request)
            done[0] += 1
            if started >= measure_from:
                latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _load(port: int, connections: int, seconds: float, warmup: float) -> tuple[list[float], int, float]:
    """The latencies of the requests begun after the warm-up, every request answered, and the measured
    window's length."""
    latencies: list[float] = []
    done = [0]
    now = time.perf_counter()
    measure_from, until = now + warmup, now + warmup + seconds
    await asyncio.gather(*(_connection(port, until, measure_from, latencies, done) for _ in range(connections)))
    return latencies, done[0], seconds


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def phase(port: int, proc: psutil.Process, connections: int, seconds: float, warmup: float) -> dict[str, Any]:
    before = _cpu(proc)
    latencies, answered, window = asyncio.run(_load(port, connections, seconds, warmup))
    # CPU over the warm-up and the window, per request answered in both.
    cpu = _cpu(proc) - before
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    assert p50 is not None and p99 is not None
    return {"requests_per_s": round(len(latencies) / window), "p50_ms": round(p50 * 1000, 3),
            "p99_ms": round(p99 * 1000, 3), "gateway_cpu_us_per_request": round(cpu / answered * 1e6, 2),
            "answered": answered}


def observed(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}{latency.PATH}", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == latency.METRIC
               for sample in family.samples if sample.name == latency.METRIC + "_count")


def measure(workdir: Path, *, seconds: float, rounds: int, connections: int, threads: int,
            warmup: float = 1.0) -> dict[str, Any]:
    with ExitStack() as stack:
        upstream = free_port()
        stack.enter_context(running_haproxy(UPSTREAM.format(port=upstream), workdir, [upstream], "upstream"))
        gateways: dict[str, tuple[int, int, psutil.Process]] = {}
        for name in ("plain", "lua"):
            port, metrics = free_port(), free_port()
            lines = LUA_LINES if name == "lua" else dict.fromkeys(LUA_LINES, "")
            config = GATEWAY.format(threads=threads, port=port, upstream=upstream, metrics=metrics,
                                    service_rule=latency.service_rule("bench", "model"), **lines)
            stack.enter_context(running_haproxy(config, workdir, [port, metrics], name))
            gateways[name] = (port, metrics, _listener(port))
        phases: dict[str, list[dict[str, Any]]] = {name: [] for name in gateways}
        for r in range(rounds):
            order = list(gateways)
            random.shuffle(order)
            for name in order:
                port, _, proc = gateways[name]
                result = phase(port, proc, connections, seconds, warmup)
                say(f"round {r + 1}/{rounds} {name}: {result}")
                phases[name].append(result)
        counted = observed(gateways["lua"][1])
    answered = sum(p["answered"] for p in phases["lua"])
    if counted != answered:
        raise RuntimeError(f"the histogram counted {counted:g} requests of the {answered} answered")
    summary = {name: {key: statistics.median(p[key] for p in runs) for key in runs[0] if key != "answered"}
               for name, runs in phases.items()}
    return {"connections": connections, "seconds": seconds, "rounds": rounds, "threads": threads,
            "median": summary, "phases": phases,
            "throughput_ratio": round(summary["lua"]["requests_per_s"] / summary["plain"]["requests_per_s"], 3),
            "added_p50_ms": round(summary["lua"]["p50_ms"] - summary["plain"]["p50_ms"], 3),
            "added_cpu_us_per_request": round(summary["lua"]["gateway_cpu_us_per_request"]
                                              - summary["plain"]["gateway_cpu_us_per_request"], 2)}


def _listener(port: int) -> psutil.Process:
    """The HAProxy process listening on ``port``."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="HAProxy's nbthread in the two gateways")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gateway_latency.json"))
    args = parser.parse_args()
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="mm-bench-gateway-") as workdir:
        result = measure(Path(workdir), seconds=args.seconds, rounds=args.rounds, connections=args.connections,
                         threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.connections} connections, HAProxy with {args.threads} threads, {args.seconds:g} s x "
          f"{args.rounds} rounds (medians)")
    print("\n| gateway | requests/s | p50 | p99 | gateway CPU per request |")
    print("|---|---|---|---|---|")
    for name, m in result["median"].items():
        print(f"| {name} | {m['requests_per_s']:g} | {m['p50_ms']:g} ms | {m['p99_ms']:g} ms | "
              f"{m['gateway_cpu_us_per_request']:g} µs |")
    print(f"\nwith the histograms: throughput x{result['throughput_ratio']}, p50 {result['added_p50_ms']:+g} ms, "
          f"CPU {result['added_cpu_us_per_request']:+g} µs per request")


if __name__ == "__main__":
    main()
