"""Seed 001's pipeline on 52,000 records end to end through the hub, against the seed's 342 s and, side by side in
the same run, the one-process runner (``python -m modelserver.pipeline.run``) on the same TSV.

Through the hub is what a user's ``python -m examples.seed001.run`` does, timed from the upload's first byte to
the enhanced JSONL's last: the TSV uploaded as an artifact, the three steps run as jobs of one pipeline in the
reference image (``mmanager/modelserver:latest``) on a real lab (a hub and two controllers started with
``mmanager``, real PostgreSQL: a throwaway cluster or MMANAGER_BENCH_DATABASE_URL, the real Docker engine), the
output downloaded. Each step is cut into what it cost, from the jobs' rows and the Docker engine's events:

- ``dispatch``: from the step becoming runnable (its needs succeeded) to its attempt placed;
- ``to_create``: from placed to its container made (the hub's call, the controller fetching the inputs it lacks
  from the hub into its cache, checked by sha256, and the container's creation);
- ``container_start``: from made to started;
- ``run``: from started to exited, of which ``work`` is what the step's own progress says it spent on records
  (its ``done / rate``) and the rest (``python_and_imports``) starting Python and importing (torch for
  ``features``);
- ``collect``: from exited to the job settled (the controller hashing the outputs, the hub fetching each into
  its artifact store, hashing it again and syncing it to disk, the log, one transaction).

The one-process runner runs in this checkout's virtualenv (the same code, Python and torch as the image's).
Both outputs are checked equal, byte for byte. Also measured alone: a container of the image that runs
``python -c pass``, and ``import torch`` inside one.

    python -m bench.seed001_pipeline [--records 52000] [--runs 1] [--out bench/results/seed001_pipeline.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.common import say, scratch
from examples.images import MODELSERVER_IMAGE, build_modelserver_image
from examples.seed001 import run as seed_run
from modelserver.pipeline import dataset
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api

SEED_SECONDS = 342.0
SEED_RECORDS = 52_000
GOAL = 100.0
_STEP_TIMES = re.compile(r"Step times: (.*)")


def _at(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def one_process(tsv: Path, out_dir: Path) -> dict[str, Any]:
    """The one-process runner in a fresh Python (its imports counted): wall seconds, each step's seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "modelserver.pipeline.run", "--input", str(tsv), "--output-dir",
                           str(out_dir)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    found = _STEP_TIMES.search(done.stdout)
    steps = {name: float(seconds.rstrip("s")) for name, seconds in
             (part.split() for part in found.group(1).split(", "))} if found else {}
    return {"seconds": round(wall, 3), "steps": steps, "output": str(out_dir / "Ec_enhanced.jsonl")}


def container_costs(client: docker.DockerClient, image: str) -> dict[str, float]:
    """A container of ``image`` made, started, run to the end of ``python -c pass`` and removed; ``import torch``
    inside one (its own clock)."""
    started = time.perf_counter()
    client.containers.run(image, ["python", "-c", "pass"], remove=True)
    empty = time.perf_counter() - started
    out = client.containers.run(image, ["python", "-c", "import time; t = time.perf_counter(); import torch; "
                                        "print(time.perf_counter() - t)"], remove=True)
    return {"container_python_pass_s": round(empty, 3), "import_torch_s": round(float(out.decode().split()[-1]), 3)}


