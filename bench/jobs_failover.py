"""A controller killed while jobs run (issue 27): no job lost, none run twice at once.

Real processes (a hub and two controllers started with ``mmanager``), real PostgreSQL (a throwaway cluster, or
MMANAGER_BENCH_DATABASE_URL), and a Docker engine of its own for each controller (``tests.support.engines``),
so that a server's death can be staged whole. ``--jobs`` jobs (the example image's busybox: append
``start <uptime>`` to ``/outputs/times.txt``, sleep ``--seconds``, append ``end <uptime>``) are submitted at
once; once a quarter of them succeeded and controller ``a`` runs some, it dies:

- ``server``: kill -9 of controller ``a`` and ``docker kill`` of every container of its engine (the server is
  gone);
- ``controller``: kill -9 of controller ``a`` only (its engine keeps running its containers); once the hub
  declared it lost, it is started again, and its stale copies are fenced (the heartbeat's ``stale_attempt``).

Measured per mode: every job succeeded with its ``times.txt`` (no job lost); per job, at most one attempt
succeeded, and its attempts' ``[started_at, finished_at]`` in the hub's records do not overlap; what really ran,
from both engines' event streams (each container's ``start`` and ``die``) and from what each copy wrote (the
lost copies' ``times.txt`` read from the dead controller's job folder, the winners' downloaded): whether two
copies of one job ever ran at once, and for how long; no output of a lost attempt accepted; the seconds from the
kill to the hub declaring the attempts lost and to the last job succeeding; how many attempts were ``lost``.

    python -m bench.jobs_failover [--jobs 40] [--seconds 8] [--max-containers 8] [--modes server,controller]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import docker.errors
import httpx

from bench.common import say, scratch
from examples.images import EXAMPLE_IMAGE, build_example_image
from tests.support.engines import Engine, docker_engine
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk

MODES = ("server", "controller")
SCRIPT = ("u() {{ cut -d' ' -f1 /proc/uptime; }}; echo \"start $(u)\" >> /outputs/times.txt; "
          "echo \"attempt $MMANAGER_ATTEMPT\"; sleep {seconds}; echo \"end $(u)\" >> /outputs/times.txt")


def _ts(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def _uptime_offset() -> float:
    """Wall time minus the kernel's uptime (what the containers write: they share the host's kernel)."""
    return time.time() - float(Path("/proc/uptime").read_text().split()[0])


def _times(text: str, offset: float) -> tuple[float | None, float | None]:
    start = end = None
    for line in text.splitlines():
        word, _, value = line.partition(" ")
        if word == "start":
            start = float(value) + offset
        elif word == "end":
            end = float(value) + offset
    return start, end


class Events:
    """A Docker engine's container ``start`` and ``die`` events of job containers, as they happen."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.name = name
        self.seen: list[tuple[str, int, str, float]] = []  # (job, epoch, action, wall time)
        self._stream = engine.client.events(decode=True, filters={"type": "container", "event": ["start", "die"],
                                                                  "label": ["mmanager.job"]})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._stream:
                attrs = ev.get("Actor", {}).get("Attributes", {})
                self.seen.append((attrs.get("mmanager.job", ""), int(attrs.get("mmanager.epoch", "0")),
                                  ev.get("Action", ev.get("status", "")), ev["timeNano"] / 1e9))
        except Exception:  # noqa: BLE001 - the stream closed
            return

    def close(self) -> None:
        self._stream.close()
        self._thread.join(timeout=5)


def _running(engine: Engine) -> list[str]:
    """The ids of the engine's running job containers (no inspect per container: they come and go)."""
    return [c["Id"] for c in engine.client.api.containers(filters={"label": "mmanager.job"})]


def _kill_all(engine: Engine) -> float:
    """Kill every running container of ``engine`` until none has run for a second: a start the dead controller
    had asked for still completes after its death, and a dead server runs nothing. When the last one died."""
    last = time.time()
    quiet = time.monotonic()
    while time.monotonic() - quiet < 1.0:
        ids = _running(engine)
        for cid in ids:
            with contextlib.suppress(docker.errors.APIError):  # one that ended since it was listed
                engine.client.api.kill(cid)
        if ids:
            last, quiet = time.time(), time.monotonic()
        time.sleep(0.02)
    return last


