"""A fleet's first beats: how long until every controller of a big fleet beats, when all start at once.

A hub process on a database seeded (``bench.seed``) with ``--services`` services on ``--controllers``
simulated controllers, which then all start beating within one interval (2 s), as a lab's servers do
when the hub (or the whole room) comes back. Each controller learns the paced interval (hub.services.pace)
only from its first answer, so until then the hub is offered far more beats a second than its pace allows;
a beat that gets no answer within the controller's wait (half the grace) is sent again after a jittered
backoff (``mmanager.wire.beat_pause``). Every second the number of controllers beating (a beat recorded
since the start, and healthy) is printed; the run ends when all beat or after ``--seconds``. Results: ``bench/results/first_beats.json``.

    python -m bench.first_beats [--controllers 10000] [--services 20000] [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import asyncpg_dsn, say, scratch
from bench.seed import Seeded, seeded_hub
from bench.sim import Simulator

RESULTS = Path(__file__).parent / "results" / "first_beats.json"


async def measure(db_url: str, sim: Simulator, seeded: Seeded, seconds: float) -> dict[str, Any]:
    """Start ``sim`` (the seed's controllers) and wait until every controller beats, at most ``seconds``. Also:
    the operations the hub began while the fleet beat (none, unless it took a controller for lost)."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    count = len(seeded.controllers)
    operations = "SELECT count(*) FROM container_operations"
    before = await conn.fetchval(operations)
    began = time.time()
    timeline: list[tuple[float, int]] = []
    try:
        async with sim:
            while time.time() - began < seconds:
                await asyncio.sleep(1)
                beating = await conn.fetchval(
                    "SELECT count(*) FROM mmanager_controllers WHERE status = 'healthy' "
                    "AND extract(epoch FROM last_heartbeat_at) >= $1", began)
                timeline.append((round(time.time() - began, 1), beating))
                say(f"{timeline[-1][0]:6.1f} s: {beating} of {count} beating; failed beats {sim.failures()}")
                if beating == count:
                    break
            failures = sim.failures()
            # Counted before the fleet stops beating: once it has, the hub rightly takes it for lost.
            began_operations = await conn.fetchval(operations) - before
    finally:
        await conn.close()
    done = timeline[-1][1] == count if timeline else False
    return {"controllers": count, "services": len(seeded.placement), "all_beating_after_s":
            timeline[-1][0] if done else None, "beating_at_end": timeline[-1][1] if timeline else 0,
            "failed_beats": failures, "operations": began_operations, "timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controllers", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=120.0, help="give up after this long")
    parser.add_argument("--connections", type=int, default=2048,
                        help="the simulator's connections to the hub, for all heartbeats")
    args = parser.parse_args()
    with ExitStack() as stack:
        server, workdir = scratch(stack, "mm-bench-first-beats-")
        with seeded_hub(server, workdir, args.controllers, args.services) as hub:
            result = asyncio.run(measure(hub.db_url, hub.simulator(connections=args.connections), hub.seeded,
                                         args.seconds))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))


if __name__ == "__main__":
    main()
