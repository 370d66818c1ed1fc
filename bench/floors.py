"""Floors: what the HTTP the hub is built on costs on this machine, with nothing of the hub in it.

Each target of issue 6 is a rate of HTTP requests: heartbeats come in one request each, a create
comes in as one and goes out to its controller as another. This measures those requests alone, with
the same parts the hub uses (uvicorn with httptools and uvloop, httpx for its calls to controllers)
and no database, no authentication, no framework, so a rate here is one no hub on these parts can
pass on this machine, however its own work is done:

- ``beat``: a bare ASGI app on uvicorn that reads a heartbeat's body (a simulated controller's, the
  placement benchmark's size), parses its JSON and answers; sent by the minimal load generator of
  ``bench.api_floor`` on ``--connections`` keep-alive connections. Beats per second per server core.
- ``call-httpx``: the hub's side of a call to a controller: an ``httpx.AsyncClient`` posting a
  create's body back to back on ``--connections`` tasks to a bare server (the simulator's,
  ``bench.sim.http``). Calls per second per core of the calling process.
- ``call-bare``: the same with the simulator's minimal client (``bench.sim.http.Client``), for scale.
- ``create``: a create's two requests and nothing else: the load generator posts to a bare ASGI app
  on uvicorn that makes one httpx call to the simulator's server and answers with what it got. The
  whole machine's creates per second, and per core of the relaying server.

Then the targets against these floors: the cores the hub would need for 10,000 beats and for 2,000
creates a second at these rates, and the cores the senders would need. Every process's CPU is measured
with psutil over the measured window (a warm-up left out). Results: ``bench/results/floors.json``.

    python -m bench.floors [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import api_floor
from bench.api_floor import _one_connection
from bench.common import percentile, say
from tests.support.net import free_port, wait_for_port

# The targets of issue 6 that are rates of requests.
BEATS_TARGET = 10_000
CREATES_TARGET = 2_000

ANSWER = json.dumps({"interval": 10.0, "accepted": True}).encode()


def beat_body() -> bytes:
    """A simulated controller's heartbeat with two containers, as the placement benchmark sends."""
    from bench.sim.controller import SimContainer, SimController

    sim = SimController("ctl-floor-0000", "127.0.0.1", 9000, key="k" * 40, server_type="cpu", max_containers=50,
                        cpu_cores=32, memory_gb=128, gpus=[], healthy_after=0.0, heartbeats=True)
    for i in range(2):
        c = SimContainer(id=f"{i:064x}", name=f"mm-svc{i}-1-ctl-floor", image="example:latest",
                         service_id=f"svc{i:013d}", epoch=1, labels={}, ports={"5000/tcp": 30000 + i},
                         gpu_device_ids=[], memory_limit=512 << 20, cpu_limit=1.0, has_health_check=True)
        sim.containers[c.id] = c
    return sim.heartbeat_body()


def create_body() -> bytes:
    """A create's body as the hub sends it to a controller (``mmanager.wire.ContainerCreate``)."""
    from mmanager.wire import ContainerCreate

    return ContainerCreate(
        name="mm-0123456789abcdef-1-ctl-0001", image="example:latest", command=None, environment={"A": "1"},
        ports={"5000/tcp": None}, volumes={}, memory_limit="512MB", cpu_limit=1.0, restart_policy="no",
        labels={}, service_id="0123456789abcdef", epoch=1, gpu_count=0,
    ).model_dump_json().encode()


# ------------------------------------------------------------------ the servers (subprocesses)

