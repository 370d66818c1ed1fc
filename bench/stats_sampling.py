"""The controller's stats sampling round on the real Docker engine (issue 29): how long one round of
``controller.stats.StatsSampler`` takes at 10, 50 and 100 running containers, three ways, the same sampler code
each: before issue 29 (Docker's two readings a second apart, ``stream=False``, the runtime's ``one_shot=False``;
16 reads at once), one-shot reads 16 at once (what one_shot alone gives), and after (one-shot reads,
``STATS_READS`` at once). Median of ``--rounds`` rounds after a first round (each container's first reading)
not counted; the rounds ``--gap`` seconds apart, so that Docker's stats collector (a pass a second while
anyone reads) has gone idle before each, as between rounds 10 s apart. The containers are the busybox example
image sleeping, labelled ``mmanager.bench=stats_sampling``: all removed at the end, also when stopped by Ctrl-C,
SIGTERM or SIGHUP, and any left by an earlier run killed harder (SIGKILL) are removed at the start (so two runs
at once would not do).

    python -m bench.stats_sampling [--sizes 10 50 100] [--rounds 5] [--out bench/results/stats_sampling.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import docker
from pydantic import SecretStr

from bench.common import exit_on_sigterm, say
from controller.config import ControllerSettings
from controller.health import ControllerMetrics
from controller.runtime import STATS_READS, DockerRuntime, Runtime
from controller.schemas import ContainerStats
from controller.stats import StatsSampler
from examples.images import EXAMPLE_IMAGE, build_example_image
from mmanager.wire import LABEL_CONTROLLER, LABEL_MANAGED, ContainerInfo

BENCH_LABEL = "mmanager.bench"
BENCH_NAME = "stats_sampling"
IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


class TwoReadings:
    """The runtime as the sampler read it before issue 29: every read Docker's two readings a second apart."""

    # The sampler's reads at once before issue 29.
    CONCURRENT = 16

    def __init__(self, runtime: DockerRuntime) -> None:
        self.runtime = runtime

    async def list_containers(self, *, all: bool, detailed: bool = True) -> list[ContainerInfo]:
        return await self.runtime.list_containers(all=all, detailed=detailed)

    async def stats(self, container_id: str, *, one_shot: bool = False) -> ContainerStats:
        return await self.runtime.stats(container_id, one_shot=False)


def remove_ours(client: docker.DockerClient, label: str = f"{BENCH_LABEL}={BENCH_NAME}") -> int:
    """The containers this run made (``label``: its controller id), or by default every one this benchmark
    made, a run killed before it cleaned up included."""
    found = client.containers.list(all=True, filters={"label": label})
    for container in found:
        container.remove(force=True)
    return len(found)


async def rounds(sampler: StatsSampler, count: int, ids: list[str], gap: float) -> dict[str, Any]:
    """The first round's time, then the median and spread of ``count`` more; every round must sample every
    container (a round that lost some would be cheaper, not faster)."""
    times = []
    for n in range(count + 1):
        await asyncio.sleep(gap)
        started = time.perf_counter()
        await sampler.run_once()
        times.append(time.perf_counter() - started)
        if n and (missed := [cid for cid in ids if sampler.usage(cid) is None]):
            raise RuntimeError(f"a round sampled {len(ids) - len(missed)} of {len(ids)} containers")
    return {"first_round_s": round(times[0], 3), "median_s": round(statistics.median(times[1:]), 3),
            "min_s": round(min(times[1:]), 3), "max_s": round(max(times[1:]), 3), "rounds": count}


async def measure(sizes: list[int], rounds_per_size: int, gap: float = 1.5) -> dict[str, Any]:
    client = docker.from_env()
    server_id = f"bench-stats-{uuid.uuid4().hex[:8]}"
    settings = ControllerSettings(_env_file=None, api_key=SecretStr("bench-" + "k" * 32), server_id=server_id,
                                  server_type="cpu", gpu_devices=[], docker_timeout=60)
    runtime = DockerRuntime(settings)
    labels = {LABEL_MANAGED: "true", LABEL_CONTROLLER: server_id, BENCH_LABEL: BENCH_NAME}
    out: dict[str, Any] = {"engine": client.version()["Version"], "api": client.version()["ApiVersion"],
                           "docker_sdk": docker.__version__, "server_id": server_id, "gap_s": gap, "sizes": []}
    try:
        ids: list[str] = []
        for size in sorted(sizes):
            while len(ids) < size:
                container = client.containers.run(EXAMPLE_IMAGE, IDLE, detach=True, labels=labels,
                                                  name=f"{server_id}-{len(ids)}")
                ids.append(str(container.id))
            say(f"{size} containers running")
            row: dict[str, Any] = {"containers": size}
            ways: list[tuple[str, Runtime | TwoReadings, int]] = [
                ("two_readings", TwoReadings(runtime), TwoReadings.CONCURRENT),
                ("one_shot_16", runtime, TwoReadings.CONCURRENT),
                ("one_shot", runtime, STATS_READS)]
            for way, reader, concurrent in ways:
                # A new sampler each way: no reading carried over, its first round a cold one.
                sampler = StatsSampler(settings, reader, ControllerMetrics(server_id),  # type: ignore[arg-type]
                                       max_concurrent=concurrent)
                row[way] = {"concurrent_reads": concurrent, **await rounds(sampler, rounds_per_size, ids, gap)}
                say(f"  {way}: {row[way]}")
            row["speedup"] = round(row["two_readings"]["median_s"] / row["one_shot"]["median_s"], 1)
            out["sizes"].append(row)
    finally:
        await runtime.close()
        say(f"removed {remove_ours(client, f'{LABEL_CONTROLLER}={server_id}')} containers")
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| containers | before: two readings, 16 at once | one shot, 16 at once | after: one shot, "
             f"{STATS_READS} at once | after's first round | before ÷ after |", "|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        lines.append(f"| {row['containers']} | {row['two_readings']['median_s']:.2f} s | "
                     f"{row['one_shot_16']['median_s']:.2f} s | **{row['one_shot']['median_s']:.2f} s** | "
                     f"{row['one_shot']['first_round_s']:.2f} s | {row['speedup']} × |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size and way")
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between rounds (Docker's collector idle)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stats_sampling.json"))
    args = parser.parse_args()
    exit_on_sigterm()
    # A closed terminal too: the containers go with the run (SystemExit unwinds through the clean-up).
    signal.signal(signal.SIGHUP, lambda signum, _frame: sys.exit(128 + signum))
    client = docker.from_env()
    build_example_image(client)
    if left := remove_ours(client):
        say(f"removed {left} containers an earlier run left")
    result = asyncio.run(measure(args.sizes, args.rounds, args.gap))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