class ContainerEvents:
    """Each job container's create, start and die times (epoch seconds), by job id, read live from the engine's
    events while a run goes (the engine keeps only its last few hundred events, and other work makes more)."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.found: dict[str, dict[str, float]] = {}
        self._stream = client.events(decode=True, filters={"type": "container", "event": ["create", "start", "die"],
                                                            "label": "mmanager.job"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream closed under it
            for event in self._stream:
                job = event["Actor"]["Attributes"].get("mmanager.job")
                if job:
                    self.found.setdefault(job, {})[event["Action"]] = event["timeNano"] / 1e9

    def close(self, jobs: list[str], timeout: float = 5.0) -> dict[str, dict[str, float]]:
        """The events, once every job in ``jobs`` was seen to die (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all("die" in self.found.get(j, {}) for j in jobs):
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            self._stream.close()
        return self.found


def breakdown(pipeline: dict[str, Any], events: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each step's seconds, cut as the module's docstring says (None where an event is missing)."""
    finished = {job["id"]: _at(job["finished_at"]) for job in pipeline["steps"]}
    out = []
    for job in pipeline["steps"]:
        [attempt] = [a for a in job["attempts"] if a["status"] == "succeeded"]
        runnable = max([_at(job["created_at"]) or 0.0, *(finished.get(n) or 0.0 for n in job["needs"])])
        placed = _at(attempt["created_at"])
        seen = events.get(job["id"], {})
        create, start, die = seen.get("create"), seen.get("start"), seen.get("die")
        progress = job.get("progress") or {}
        work = progress["done"] / progress["rate"] if progress.get("rate") else None

        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        row = {"step": job["step"], "controller": attempt["controller_id"], "records": progress.get("done"),
               "dispatch": span(runnable, placed), "to_create": span(placed, create),
               "container_start": span(create, start), "run": span(start, die),
               "work": round(work, 3) if work is not None else None,
               "collect": span(die, finished[job["id"]]), "total": span(runnable, finished[job["id"]])}
        row["python_and_imports"] = round(row["run"] - work, 3) if row["run"] is not None and work else None
        out.append(row)
    return out


def through_hub(hub: httpx.Client, client: docker.DockerClient, tsv: Path, out_dir: Path,
                image: str = MODELSERVER_IMAGE) -> dict[str, Any]:
    """One run of ``examples.seed001.run`` and its cost, step by step and hand-over by hand-over."""
    events = ContainerEvents(client)
    try:
        result = seed_run.run(hub, tsv, out_dir, image=image, poll=0.1, say=lambda line: None)
        seen = events.close([job["id"] for job in result.pipeline["steps"] if job["attempts"]])
    finally:
        events.close([], 0)
    if not result.succeeded:
        raise RuntimeError(f"the pipeline did not succeed: {json.dumps(result.pipeline)[:4000]}")
    steps = breakdown(result.pipeline, seen)
    sizes = {}
    for job in result.pipeline["steps"]:
        for artifact in hub.get(f"/api/jobs/{job['id']}/artifacts").json():
            sizes[f"{job['step']}:{artifact['path']}"] = artifact["size"]
    return {"seconds": round(result.seconds["total"], 3),
            "client": {k: round(v, 3) for k, v in result.seconds.items()},
            "steps": steps, "output_bytes": sizes, "tsv_bytes": tsv.stat().st_size,
            "output": str(result.output), "pipeline_id": result.pipeline["id"]}


def measure(hub: httpx.Client, client: docker.DockerClient, workdir: Path, records: int, runs: int = 1,
            image: str = MODELSERVER_IMAGE, costs: bool = True) -> dict[str, Any]:
    """``runs`` rounds, each the one-process runner then the hub on the same TSV, outputs compared; ``costs``:
    also a container's and torch's import's own cost."""
    tsv = workdir / "Ec.tsv"
    dataset.write(tsv, records, 0)
    alone = container_costs(client, image) if costs else {}
    load_before = os.getloadavg()[0]
    rounds: list[dict[str, Any]] = []
    for n in range(runs):
        local = one_process(tsv, workdir / f"local-{n}")
        say(f"round {n + 1}: one process {local['seconds']:.2f} s {local['steps']}")
        hubbed = through_hub(hub, client, tsv, workdir / f"hub-{n}", image)
        say(f"round {n + 1}: through the hub {hubbed['seconds']:.2f} s {hubbed['client']}")
        for row in hubbed["steps"]:
            say(f"  {row}")
        same = Path(local["output"]).read_bytes() == Path(hubbed["output"]).read_bytes()
        if not same:
            raise RuntimeError("the hub's enhanced JSONL differs from the one-process runner's")
        rounds.append({"one_process": local, "hub": hubbed, "outputs_equal": same})
    hub_s = statistics.median(r["hub"]["seconds"] for r in rounds)
    local_s = statistics.median(r["one_process"]["seconds"] for r in rounds)
    scale = records / SEED_RECORDS
    return {
        "records": records, "runs": runs, "image": image, "seed_seconds": SEED_SECONDS,
        "hub_seconds_p50": round(hub_s, 3), "one_process_seconds_p50": round(local_s, 3),
        # The seed's time for this many records (its 342 s scale with the records).
        "hub_x_seed": round(SEED_SECONDS * scale / hub_s, 1), "one_process_x_seed": round(SEED_SECONDS * scale / local_s, 1),
        "hub_over_one_process": round(hub_s / local_s, 2), "goal_x_seed": GOAL,
        "met": SEED_SECONDS * scale / hub_s >= GOAL, **alone, "rounds": rounds,
        # The machine's load (1 min) before and after: other work on it slows both sides.
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=SEED_RECORDS)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/seed001_pipeline.json"))
    args = parser.parse_args()
    docker_client = docker.from_env()
    image = build_modelserver_image()
    with ExitStack() as stack:
        server, workdir = scratch(stack)
        db_url = asyncio.run(create_database(server, "bench"))
        dep = LocalDeployment(db_url, workdir / "deployment",
                              extra_hub_env={"MMANAGER_ARTIFACT_STORE": str(workdir / "artifacts"),
                                             "MMANAGER_RATE_LIMIT": "0"})
        # The hub's default heartbeat settings, not the tests' quick ones: a controller that misses a beat on a
        # loaded machine is not declared lost under a step.
        dep.interval, dep.grace = 2.0, 6.0
        dep.plan_hubs(1)
        dep.add_controller("a")
        dep.add_controller("b")
        token = dep.create_admin()
        stack.callback(dep.stop, docker_client)
        dep.start()
        with api(dep.hub(0).url, token) as hub:
            hub.timeout = httpx.Timeout(60.0, read=600.0)
            wait_until(lambda: all(c["status"] == "healthy" for c in hub.get("/api/admin/controllers").json()), 30)
            result = measure(hub, docker_client, workdir, args.records, args.runs, image)
    result["cpus"] = len(os.sched_getaffinity(0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| records | through the hub | one process | seed 001 | hub × seed | one process × seed |\n"
          f"|---|---|---|---|---|---|\n| {result['records']:,} | {result['hub_seconds_p50']} s "
          f"| {result['one_process_seconds_p50']} s | {SEED_SECONDS:g} s | {result['hub_x_seed']} × "
          f"| {result['one_process_x_seed']} × |")


if __name__ == "__main__":
    main()