async def _read_body(receive: Callable[[], Any]) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Callable[[dict[str, Any]], Any], status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def beat_app(scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
    if scope["type"] != "http":
        return
    json.loads(await _read_body(receive))
    await _answer(send, 200, ANSWER)


def relay_app(forward: str, origins: int) -> Callable[..., Any]:
    targets = _origins(forward, origins) if origins > 1 else [forward]
    client = _httpx_client(origins, 200)
    turn = 0

    async def app(scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
        nonlocal turn
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        turn += 1
        answer = await client.post(targets[turn % len(targets)] + "/containers/", content=body,
                                   headers={"Content-Type": "application/json"})
        # Only a create the controller made is answered 200: the load generator counts nothing else.
        await _answer(send, 200 if answer.status_code == 201 else 502, answer.content)

    return app


async def _sink(port: int) -> None:
    from bench.sim.http import Request, Response, Server

    created = {"container_id": "c" * 64, "name": "mm-0123456789abcdef-1-ctl-0001", "status": "running",
               "ports": {"5000/tcp": 30000}}

    async def handle(request: Request) -> Response:
        json.loads(request.body)
        return Response.json(created, 201)

    server = Server(handle, "0.0.0.0", port)
    await server.start()
    await asyncio.Event().wait()


def _origins(url: str, count: int) -> list[str]:
    """``count`` origins for the one server at ``url`` (it listens on every loopback address): 127.0.1.0, 127.0.1.1,
    …, as the simulator gives each controller an address of its own."""
    port = url.rsplit(":", 1)[1]
    return [f"http://127.0.{1 + i // 256}.{i % 256}:{port}" for i in range(count)]


def _httpx_client(origins: int, connections: int) -> Any:
    """The hub's client to controllers: ``hub.controller_client.PoolPerController`` when calls go to many
    origins, else httpx's own pool."""
    import ssl

    import httpx

    from hub.controller_client import PoolPerController

    if origins > 1:
        return httpx.AsyncClient(transport=PoolPerController(ssl.create_default_context()))
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=connections))


async def _call(url: str, client_kind: str, connections: int, seconds: float, warmup: float,
                origins: int) -> dict[str, Any]:
    body = create_body()
    targets = _origins(url, origins) if origins > 1 else [url]
    turn = 0
    if client_kind == "httpx":
        client: Any = _httpx_client(origins, connections)

        async def once() -> None:
            nonlocal turn
            turn += 1
            answer = await client.post(targets[turn % len(targets)] + "/containers/", content=body,
                                       headers={"Content-Type": "application/json"})
            if answer.status_code != 201:
                raise RuntimeError(f"HTTP {answer.status_code}")
    else:
        from bench.sim.http import Client

        client = Client(url, connections=connections)

        async def once() -> None:
            status, _, _ = await client.request("POST", "/containers/", body, {"Content-Type": "application/json"})
            if status != 201:
                raise RuntimeError(f"HTTP {status}")

    me = psutil.Process()
    latencies: list[float] = []
    marks: list[tuple[float, float]] = []
    now = time.perf_counter()
    warmup_until, until = now + warmup, now + warmup + seconds

    def mark() -> None:
        t = me.cpu_times()
        marks.append((time.perf_counter(), t.user + t.system))

    async def loop() -> None:
        while (started := time.perf_counter()) < until:
            await once()
            if started >= warmup_until:
                latencies.append(time.perf_counter() - started)

    asyncio.get_running_loop().call_later(warmup, mark)
    await asyncio.gather(*(loop() for _ in range(connections)))
    mark()
    await client.aclose()
    (t0, c0), (t1, c1) = marks
    return {"calls": len(latencies), "wall_s": t1 - t0, "cpu_s": c1 - c0, "latencies": latencies}


# ------------------------------------------------------------------ the driver

