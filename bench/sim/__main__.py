"""Run simulated controllers against a hub until interrupted, printing what they did every few seconds.

    python -m bench.sim --hub http://127.0.0.1:8000 --key "$MMANAGER_API_KEY" --count 1000 \
        [--types cpu=0.8,gpu=0.2] [--gpus 4] [--max-containers 100] [--port 0]

With ``--hub`` the controllers register themselves by heartbeating with the shared key; without it
they print their ``MMANAGER_CONTROLLERS`` entries (JSON) and wait for a hub to poll them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time

from bench.sim.simulator import SimOptions, Simulator


def _types(text: str) -> dict[str, float]:
    shares = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in ("cpu", "gpu", "edge"):
            raise argparse.ArgumentTypeError(f"unknown server type {name!r}")
        shares[name.strip()] = float(share or 1)
    return shares


async def _main(args: argparse.Namespace) -> None:
    options = SimOptions(
        count=args.count, key=args.key or "", hub_url=args.hub, port=args.port, first_address=args.first_address,
        id_prefix=args.prefix, server_types=args.types, gpus_per_server=args.gpus,
        max_containers=args.max_containers, healthy_after=args.healthy_after, connections=args.connections,
        preload=args.preload,
    )
    async with Simulator(options) as sim:
        if not args.hub:
            print(json.dumps(sim.entries()), flush=True)
        print(f"{args.count} simulated controllers on port {sim.server.port}", flush=True)
        started, cpu0 = time.monotonic(), time.process_time()
        while True:
            await asyncio.sleep(args.every)
            wall = time.monotonic() - started
            print(json.dumps({"t": round(wall, 1), "cpu_cores": round((time.process_time() - cpu0) / wall, 3),
                              **sim.stats()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", help="hub URL for heartbeats (http only); none: the hub polls")
    parser.add_argument("--key", default=os.environ.get("MMANAGER_API_KEY"), help="the shared controller key")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-address", default="127.1.0.1")
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--types", type=_types, default={"cpu": 1.0}, help="e.g. cpu=0.8,gpu=0.15,edge=0.05")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs per gpu controller")
    parser.add_argument("--max-containers", type=int, default=100)
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--connections", type=int, default=64, help="connections to the hub, all together")
    parser.add_argument("--preload", type=int, default=0, help="running containers per controller at start")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