def _drained(hub: httpx.Client) -> bool:
    return all(not hub.get("/api/jobs", params={"status": s, "limit": 1}).json() for s in ("pending", "running"))


def _lost_copies(jobdir: Path, offset: float) -> dict[tuple[str, int], tuple[float | None, float | None]]:
    """What each attempt in a controller's job folder wrote (its ``times.txt``), by (job, number)."""
    out = {}
    for request in jobdir.glob("*/request.json"):
        body = json.loads(request.read_text())
        times = request.parent / "outputs" / "times.txt"
        if times.exists():
            out[(body["job_id"], int(body["number"]))] = _times(times.read_text(), offset)
    return out


def one_mode(mode: str, server: str, workdir: Path, engines: dict[str, Engine], n: int, seconds: float,
             max_containers: int) -> dict[str, Any]:
    for engine in engines.values():
        for c in engine.client.api.containers(all=True):
            with contextlib.suppress(docker.errors.NotFound):
                engine.client.api.remove_container(c["Id"], force=True)
    db_url = asyncio.run(create_database(server, "jobsfailover"))
    dep = LocalDeployment(db_url, workdir / mode, interval=1.0, grace=3.0, extra_hub_env={
        "MMANAGER_RATE_LIMIT": "0", "MMANAGER_MAX_JOBS_PER_USER": str(n + 10),
        "MMANAGER_ARTIFACT_STORE": str(workdir / mode / "artifacts"), "MMANAGER_JOB_WATCH_WAIT": "2"})
    dep.plan_hubs(1)
    victim = dep.add_controller("a", max_containers=max_containers, env={"DOCKER_HOST": engines["a"].host}).name
    dep.add_controller("b", max_containers=max_containers, env={"DOCKER_HOST": engines["b"].host})
    token = dep.create_admin()
    offset = _uptime_offset()
    events = [Events(e, name) for name, e in engines.items()]
    try:
        dep.start()
        url = dep.hub(0).url
        client = sdk(url, token)
        wait_until(lambda: len(client.controllers.list()) == 2 and
                   all(c.status == "healthy" for c in client.controllers.list()), 30, what="both controllers healthy")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as hub:
            ids = []
            for i in range(n):
                r = hub.post("/api/jobs", json={"name": f"marker-{i}", "image": EXAMPLE_IMAGE,
                                                "command": ["sh", "-c", SCRIPT.format(seconds=seconds)]})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])

            def mid_run() -> bool:
                done = len(hub.get("/api/jobs", params={"status": "succeeded", "limit": 1000}).json())
                return done >= n // 4 and bool(_running(engines["a"]))

            wait_until(mid_run, 60 + 2 * n * seconds, interval=0.1, what="a quarter done and a running some")
            running_on_victim = len(_running(engines["a"]))
            killed = time.time()
            dep.controllers[victim].kill()
            server_gone = None
            if mode == "server":
                server_gone = _kill_all(engines["a"]) - killed
            say(f"{mode}: killed {victim} with {running_on_victim} job containers running on its engine")
            restarted = None
            if mode == "controller":
                wait_until(lambda: next(c.status for c in client.controllers.list() if c.id == victim) != "healthy",
                           60, interval=0.1, what="the hub declaring the controller lost")
                dep.controllers[victim].start().wait_listening()
                restarted = time.time() - killed
            wait_until(lambda: _drained(hub), 60 + 2 * n * seconds, interval=0.2, what="every job ended")
            # The engine's own copies stopped (fenced, or ended on their own) before what ran is compared.
            wait_until(lambda: not _running(engines["a"]), 60, what="no job container left on a")
            jobs = [hub.get(f"/api/jobs/{i}").json() for i in ids]
            written: dict[str, tuple[float | None, float | None]] = {}
            stale_outputs = 0
            for job in jobs:
                arts = hub.get(f"/api/jobs/{job['id']}/artifacts").json()
                times = [a for a in arts if a["path"] == "times.txt"]
                if times:
                    written[job["id"]] = _times(hub.get(times[0]["url"]).text, offset)
                for a in job["attempts"]:
                    if a["status"] == "lost":
                        stale_outputs += len(hub.get(f"/api/jobs/{job['id']}/artifacts",
                                                     params={"attempt": a["number"]}).json())
    except BaseException:
        say(dep.logs())
        raise
    finally:
        for ev in events:
            ev.close()
        dep.stop()
    lost_copies = _lost_copies(workdir / mode / f"jobs-{victim}", offset)
    result = _judge(mode, jobs, written, lost_copies, events, killed, restarted, running_on_victim, stale_outputs,
                    seconds)
    result["last_container_killed_after_s"] = round(server_gone, 2) if server_gone is not None else None
    return result


