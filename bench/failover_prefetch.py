"""Failover when the target lacks a large image, with pre-pull (``prefetch``) against without it.

Real processes (a hub and two controllers started with ``mmanager``), real PostgreSQL (a throwaway cluster, or
MMANAGER_BENCH_DATABASE_URL), a real registry on 127.0.0.1 (Debian's ``docker-registry``) and real Docker
engines: every controller on the machine's engine would see every image, so the source and the target each run
on a Docker engine of their own (``tests.support.engines``). The image is the example model service with a
layer of ``--image-mb`` MiB of random (incompressible) data, built here once (cached by its label), pushed to
the registry, pulled by the source's engine; the target's engine never holds it when a run starts.

Each run deploys one service with an HTTP health check on the source (it holds the image: image locality),
with ``prefetch`` on or off; with it on, waits for the hub's pre-pull onto the target (its next failover
target) to finish; then kills -9 the source controller and ``docker kill``s its container (the server is
gone), and times, from the kill, until the service runs and is healthy on the target. Runs alternate between
the two modes; reported per mode: the median, min and max, and how many failovers pulled the image (the
failover operation's ``image_pull``).

    python -m bench.failover_prefetch [--image-mb 500] [--runs 3] [--keep-image]

At the end the engines (with their images), the registry's data and, unless ``--keep-image``, the built image
are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

from bench.common import say, scratch
from examples.images import EXAMPLE_IMAGE, build_example_image
from tests.support.engines import Engine, docker_engine
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk
from tests.support.registry import push, serve_registry

LABEL = "org.mmanager.bench.failover-prefetch"
REVISION = "1"
MODES = {"with pre-pull": True, "without pre-pull": False}


def blob_image(client: docker.DockerClient, mb: int) -> str:
    """The example image plus ``mb`` MiB of random data in a layer of its own; built unless already here."""
    tag = f"mmanager/bench-blob:{mb}mb"
    label = f"{mb}-{REVISION}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        if (client.images.get(tag).labels or {}).get(LABEL) == label:
            return tag
    dockerfile = (f"FROM {EXAMPLE_IMAGE}\n"
                  f"RUN [\"/bin/dd\", \"if=/dev/urandom\", \"of=/blob\", \"bs=1048576\", \"count={mb}\"]\n"
                  f"LABEL {LABEL}={label}\n")
    say(f"building {tag} ({mb} MiB of random data)")
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, forcerm=True)
    return tag


def _metric(hub_url: str, line: str) -> bool:
    return line in httpx.get(f"{hub_url}/metrics").text


def _clear(engine: Engine, image: str | None = None) -> None:
    """Every container of the engine gone, and ``image`` with its layers."""
    for c in engine.client.containers.list(all=True):
        with contextlib.suppress(docker.errors.APIError):
            c.remove(force=True)
    if image is not None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.client.images.remove(image, force=True)
        engine.client.images.prune(filters={"dangling": False})


def one_run(db_url: str, workdir: Path, image: str, source: Engine, target: Engine, prefetch: bool) -> dict[str, Any]:
    _clear(target, image)
    _clear(source)
    assert not any(image in i.tags for i in target.client.images.list()), "the target must lack the image"
    dep = LocalDeployment(db_url, workdir, interval=1.0, grace=3.0, extra_hub_env={
        "MMANAGER_PREFETCH_INTERVAL": "0.5", "MMANAGER_PREFETCH_MIN_IMAGE_BYTES": "0", "MMANAGER_RATE_LIMIT": "0"})
    dep.plan_hubs(1)
    src = dep.add_controller("src", env={"DOCKER_HOST": source.host}).name
    dst = dep.add_controller("dst", env={"DOCKER_HOST": target.host}).name
    token = dep.create_admin()
    try:
        dep.start()
        hub = dep.hub(0).url
        client = sdk(hub, token)
        wait_until(lambda: all(c.status == "healthy" for c in client.controllers.list()), 30)
        wait_until(lambda: all(_metric(hub, f'mmanager_controller_images{{controller="{cid}"}}') for cid in (src, dst)),
                   30, what="both controllers' images at the hub")
        spec = {"name": "big", "image": image, "ports": {"5000": None}, "prefetch": prefetch,
                "resources": {"cpu_limit": 0.2, "memory_limit": "32MB"},
                "health_check": {"path": "/health", "port": 5000, "interval": 0.5}}
        service = client.services.create(spec, owner="root", repo="bench")
        assert service.controller_id == src, service
        wait_until(lambda: client.services.get(service.id).health == "healthy", 60,
                   interval=0.05, what="the service healthy on the source")
        prefetched = None
        if prefetch:
            started = time.monotonic()
            wait_until(lambda: _metric(hub, 'mmanager_prefetch_pulls_total{outcome="pulled"} 1.0'), 600,
                       interval=0.1, what="the pre-pull onto the target")
            prefetched = time.monotonic() - started

        dep.controllers[src].kill()
        died = time.monotonic()
        for c in source.client.containers.list():
            c.kill()

        def moved() -> float | None:
            s = client.services.get(service.id)
            if s.controller_id == dst and s.status == "running" and s.health == "healthy":
                return time.monotonic() - died
            return None

        healthy = wait_until(moved, 600, interval=0.05, what="the service healthy on the target")
        ops = client.operations.list(service_id=service.id, operation="failover")
        [failover] = [o for o in ops if o.status == "succeeded"]
        pull = (failover.details or {}).get("image_pull")
        return {"prefetch": prefetch, "healthy_s": healthy, "prefetch_s": prefetched,
                "failover_pulled": pull is not None, "pull_s": pull["seconds"] if pull else None,
                "placement": (failover.details or {}).get("placement")}
    except BaseException:
        say(dep.logs())
        raise
    finally:
        dep.stop()


def measure(image_mb: int, runs: int, keep_image: bool = False) -> dict[str, Any]:
    client = docker.from_env(timeout=600)
    build_example_image(client, EXAMPLE_IMAGE)
    image = blob_image(client, image_mb)
    size = client.images.get(image).attrs["Size"]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in MODES}
    try:
        with ExitStack() as stack:
            server, workdir = scratch(stack, "mm-bench-prefetch-")
            (workdir / "registry").mkdir()
            registry = stack.enter_context(serve_registry(workdir / "registry"))
            source = stack.enter_context(docker_engine(workdir))
            target = stack.enter_context(docker_engine(workdir))
            say(f"pushing {image} to {registry}")
            reference = push(client, image, f"{registry}/bench/blob", f"{image_mb}mb")
            say("the source's engine pulls it")
            source.client.images.pull(reference)
            for r in range(runs):
                # Alternating which mode goes first, so neither always runs on a warmer machine.
                order = list(MODES.items()) if r % 2 == 0 else list(MODES.items())[::-1]
                for label, prefetch in order:
                    db_url = asyncio.run(create_database(server, "bench"))
                    run = one_run(db_url, workdir / f"{r}-{prefetch}", reference, source, target, prefetch)
                    results[label].append(run)
                    say(f"{label} run {r + 1}: healthy on the target {run['healthy_s']:.2f} s after the kill"
                        f"{', the failover pulled ' + format(run['pull_s'], '.1f') + ' s' if run['failover_pulled'] else ''}")
    finally:
        if not keep_image:
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(image, force=True)
    out: dict[str, Any] = {"image_mb": image_mb, "image_bytes": size, "runs": runs, "modes": {}}
    for label, rs in results.items():
        times = [r["healthy_s"] for r in rs]
        out["modes"][label] = {
            "healthy_p50_s": round(statistics.median(times), 2), "healthy_min_s": round(min(times), 2),
            "healthy_max_s": round(max(times), 2),
            "failovers_that_pulled": sum(r["failover_pulled"] for r in rs),
            "pull_p50_s": round(statistics.median(p), 2) if (p := [r["pull_s"] for r in rs if r["pull_s"]]) else None,
            "prefetch_p50_s": (round(statistics.median(p), 2) if (p := [r["prefetch_s"] for r in rs
                                                                         if r["prefetch_s"] is not None]) else None),
            "placements": sorted({r["placement"] or "" for r in rs}),
            "runs": rs,
        }
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| mode | runs | healthy after the kill (median) | min | max | failovers that pulled | "
             "pull in the failover (median) | pre-pull before it (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, m in result["modes"].items():
        lines.append(f"| {label} | {result['runs']} | {m['healthy_p50_s']} s | {m['healthy_min_s']} s | "
                     f"{m['healthy_max_s']} s | {m['failovers_that_pulled']} | "
                     f"{m['pull_p50_s'] if m['pull_p50_s'] is not None else '–'} s | "
                     f"{m['prefetch_p50_s'] if m['prefetch_p50_s'] is not None else '–'} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep-image", action="store_true", help="keep the built image for a later run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/failover_prefetch.json"))
    args = parser.parse_args()
    result = measure(args.image_mb, args.runs, args.keep_image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.image_mb} MiB image ({result['image_bytes'] / 1e6:.0f} MB), {args.runs} runs per mode\n")
    print(table(result))


if __name__ == "__main__":
    main()
