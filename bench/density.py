"""Simulator density: the CPU and memory of N simulated controllers in one process.

The simulator (``python -m bench.sim``, a process of its own) runs N controllers,
each holding ``--preload`` running containers (so heartbeats carry what a loaded
server's would), beating every ``--interval`` seconds to a null hub: a process
that answers every heartbeat at once with the same answer, so the simulator
runs at its full rate whatever a real hub would manage. Measured over a window
after the first beats: the simulator's CPU in cores (user + system) and its
resident memory at the end, peak included. The baseline, in the same run, is
the smallest size: ratios say how cost grows with N.

    python -m bench.density [--counts 1000,10000] [--preload 2] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.sim.http import Request, Response, Server
from tests.support.net import free_port, wait_for_port

MIB = 1024 * 1024


async def null_hub(port: int, interval: float) -> None:
    answer = json.dumps({"interval": interval, "grace": 3 * interval, "stop": []}).encode()

    async def handle(request: Request) -> Response:
        return Response(body=answer)

    server = Server(handle, "127.0.0.1", port)
    await server.start()
    await asyncio.Event().wait()


def _beats(path: str) -> int:
    """Answered beats so far, from the simulator's last status line (one a second)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["beats_ok"] if lines else 0


def one(count: int, preload: int, interval: float, seconds: float, warmup: float) -> dict[str, Any]:
    port, hub_port = free_port(), free_port()
    key = uuid.uuid4().hex * 2
    hub = subprocess.Popen([sys.executable, "-m", "bench.density", "--null-hub", str(hub_port),
                            "--interval", str(interval)])
    sim = None
    status = tempfile.NamedTemporaryFile("w+", prefix="mm-density-", suffix=".log")
    try:
        wait_for_port(hub_port, 20)
        sim = subprocess.Popen(
            [sys.executable, "-m", "bench.sim", "--hub", f"http://127.0.0.1:{hub_port}", "--key", key,
             "--count", str(count), "--port", str(port), "--preload", str(preload), "--every", "1"],
            stdout=status)
        proc = psutil.Process(sim.pid)
        wait_for_port(port, 120)
        time.sleep(warmup)
        before, started, beats0 = proc.cpu_times(), time.monotonic(), _beats(status.name)
        peak = 0
        while time.monotonic() - started < seconds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.5)
        after, wall, beats1 = proc.cpu_times(), time.monotonic() - started, _beats(status.name)
        rss = proc.memory_info().rss
        peak = max(peak, rss)
        cores = (after.user + after.system - before.user - before.system) / wall
    finally:
        for p in (sim, hub):
            if p is not None:
                p.terminate()
                p.wait(10)
        status.close()
    return {"controllers": count, "containers": count * preload, "interval_s": interval,
            "beats_per_s": round(count / interval, 1), "beats_ok_per_s": round((beats1 - beats0) / wall, 1),
            "cpu_cores": round(cores, 3),
            "rss_mib": round(rss / MIB, 1), "peak_rss_mib": round(peak / MIB, 1),
            "cpu_us_per_beat": round(1e6 * cores / max((beats1 - beats0) / wall, 1e-9), 1),
            "rss_kib_per_controller": round(rss / 1024 / count, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000", help="controller counts; the first is the baseline")
    parser.add_argument("--preload", type=int, default=2, help="running containers per controller")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds before measuring (the first beats)")
    parser.add_argument("--null-hub", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/density.json"))
    args = parser.parse_args()
    if args.null_hub:
        asyncio.run(null_hub(args.null_hub, args.interval))
        return
    runs = []
    for count in (int(c) for c in args.counts.split(",")):
        runs.append(one(count, args.preload, args.interval, args.seconds, args.warmup))
        print(json.dumps(runs[-1]), flush=True)
    base = runs[0]
    for r in runs:
        r["cpu_vs_baseline"] = round(r["cpu_cores"] / base["cpu_cores"], 2) if base["cpu_cores"] else None
        r["rss_vs_baseline"] = round(r["rss_mib"] / base["rss_mib"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_count": os.cpu_count(), "runs": runs}, indent=2) + "\n")
    print(f"\nbaseline: {base['controllers']} controllers; {args.preload} containers each, "
          f"a beat every {args.interval:g} s, {args.seconds:g} s window")
    print("| controllers | beats/s (answered) | CPU (cores) | × baseline | µs CPU per beat | RSS (MiB) | × baseline "
          "| KiB per controller |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['controllers']} | {r['beats_per_s']} ({r['beats_ok_per_s']}) | {r['cpu_cores']} | {r['cpu_vs_baseline']} "
              f"| {r['cpu_us_per_beat']} | {r['rss_mib']} | {r['rss_vs_baseline']} | {r['rss_kib_per_controller']} |")


if __name__ == "__main__":
    main()