class _Servers:
    """Subprocesses of this module (``serve``/``sink``), stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> tuple[int, psutil.Process]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "bench.floors", *args, "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_for_port(port, proc=proc)
        return port, psutil.Process(proc.pid)

    def __enter__(self) -> _Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cpu(proc: psutil.Process) -> float:
    return api_floor._cpu([proc])


def _stats(latencies: list[float], wall: float) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "per_s": round(len(latencies) / wall),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round((percentile(latencies, 0.99) or 0.0) * 1000, 2),
    }


def _driven(port: int, body: bytes, procs: dict[str, psutil.Process], connections: int, seconds: float,
            warmup: float) -> dict[str, Any]:
    """``connections`` loops of back-to-back POSTs of ``body`` to the server on ``port`` (the load generator
    of bench.api_floor, in this process); each process's cores over the measured window."""
    procs = {**procs, "load_generator": psutil.Process()}
    request = (f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    marks: list[tuple[float, dict[str, float]]] = []

    def mark() -> None:
        marks.append((time.perf_counter(), {name: _cpu(p) for name, p in procs.items()}))

    async def load() -> list[float]:
        latencies: list[float] = []
        now = time.perf_counter()
        warmup_until, until = now + warmup, now + warmup + seconds
        asyncio.get_running_loop().call_later(warmup, mark)
        await asyncio.gather(*(_one_connection("127.0.0.1", port, request, until, latencies, warmup_until)
                               for _ in range(connections)))
        return latencies

    latencies = asyncio.run(load())
    mark()
    (t0, before), (t1, after) = marks
    wall = t1 - t0
    result = _stats(latencies, wall)
    result["cores"] = {name: round((after[name] - before[name]) / wall, 2) for name in procs}
    return result


def _called(port: int, client_kind: str, sink: psutil.Process, connections: int, seconds: float,
            warmup: float, origins: int) -> dict[str, Any]:
    """A calling process (``call``) posting creates to the sink on ``port``; its cores, the sink's."""
    sink_before = _cpu(sink)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "bench.floors", "call", "--url", f"http://127.0.0.1:{port}", "--client", client_kind,
         "--connections", str(connections), "--seconds", str(seconds), "--warmup", str(warmup),
         "--origins", str(origins)],
        check=True, capture_output=True, text=True,
    )
    sink_cores = (_cpu(sink) - sink_before) / (time.perf_counter() - started)  # over the warm-up too
    called = json.loads(out.stdout)
    result = _stats(called["latencies"], called["wall_s"])
    result["cores"] = {"caller": round(called["cpu_s"] / called["wall_s"], 2), "sink": round(sink_cores, 2)}
    return result


def _all_cores(result: dict[str, Any], cpus: int) -> int:
    """The rate with all ``cpus`` cores at work in the measured proportions of the processes' shares."""
    return round(cpus * result["per_s"] / sum(result["cores"].values()))


def _per_core(result: dict[str, Any], process: str) -> int:
    return round(result["per_s"] / result["cores"][process])


def measure(seconds: float = 10.0, connections: int = 32, warmup: float = 2.0, origins: int = 100) -> dict[str, Any]:
    results: dict[str, Any] = {"connections": connections, "seconds": seconds, "origins": origins,
                               "cpus": os.cpu_count()}
    with _Servers() as servers:
        port, server = servers.start("serve", "beat")
        body = beat_body()
        say(f"beat: {len(body)} bytes a beat into a bare ASGI app on uvicorn")
        results["beat"] = {**_driven(port, body, {"server": server}, connections, seconds, warmup),
                           "body_bytes": len(body)}
        results["beat"]["per_server_core"] = _per_core(results["beat"], "server")
        results["beat"]["per_load_generator_core"] = _per_core(results["beat"], "load_generator")

        sink_port, sink = servers.start("sink")
        for name, kind, spread in (("call_httpx", "httpx", origins), ("call_httpx_one_pool", "httpx", 1),
                                   ("call_bare", "bare", 1)):
            say(f"{name}: creates posted to the simulator's server ({spread} origin{'s' if spread > 1 else ''})")
            result = _called(sink_port, kind, sink, connections, seconds, warmup, spread)
            result["per_caller_core"] = _per_core(result, "caller")
            results[name] = {**result, "origins": spread}

        relay_port, relay = servers.start("serve", "relay", "--forward", f"http://127.0.0.1:{sink_port}",
                                          "--origins", str(origins))
        say(f"create: the load generator → a bare ASGI app on uvicorn → one httpx call ({origins} origins, the hub's "
            "pool per controller) to the simulator's server")
        result = _driven(relay_port, create_body(), {"server": relay, "sink": sink}, connections, seconds, warmup)
        result["per_server_core"] = _per_core(result, "server")
        results["create"] = {**result, "origins": origins}

    beat, call, create = results["beat"], results["call_httpx"], results["create"]
    cpus = results["cpus"] or 1
    results["against_targets"] = {
        "beats_per_s_target": BEATS_TARGET,
        "hub_cores_for_the_beats_http_alone": round(BEATS_TARGET / beat["per_server_core"], 2),
        "controller_side_cores_to_send_them_with_httpx": round(BEATS_TARGET / call["per_caller_core"], 2),
        # Every core of this machine doing nothing but these requests, each side's share as measured (the
        # server's and the load generator's, the leanest sender here): more hub processes cannot pass it.
        "beats_per_s_all_cores_http_alone": _all_cores(beat, cpus),
        "creates_per_s_target": CREATES_TARGET,
        "creates_per_s_one_hub_process_http_alone": create["per_s"],
        "hub_cores_for_the_creates_http_alone": round(CREATES_TARGET / create["per_server_core"], 2),
        "creates_per_s_all_cores_http_alone": _all_cores(create, cpus),
    }
    return results


