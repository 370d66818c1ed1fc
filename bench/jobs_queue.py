"""1,000 short jobs through the hub's queue on two controllers, against the same containers run straight
through the Docker engine (issue 27).

Real processes (a hub and two controllers started with ``mmanager``, on the machine's Docker engine), real
PostgreSQL (a throwaway cluster, or MMANAGER_BENCH_DATABASE_URL). Each controller runs at most
``--max-containers`` containers at once. Every job (the example image's busybox ``echo``) is submitted at once
through the API (``POST /api/jobs`` on ``--connections`` connections); then the benchmark waits for the queue to
drain and reads every job back. Reported from the hub's own records: jobs a second from the first submit to the
last job succeeded, and the p50/p99 from submit (the job's ``created_at``) to the dispatch (attempt 1's
``created_at``: placed, its controller asked), to the container's start (the attempt's ``started_at``: Docker's
``StartedAt`` as its controller reported it) and to succeeded (the job's ``finished_at``: outputs and log
collected, settled). Checked: every job succeeded with exactly one attempt.

The baseline, in the same run (the hub's processes stopped first): the same containers straight through the
Docker SDK (create, start, wait, remove), all queued at once and run by as many workers as the two controllers
run containers together; its containers a second and the p50/p99 from the queueing to the start call's return
and to the removal.

    python -m bench.jobs_queue [--jobs 1000] [--max-containers 4] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.common import percentile, say, scratch
from examples.images import EXAMPLE_IMAGE, build_example_image
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk

COMMAND = ["echo", "ok"]


def _ts(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def _stats(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)
    return {"p50_s": r(percentile(values, 0.5)), "p99_s": r(percentile(values, 0.99)),
            "max_s": r(max(values) if values else None), "n": len(values)}


async def _submit_all(url: str, token: str, n: int, connections: int) -> tuple[float, list[str]]:
    """Every job submitted at once; the wall time the first request went out, and the job ids."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=300) as client:
        async def one(i: int) -> str:
            r = await client.post("/api/jobs", json={"name": f"short-{i}", "image": EXAMPLE_IMAGE,
                                                     "command": COMMAND})
            if r.status_code != 201:
                raise RuntimeError(f"submit {i}: {r.status_code} {r.text[:300]}")
            return str(r.json()["id"])

        first = time.time()
        ids = await asyncio.gather(*(one(i) for i in range(n)))
    return first, list(ids)


def _all_jobs(hub: httpx.Client) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    while True:
        page = hub.get("/api/jobs", params={"limit": 1000, "offset": len(jobs)})
        page.raise_for_status()
        jobs += page.json()
        if len(page.json()) < 1000:
            return jobs


def _drained(hub: httpx.Client) -> bool:
    return all(not hub.get("/api/jobs", params={"status": s, "limit": 1}).json() for s in ("pending", "running"))


def through_hub(server: str, workdir: Path, n: int, max_containers: int, connections: int) -> dict[str, Any]:
    db_url = asyncio.run(create_database(server, "jobsqueue"))
    # A generous grace: a controller late with its beats on a busy machine is not declared lost (its jobs would
    # run again); a dead one is seen at once anyway (presence).
    dep = LocalDeployment(db_url, workdir / "hub", interval=1.0, grace=10.0, extra_hub_env={
        "MMANAGER_RATE_LIMIT": "0", "MMANAGER_MAX_JOBS_PER_USER": str(n + 10),
        "MMANAGER_ARTIFACT_STORE": str(workdir / "artifacts"), "LOG_LEVEL": "WARNING"},
        extra_controller_env={"LOG_LEVEL": "WARNING"})
    dep.plan_hubs(1)
    for name in ("a", "b"):
        dep.add_controller(name, max_containers=max_containers)
    token = dep.create_admin()
    docker_client = docker.from_env()
    try:
        dep.start()
        url = dep.hub(0).url
        client = sdk(url, token)
        wait_until(lambda: len(client.controllers.list()) == 2 and
                   all(c.status == "healthy" for c in client.controllers.list()), 30, what="both controllers healthy")
        say(f"hub: submitting {n} jobs at once on {connections} connections")
        first, ids = asyncio.run(_submit_all(url, token, n, connections))
        submitted = time.time() - first
        say(f"hub: {n} submitted in {submitted:.1f} s; waiting for the queue to drain")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as hub:
            wait_until(lambda: _drained(hub), 60 + n, interval=0.5, what="every job ended")
            jobs = [j for j in _all_jobs(hub) if j["id"] in set(ids)]
    except BaseException:
        say(dep.logs())
        raise
    finally:
        dep.stop(docker_client)
    assert len(jobs) == n, (len(jobs), n)
    statuses: dict[str, int] = {}
    for j in jobs:
        statuses[j["status"]] = statuses.get(j["status"], 0) + 1
    one_attempt = sum(1 for j in jobs if len(j["attempts"]) == 1)
    attempts: dict[str, int] = {}
    for a in (a for j in jobs for a in j["attempts"]):
        attempts[a["status"]] = attempts.get(a["status"], 0) + 1
    to_dispatch, to_start, to_done = [], [], []
    per_controller: dict[str, int] = {}
    no_start = 0
    for j in jobs:
        submit = _ts(j["created_at"])
        assert submit is not None
        a = j["attempts"][0]
        per_controller[a["controller_id"]] = per_controller.get(a["controller_id"], 0) + 1
        to_dispatch.append(_ts(a["created_at"]) - submit)  # type: ignore[operator]
        started = _ts(a["started_at"])
        if started is None:
            no_start += 1
        else:
            to_start.append(started - submit)
        if j["status"] == "succeeded":
            to_done.append(_ts(j["finished_at"]) - submit)  # type: ignore[operator]
    last = max(_ts(j["finished_at"]) or 0.0 for j in jobs)
    return {"jobs": n, "statuses": statuses, "all_succeeded": statuses == {"succeeded": n},
            "exactly_one_attempt": one_attempt == n, "attempts_by_status": attempts, "attempts_per_controller": per_controller,
            "submit_s": round(submitted, 2), "seconds": round(last - first, 2),
            "per_second": round(n / (last - first), 2),
            "submit_to_dispatch": _stats(to_dispatch), "submit_to_start": _stats(to_start),
            "attempts_without_started_at": no_start, "submit_to_succeeded": _stats(to_done)}