def _judge(mode: str, jobs: list[dict[str, Any]], written: dict[str, tuple[float | None, float | None]],
           lost_copies: dict[tuple[str, int], tuple[float | None, float | None]], events: list[Events],
           killed: float, restarted: float | None, running_on_victim: int, stale_outputs: int,
           seconds: float) -> dict[str, Any]:
    # What really ran: each copy's (job, epoch, engine) -> [start, die] from the engines' events.
    ran: dict[tuple[str, int, str], list[float | None]] = {}
    for ev in events:
        for job_id, epoch, action, at in ev.seen:
            span = ran.setdefault((job_id, epoch, ev.name), [None, None])
            span[0 if action == "start" else 1] = at
    hub_overlaps, two_won, real_overlaps, written_overlaps = 0, 0, [], []
    lost, lost_declared, moved = 0, [], 0
    stale_ends = {"stopped early": 0, "ran to its end": 0}
    stale_ends_after_kill: list[float] = []
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for job in jobs:
        attempts = sorted(job["attempts"], key=lambda a: a["number"])
        two_won += sum(a["status"] == "succeeded" for a in attempts) > 1
        for x, y in zip(attempts, attempts[1:], strict=False):
            began = _ts(y["started_at"]) or _ts(y["created_at"])
            if _ts(x["finished_at"]) is None or began is None or _ts(x["finished_at"]) > began:  # type: ignore[operator]
                hub_overlaps += 1
        for a in attempts:
            if a["status"] == "lost":
                lost += 1
                lost_declared.append(_ts(a["finished_at"]) - killed)  # type: ignore[operator]
                # How the lost copy's container ended: stopped before its sleep was over, or on its own.
                start, die = ran.get((job["id"], a["number"], "a"), [None, None])
                if start is not None and die is not None:
                    stale_ends["stopped early" if die - start < seconds - 0.2 else "ran to its end"] += 1
                    stale_ends_after_kill.append(die - killed)
            if a["error"] and a["status"] != "lost":
                reason = a["error"].split(":")[0][:60]
                errors[reason] = errors.get(reason, 0) + 1
                examples.setdefault(reason, a["error"][:300])
        moved += len(attempts) > 1
        spans = sorted(((s or 0.0, e if e is not None else float("inf")) for (j, _, _), (s, e) in ran.items()
                        if j == job["id"]))
        worst = 0.0
        for i, (s1, e1) in enumerate(spans):
            for s2, e2 in spans[i + 1:]:
                worst = max(worst, min(e1, e2) - max(s1, s2))
        if worst > 0:
            real_overlaps.append(worst)
        # The container's own words: a lost copy's last line before the winner's first.
        won = written.get(job["id"])
        winner = next((a["number"] for a in attempts if a["status"] == "succeeded"), None)
        for (job_id, number), (start, end) in lost_copies.items():
            if job_id == job["id"] and number != winner and won is not None and won[0] is not None \
                    and start is not None:
                stale_end = end if end is not None else killed
                if stale_end > won[0]:
                    written_overlaps.append(stale_end - won[0])
    finished = [_ts(j["finished_at"]) for j in jobs if j["status"] == "succeeded"]
    statuses: dict[str, int] = {}
    for a in (a for j in jobs for a in j["attempts"]):
        statuses[a["status"]] = statuses.get(a["status"], 0) + 1
    succeeded = sum(j["status"] == "succeeded" for j in jobs)
    return {
        "mode": mode, "jobs": len(jobs), "job_seconds": seconds, "running_on_victim_at_kill": running_on_victim,
        "succeeded": succeeded, "with_times_txt": sum(1 for w in written.values() if w[0] and w[1]),
        "no_job_lost": succeeded == len(jobs) and len(written) == len(jobs),
        "attempts": sum(len(j["attempts"]) for j in jobs), "attempts_lost": lost, "jobs_moved": moved,
        "attempts_by_status": statuses, "copies_seen_by_the_engines": len(ran), "other_attempts_errors": errors,
        "other_attempts_error_examples": examples,
        "lost_copies_ended": stale_ends,
        "last_lost_copy_died_after_kill_s": round(max(stale_ends_after_kill), 2) if stale_ends_after_kill else None,
        "two_attempts_succeeded": two_won, "hub_record_overlaps": hub_overlaps,
        "copies_that_ran_at_once": len(real_overlaps),
        "max_overlap_s": round(max(real_overlaps), 2) if real_overlaps else 0.0,
        "lost_copies_read": len(lost_copies),
        "lost_copies_that_wrote_end": sum(1 for _, e in lost_copies.values() if e is not None),
        "written_overlaps": len(written_overlaps),
        "stale_outputs_accepted": stale_outputs,
        "kill_to_lost_s": round(min(lost_declared), 2) if lost_declared else None,
        "kill_to_last_succeeded_s": round(max(f for f in finished if f) - killed, 2) if finished else None,
        "restarted_after_s": round(restarted, 2) if restarted is not None else None,
    }