def report(results: dict[str, Any]) -> None:
    rows = [("beat", "server"), ("call_httpx", "caller"), ("call_httpx_one_pool", "caller"), ("call_bare", "caller"),
            ("create", "server")]
    say(f"{'floor':<20} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'per core':>9}  cores")
    for name, process in rows:
        r = results[name]
        cores = ", ".join(f"{k} {v}" for k, v in r["cores"].items())
        say(f"{name:<20} {r['per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} {_per_core(r, process):>9}  {cores}")
    t = results["against_targets"]
    say(f"{t['beats_per_s_target']:,} beats a second: {t['hub_cores_for_the_beats_http_alone']} hub cores for their "
        f"HTTP alone, {t['controller_side_cores_to_send_them_with_httpx']} cores to send them with httpx; all "
        f"{results['cpus']} cores doing nothing else take {t['beats_per_s_all_cores_http_alone']:,} a second")
    say(f"{t['creates_per_s_target']:,} creates a second: {t['hub_cores_for_the_creates_http_alone']} hub cores for "
        f"their HTTP alone; one hub process relays {t['creates_per_s_one_hub_process_http_alone']:,} a second at "
        f"most, all {results['cpus']} cores {t['creates_per_s_all_cores_http_alone']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="(internal) a bare ASGI app on uvicorn")
    serve.add_argument("kind", choices=["beat", "relay"])
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--forward", help="relay: the server to call")
    serve.add_argument("--origins", type=int, default=1, help="relay: calls spread over this many origins")
    sink = sub.add_parser("sink", help="(internal) the simulator's HTTP server answering creates")
    sink.add_argument("--port", type=int, required=True)
    call = sub.add_parser("call", help="(internal) post creates back to back; JSON on stdout")
    call.add_argument("--url", required=True)
    call.add_argument("--client", choices=["httpx", "bare"], required=True)
    call.add_argument("--connections", type=int, default=32)
    call.add_argument("--seconds", type=float, default=10.0)
    call.add_argument("--warmup", type=float, default=2.0)
    call.add_argument("--origins", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per floor")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--origins", type=int, default=100,
                        help="controllers the calls are spread over (addresses 127.0.1.0 on, one server)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/floors.json"))
    args = parser.parse_args()

    if args.command == "serve":
        import uvicorn

        app = beat_app if args.kind == "beat" else relay_app(args.forward, args.origins)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off")
    elif args.command == "sink":
        asyncio.run(_sink(args.port))
    elif args.command == "call":
        print(json.dumps(asyncio.run(_call(args.url, args.client, args.connections, args.seconds, args.warmup,
                                          args.origins))))
    else:
        results = measure(args.seconds, args.connections, args.warmup, args.origins)
        report(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        say(f"results: {args.out}")


if __name__ == "__main__":
    main()