def straight(n: int, workers: int) -> dict[str, Any]:
    """The same containers through the Docker SDK: ``workers`` threads take them from one queue filled at once."""
    client = docker.from_env(timeout=300, max_pool_size=workers + 2)
    todo: queue.Queue[int] = queue.Queue()
    for i in range(n):
        todo.put(i)
    starts: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    label = f"bench-jobs-queue-{os.getpid()}"

    def worker() -> None:
        while True:
            try:
                todo.get_nowait()
            except queue.Empty:
                return
            try:
                c = client.containers.create(EXAMPLE_IMAGE, COMMAND, labels={"org.mmanager.bench": label})
                c.start()
                started = time.time()
                code = c.wait()["StatusCode"]
                c.remove()
                with lock:
                    starts.append(started - t0)
                    ends.append(time.time() - t0)
                    if code != 0:
                        errors.append(f"exit {code}")
            except Exception as exc:  # noqa: BLE001 - counted, and the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    say(f"docker: {n} containers on {workers} workers")
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = max(ends) if ends else 0.0
    for c in client.containers.list(all=True, filters={"label": f"org.mmanager.bench={label}"}):
        c.remove(force=True)
    return {"containers": n, "workers": workers, "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(seconds, 2), "per_second": round(len(ends) / seconds, 2) if seconds else None,
            "queued_to_start": _stats(starts), "queued_to_removed": _stats(ends)}


def measure(jobs: int = 1000, max_containers: int = 4, connections: int = 16,
            server: str | None = None) -> dict[str, Any]:
    """``server``: a PostgreSQL server's URL to make the database on (else as ``bench.common.scratch``)."""
    build_example_image(docker.from_env(), EXAMPLE_IMAGE)
    load = os.getloadavg()
    with ExitStack() as stack:
        found, workdir = scratch(stack, "mm-bench-jobsq-", server is None)
        server = server or found
        hub = through_hub(server, workdir, jobs, max_containers, connections)
        say(f"hub: {hub['per_second']} jobs/s, p50 submit->start {hub['submit_to_start']['p50_s']} s")
    base = straight(jobs, 2 * max_containers)
    say(f"docker: {base['per_second']} containers/s")
    ratio = round(base["per_second"] / hub["per_second"], 2) if base["per_second"] and hub["per_second"] else None
    return {"jobs": jobs, "max_containers_per_controller": max_containers, "controllers": 2,
            "load_average_before": [round(x, 2) for x in load], "hub": hub, "docker": base,
            "docker_over_hub_throughput": ratio}


def table(result: dict[str, Any]) -> str:
    hub, base = result["hub"], result["docker"]

    def pair(s: dict[str, Any]) -> str:
        return f"{s['p50_s']} s / {s['p99_s']} s"

    lines = ["| path | per second | total | submit → dispatched (p50 / p99) | submit → container started (p50 / p99) "
             "| submit → ended (p50 / p99) | all succeeded, one attempt each |",
             "|---|---|---|---|---|---|---|",
             f"| hub's queue, 2 controllers × {result['max_containers_per_controller']} | {hub['per_second']} jobs | "
             f"{hub['seconds']} s | {pair(hub['submit_to_dispatch'])} | {pair(hub['submit_to_start'])} | "
             f"{pair(hub['submit_to_succeeded'])} | {'yes' if hub['all_succeeded'] and hub['exactly_one_attempt'] else 'NO'} |",
             f"| Docker SDK, {base['workers']} workers | {base['per_second']} containers | {base['seconds']} s | – | "
             f"{pair(base['queued_to_start'])} | {pair(base['queued_to_removed'])} | "
             f"{'yes' if not base['errors'] else str(base['errors']) + ' errors'} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--max-containers", type=int, default=4, help="per controller; the baseline runs twice as many")
    parser.add_argument("--connections", type=int, default=16, help="the submits' HTTP connections")
    parser.add_argument("--out", type=Path, default=Path("bench/results/jobs_queue.json"))
    args = parser.parse_args()
    result = measure(args.jobs, args.max_containers, args.connections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.jobs} jobs; load average before {result['load_average_before']}; the Docker SDK's throughput is "
          f"{result['docker_over_hub_throughput']} × the hub's\n")
    print(table(result))


if __name__ == "__main__":
    main()