def measure(jobs: int = 40, seconds: float = 8, max_containers: int = 8,
            modes: tuple[str, ...] = MODES, server: str | None = None) -> dict[str, Any]:
    """``server``: a PostgreSQL server's URL to make the databases on (else as ``bench.common.scratch``)."""
    load = os.getloadavg()
    results = []
    with ExitStack() as stack:
        found, workdir = scratch(stack, "mm-bench-jobsfo-", server is None)
        server = server or found
        engines = {name: stack.enter_context(docker_engine(workdir)) for name in ("a", "b")}
        for engine in engines.values():
            build_example_image(engine.client, EXAMPLE_IMAGE)
        for mode in modes:
            result = one_mode(mode, server, workdir, engines, jobs, seconds, max_containers)
            say(f"{mode}: {json.dumps(result)}")
            results.append(result)
    return {"jobs": jobs, "job_seconds": seconds, "max_containers_per_controller": max_containers,
            "load_average_before": [round(x, 2) for x in load], "modes": results}


def table(result: dict[str, Any]) -> str:
    lines = ["| mode | jobs (on the victim at the kill) | succeeded with their output | attempts (lost) | "
             "two attempts succeeded | overlaps in the hub's records | copies that ran at once (longest) | "
             "stale outputs accepted | kill → lost | kill → last succeeded |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["modes"]:
        lines.append(f"| {m['mode']} | {m['jobs']} ({m['running_on_victim_at_kill']}) | {m['with_times_txt']} | "
                     f"{m['attempts']} ({m['attempts_lost']}) | {m['two_attempts_succeeded']} | "
                     f"{m['hub_record_overlaps']} | {m['copies_that_ran_at_once']} ({m['max_overlap_s']} s) | "
                     f"{m['stale_outputs_accepted']} | {m['kill_to_lost_s']} s | {m['kill_to_last_succeeded_s']} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seconds", type=int, default=8, help="each job's sleep")
    parser.add_argument("--max-containers", type=int, default=8, help="per controller")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=Path("bench/results/jobs_failover.json"))
    args = parser.parse_args()
    result = measure(args.jobs, args.seconds, args.max_containers, tuple(args.modes.split(",")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.jobs} jobs of {args.seconds} s; load average before {result['load_average_before']}\n")
    print(table(result))


if __name__ == "__main__":
    main()
