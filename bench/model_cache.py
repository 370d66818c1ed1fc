"""The model-file cache: a service's first start on a controller, whose cache lacks its model file (fetched
from the hub's store, checked, then mounted), against its second start there (the file cached).

Real processes (a hub and one controller started with ``mmanager``, the controller fetching from the hub over
HTTP on 127.0.0.1), real PostgreSQL (a throwaway cluster, or MMANAGER_BENCH_DATABASE_URL), the real Docker
engine. One file of ``--size-mb`` random bytes is uploaded once; each run then times, side by side, a create
with the file evicted from the controller's cache (cold) and a create with it cached (warm), each from the
``POST`` until the hub answers the service running with the file mounted; the service is deleted after each.
The hub's copy stays in the page cache across runs, as a hub serving a popular file's does.

    python -m bench.model_cache [--size-mb 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import docker

from bench.common import say, scratch
from examples.images import EXAMPLE_IMAGE, build_example_image
from mmanager.client import ApiError
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api, sdk

SPEC = {"image": EXAMPLE_IMAGE, "resources": {"cpu_limit": 0.5, "memory_limit": "32MB"}}
CHUNK = 1024**2


def write_model(path: Path, size: int) -> str:
    """A file of ``size`` random bytes at ``path``; its digest."""
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            hasher.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return "sha256:" + hasher.hexdigest()


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def measure(db_url: str, workdir: Path, size: int, runs: int, docker_client: docker.DockerClient) -> dict[str, Any]:
    cache = workdir / "cache"
    dep = LocalDeployment(db_url, workdir / "deployment",
                          extra_hub_env={"MMANAGER_MODEL_STORE": str(workdir / "store"),
                                         "MMANAGER_MODEL_FILE_MAX_BYTES": str(max(size, 1))},
                          extra_controller_env={"MMANAGER_MODEL_CACHE_DIR": str(cache),
                                                "MMANAGER_MODEL_CACHE_BYTES": str(4 * max(size, 1))})
    dep.plan_hubs(1)
    dep.add_controller("models")
    token = dep.create_admin()
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    # Bytes each create's sync fetched from the hub (its operation's details.model_sync): all of the file
    # cold, none warm; a cold run that fetched nothing measured nothing.
    fetched: dict[str, list[int]] = {"cold": [], "warm": []}
    try:
        dep.start()
        client = sdk(dep.hub(0).url, token)
        wait_until(lambda: all(c.status == "healthy" for c in client.controllers.list()), 30)
        model = workdir / "model.bin"
        digest = write_model(model, size)
        # A model file's upload (a streamed body) is no SDK call: raw HTTP.
        with api(dep.hub(0).url, token) as raw:
            uploaded = raw.post("/api/model-files", params={"name": "model.bin"}, content=_chunks(model))
        uploaded.raise_for_status()
        assert uploaded.json()["digest"] == digest, uploaded.text
        cached = cache / "sha256" / digest.removeprefix("sha256:")
        spec = {**SPEC, "models": [{"digest": digest}]}
        for run in range(runs):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    # Evicted as the cache's LRU would: no container mounts it between runs.
                    cached.unlink(missing_ok=True)
                started = time.perf_counter()
                try:
                    service = client.services.create({**spec, "name": f"m{run}-{kind}"}, owner="root", repo="bench")
                except ApiError as exc:
                    raise RuntimeError(f"create failed: {exc.status} {exc}\n{dep.logs()}") from exc
                times[kind].append(time.perf_counter() - started)
                assert cached.stat().st_size == size
                [op] = client.operations.list(service_id=service.id, operation="create")
                fetched[kind].append(int((op.details.get("model_sync") or {}).get("bytes", 0)))
                client.services.delete(service.id)
            say(f"run {run + 1}: cold {times['cold'][-1]:.2f} s, warm {times['warm'][-1]:.2f} s")
    finally:
        dep.stop(docker_client)
    cold, warm = statistics.median(times["cold"]), statistics.median(times["warm"])
    return {"size_mb": round(size / 1e6, 1), "runs": runs, "cold_p50_s": round(cold, 3), "warm_p50_s": round(warm, 3),
            "cold_over_warm": round(cold / warm, 1) if warm else None, "fetched_bytes": fetched,
            "fetch_mb_per_s": round(size / 1e6 / (cold - warm), 1) if cold > warm else None, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_cache.json"))
    args = parser.parse_args()
    docker_client = docker.from_env()
    build_example_image(docker_client, EXAMPLE_IMAGE)
    with ExitStack() as stack:
        server, workdir = scratch(stack)
        db_url = asyncio.run(create_database(server, "bench"))
        result = measure(db_url, workdir, int(args.size_mb * 1e6), args.runs, docker_client)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| model file | runs | first start, cache cold (p50) | second start, cached (p50) | ratio "
          f"| fetch rate |\n|---|---|---|---|---|---|\n| {result['size_mb']} MB | {result['runs']} "
          f"| {result['cold_p50_s']} s | {result['warm_p50_s']} s | {result['cold_over_warm']}x "
          f"| {result['fetch_mb_per_s']} MB/s |")


if __name__ == "__main__":
    main()
