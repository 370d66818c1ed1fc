"""Heartbeat ingestion: heartbeats per second a hub accepts and makes durably visible.

A real hub process (``mmanager hub serve``) on a throwaway PostgreSQL cluster
(fsync turned back on, so a commit is durable; or MMANAGER_BENCH_DATABASE_URL),
and N simulated controllers (``bench.sim``) in this process, each pushing
heartbeats with the shared key at the interval the hub answers. They register
themselves with their first beats; measuring starts once every one of them is in
the table.

For every beat sent during the measured window: whether the hub accepted it
(200), the time to its answer, and the time until it is visible in the database
(a poller reads ``mmanager_controllers.last_heartbeat_at`` every 100 ms with its
own connection; a beat is visible once its controller's ``last_heartbeat_at`` is
at least the time it was sent, since the hub dates a beat when it receives it).
Latencies are from sending, an upper bound on "from arrival"; "visible" is
quantised by the poll. Also the CPU the hub, PostgreSQL and the simulator used
during the window, in cores.

The baseline, measured in the same run, is the smallest size (100 controllers
by default), where the hub is far from saturated: ratios are against it.

    python -m bench.heartbeats [--counts 100,1000,5000,10000] [--interval 2] [--max-rate 0] [--seconds 20] [--profile]

``--max-rate`` is the hub's MMANAGER_HEARTBEAT_MAX_RATE: 0 (the default here) measures what the hub
takes when every controller beats at ``--interval``; with a rate, the controllers beat at the
stretched interval the hub answers (``hub.services.pace``).

``--profile`` records the hub with py-spy for ``--profile-seconds`` at the
largest size, after the window, under the same load, and prints the top frames.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.common import asyncpg_dsn, durable_server, percentile, say
from bench.sim import SimController, SimOptions, Simulator
from tests.support.pg import create_database
from tests.support.procs import LocalDeployment

POLL_EVERY = 0.1


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


@dataclass
class _Window:
    start: float = float("inf")
    end: float = float("inf")
    sent: int = 0
    accepted: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    acks: list[float] = field(default_factory=list)
    visible: list[float] = field(default_factory=list)
    # Per controller, the send times of its accepted beats not yet seen in the table.
    pending: dict[str, collections.deque[float]] = field(default_factory=lambda: collections.defaultdict(
        collections.deque))

    def hook(self, controller: SimController, sent: float, acked: float | None, status: int | None) -> None:
        if not self.start <= sent < self.end:
            return
        self.sent += 1
        self.statuses[str(status) if status is not None else "no answer"] += 1
        if status == 200 and acked is not None:
            self.accepted += 1
            self.acks.append(acked - sent)
            self.pending[controller.id].append(sent)

    def seen(self, rows: list[asyncpg.Record], at: float) -> None:
        for row in rows:
            queue = self.pending.get(row["id"])
            last = row["last"]
            while queue and last is not None and queue[0] <= last:
                self.visible.append(at - queue.popleft())

    @property
    def unseen(self) -> int:
        return sum(len(q) for q in self.pending.values())


class _Cpu:
    """CPU seconds of some processes (and their children) between two reads."""

    def __init__(self, pids: list[int]) -> None:
        self.procs: dict[int, psutil.Process] = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    self.procs[p.pid] = p
        self.before = self._read()

    def _read(self) -> dict[int, float]:
        out = {}
        for pid, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[pid] = t.user + t.system
        return out

    def used(self) -> float:
        after = self._read()
        return sum(after[pid] - self.before.get(pid, after[pid]) for pid in after)


async def measure(hub_url: str, db_url: str, key: str, count: int, *, seconds: float = 20.0,
                  settle: float = 10.0, hub_pids: list[int] | None = None, pg_pids: list[int] | None = None,
                  connections: int = 64, register_timeout: float | None = None,
                  after_window: Any = None) -> dict[str, Any]:
    """Run ``count`` simulated controllers against the hub and measure one window of ``seconds``."""
    window = _Window()
    prefix = f"hb{count}"
    options = SimOptions(count=count, key=key, hub_url=hub_url, id_prefix=prefix, connections=connections)
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        async def rows() -> list[asyncpg.Record]:
            return await conn.fetch(
                "SELECT id, extract(epoch FROM last_heartbeat_at)::float8 AS last FROM mmanager_controllers "
                "WHERE id LIKE $1", prefix + "-%")

        async with Simulator(options, hook=window.hook) as sim:
            # A hub that cannot register them all in time is measured all the same (and says how many it has).
            deadline = time.monotonic() + (register_timeout or 60 + count / 100)
            while (registered := sum(r["last"] is not None for r in await rows())) < count:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            # One more interval: the registration wave is over, beats are in their steady rhythm.
            await asyncio.sleep(max(c.interval for c in sim.controllers.values()))
            interval = statistics.median(c.interval for c in sim.controllers.values())
            say(f"{count} controllers: {registered} registered, measuring {seconds:g} s")
            hub_cpu, pg_cpu = _Cpu(hub_pids or []), _Cpu(pg_pids or [])
            sim_cpu0 = time.process_time()
            window.start = time.time()
            window.end = window.start + seconds
            while time.time() < window.end:
                polled = await rows()
                window.seen(polled, time.time())
                await asyncio.sleep(POLL_EVERY)
            cores = {"hub": hub_cpu.used() / seconds, "postgres": pg_cpu.used() / seconds,
                     "simulator": (time.process_time() - sim_cpu0) / seconds}
            waited = time.time()
            while window.unseen and time.time() - waited < settle:
                window.seen(await rows(), time.time())
                await asyncio.sleep(POLL_EVERY)
            say(f"{count} controllers: window done, {window.unseen} beats not yet visible")
            if after_window is not None:
                await after_window()
            sim_errors = sim.errors
    finally:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except TimeoutError:
            conn.terminate()
    return {
        "controllers": count,
        "registered_before_window": registered,
        "interval_s": interval,
        "offered_per_s": round(count / interval, 1),
        "sent_per_s": round(window.sent / seconds, 1),
        "accepted_per_s": round(window.accepted / seconds, 1),
        "visible_per_s": round(len(window.visible) / seconds, 1),
        "statuses": dict(window.statuses),
        "simulator_errors": sim_errors,
        "never_visible": window.unseen,
        "answer_p50_ms": _ms(percentile(window.acks, 0.5)),
        "answer_p99_ms": _ms(percentile(window.acks, 0.99)),
        "visible_p50_ms": _ms(percentile(window.visible, 0.5)),
        "visible_p99_ms": _ms(percentile(window.visible, 0.99)),
        "cpu_cores": {k: round(v, 2) for k, v in cores.items()},
    }


def _frame(raw: str) -> str:
    """``name (path/to/file.py:123)`` as ``name (file path from the package root)``, without the line."""
    name, _, where = raw.partition(" (")
    path = where.rsplit(":", 1)[0]
    for root in ("/site-packages/", f"{Path.cwd()}/", "/lib/python3"):
        if root in path:
            path = path.split(root, 1)[1]
    return f"{name} ({path})" if where else name


def profile(pid: int, seconds: int, out: Path) -> dict[str, Any]:
    """py-spy on ``pid``: the frames with the most samples, in % of all: inclusive (the project's own
    frames, then all) and own (self). ``out`` keeps the collapsed stacks (for a flame graph)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--nonblocking",
                    "--format", "raw", "--output", str(out)], check=True, capture_output=True)
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            inclusive[frame] += int(n)
    share = 100 / max(total, 1)
    ours = [(f, n) for f, n in inclusive.most_common() if f.split(" (")[-1].startswith(("hub/", "mmanager/"))]
    return {"samples": total,
            "ours": [(f, round(n * share, 1)) for f, n in ours[:30]],
            "inclusive": [(f, round(n * share, 1)) for f, n in inclusive.most_common(40)],
            "self": [(f, round(n * share, 1)) for f, n in own.most_common(25)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,1000,5000,10000", help="controller counts; the first is the baseline")
    parser.add_argument("--interval", type=float, default=2.0, help="MMANAGER_HEARTBEAT_INTERVAL")
    parser.add_argument("--grace", type=float, default=6.0, help="MMANAGER_HEARTBEAT_GRACE")
    parser.add_argument("--max-rate", type=float, default=0.0,
                        help="MMANAGER_HEARTBEAT_MAX_RATE (default 0: off, so the hub takes the full offered load; "
                             "the hub's own default stretches the interval past 1000 beats a second)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=1024,
                        help="simulator connections to the hub (real controllers each have their own; too few queue beats "
                             "in the simulator past their timeout)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--profile-at", type=int, help="the controller count to profile at (default: the largest)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/heartbeats.json"))
    parser.add_argument("--workdir", type=Path, help="keep the hubs' files (logs) here instead of a temporary folder")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results: dict[str, Any] = {"interval_s": args.interval, "grace_s": args.grace, "max_rate": args.max_rate,
                               "seconds": args.seconds, "runs": []}
    with ExitStack() as stack:
        server, pg_pids = durable_server(stack)
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mm-bench-hb-")))
        for count in counts:
            db_url = asyncio.run(create_database(server, "hb"))
            dep = LocalDeployment(db_url, workdir / str(count), interval=args.interval, grace=args.grace)
            dep.plan_hubs(1)
            dep.extra_hub_env = {"LOG_LEVEL": "WARNING", "MMANAGER_HEARTBEAT_MAX_RATE": str(args.max_rate)}
            try:
                dep.start()
                hub = dep.hub(0)
                assert hub.popen is not None
                profiled: dict[str, Any] = {}

                async def after_window(pid: int = hub.popen.pid, n: int = count, into: dict[str, Any] = profiled) -> None:
                    if args.profile and n == (args.profile_at or max(counts)):
                        into.update(await asyncio.to_thread(
                            profile, pid, args.profile_seconds, args.out.with_suffix(".profile.txt")))

                run = asyncio.run(measure(hub.url, db_url, dep.key, count, seconds=args.seconds,
                                          hub_pids=[hub.popen.pid], pg_pids=pg_pids, connections=args.connections,
                                          after_window=after_window))
            finally:
                dep.stop()
            results["runs"].append(run)
            if profiled:
                results["profile"] = {"controllers": count, **profiled}
            print(json.dumps(run), flush=True)
    base = results["runs"][0]
    for run in results["runs"]:
        run["visible_p99_vs_baseline"] = round(run["visible_p99_ms"] / base["visible_p99_ms"], 2) \
            if run["visible_p99_ms"] and base["visible_p99_ms"] else None
        run["accepted_of_offered"] = round(run["accepted_per_s"] / run["offered_per_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nbaseline: {base['controllers']} controllers; heartbeat interval {args.interval} s, "
          f"MMANAGER_HEARTBEAT_MAX_RATE {args.max_rate:g}, {args.seconds:g} s window")
    print("| controllers | interval answered | offered/s | accepted/s | visible/s | accepted/offered | answer p50 / p99 "
          "| visible p50 / p99 | p99 vs baseline | never visible | hub / postgres / simulator cores "
          "| registered before the window |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        c = r["cpu_cores"]
        print(f"| {r['controllers']} | {r['interval_s']} s | {r['offered_per_s']} | {r['accepted_per_s']} | {r['visible_per_s']} "
              f"| {r['accepted_of_offered']} | {r['answer_p50_ms']} / {r['answer_p99_ms']} ms "
              f"| {r['visible_p50_ms']} / {r['visible_p99_ms']} ms | {r['visible_p99_vs_baseline']}x "
              f"| {r['never_visible']} | {c['hub']} / {c['postgres']} / {c['simulator']} "
              f"| {r['registered_before_window']} |")
    if "profile" in results:
        prof = results["profile"]
        print(f"\nhub profile at {prof['controllers']} controllers, {prof['samples']} samples; inclusive %, "
              "the project's frames:")
        for frame, share in prof["ours"]:
            print(f"  {share:5.1f}  {frame}")
        print("inclusive %, all frames:")
        for frame, share in prof["inclusive"]:
            print(f"  {share:5.1f}  {frame}")
        print("self %:")
        for frame, share in prof["self"]:
            print(f"  {share:5.1f}  {frame}")


if __name__ == "__main__":
    main()
