"""Placement throughput: services created through the public API and acknowledged running, per second.

A real hub process (``mmanager hub serve``, started as ``tests/support/procs.py`` does) on a
throwaway PostgreSQL cluster with fsync on (a create's 201 means it is durable), N
simulated controllers (``bench.sim``, mixed cpu and gpu servers, registering themselves
by heartbeat) in this process, then S services created by C concurrent clients, each a
user of its own (``POST /api/admin/users``), each sending ``POST /api/{user}/bench/services``
back to back on one keep-alive connection (``bench.sim.http.Client``: cheap, so the
cores go to the hub). A create answers 201 once the controller acknowledged the
container running, so each 201 is one service placed, created and running. A share of
the services asks for a GPU (they must land on gpu servers, on a GPU no other service
holds); the others are CPU services (cpu servers, as long as one has room).

Measured over the window from the first request to the last answer: creates per
second, overall and the median of the per-second counts (the first and last second
left out: partial), the create latency p50/p99, and the CPU of the hub, PostgreSQL
(postmaster and backends) and this process (simulator and clients together), in
cores. Then it checks what was made, through the database and the simulator: every
service that got its 201 is ``running`` on a controller that is healthy, enabled,
alive in the simulator and of the right type, with its container there at the
service's epoch; no GPU held twice; no controller over its MAX_CONTAINERS; one
registry row per service; and a sample read back through ``GET /api/services/{id}``.

Heartbeats: the hub's interval (``--interval``) is its own setting for the run; at
the default 2 s, 10,000 controllers are 5,000 beats a second, which is the heartbeat
benchmark's load, not this one's. The default here (30 s, grace 90 s) keeps
heartbeats to a few hundred a second, so the window measures placement.

The baseline, measured in the same run, is the first size (100 controllers, 1,000
services by default). ``--max-seconds`` bounds each window (clients stop starting
creates then), so a slow hub is measured on what it made in that time.

    python -m bench.placement [--sizes 100:1000,10000:20000] [--clients 64] [--connections 2048] [--profile [DIR]]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import asyncpg_dsn, durable_server, percentile, say
from bench.heartbeats import _Cpu
from bench.pyspy import Recording, print_summary, profile_dir
from bench.sim import SimOptions, Simulator
from bench.sim.http import Client, ClientError
from tests.support.pg import create_database
from tests.support.procs import LocalDeployment, Proc

TARGET_PER_S = 2000
IMAGE = "sim/model:latest"


def spec_for(i: int, gpu: bool) -> dict[str, Any]:
    resources: dict[str, Any] = {"cpu_limit": 0.1, "memory_limit": "64MB"}
    if gpu:
        resources["gpu_count"] = 1
    return {"name": f"s{i}", "image": IMAGE, "ports": {"5000": None}, "resources": resources}


@dataclass
class _Creates:
    started: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ok: dict[str, dict[str, Any]] = field(default_factory=dict)  # service id -> what the 201 said
    failed: collections.Counter[str] = field(default_factory=collections.Counter)


def _created(data: dict[str, Any], gpu: bool, owner: str) -> tuple[str, dict[str, Any]]:
    """A 201's service: its id and what the check compares (the 201 said it runs there)."""
    return data["id"], {"status": data["status"], "controller_id": data["controller_id"],
                        "container_id": data["container_id"], "gpu": gpu, "owner": owner}


async def _client(hub_url: str, username: str, token: str, indices: list[int], gpu: set[int], until: float,
                  out: _Creates, *, spec: Callable[[int, bool], dict[str, Any]] = spec_for, query: str = "",
                  expect: int = 201,
                  record: Callable[[dict[str, Any], bool, str], tuple[str, dict[str, Any]]] = _created) -> None:
    """One user's creates, back to back on one keep-alive connection; each answered ``expect`` goes to
    ``out.ok`` as ``record`` reads it."""
    client = Client(hub_url, 1)
    headers = {"authorization": f"Bearer {token}"}
    path = f"/api/{username}/bench/services{query}"
    try:
        for i in indices:
            if time.monotonic() >= until:
                return
            body = json.dumps(spec(i, i in gpu)).encode()
            began = time.monotonic()
            out.started.append(began)
            try:
                status, answer, _ = await client.request("POST", path, body, headers, timeout=120)
            except ClientError as exc:
                out.failed[f"no answer: {exc}"[:80]] += 1
                continue
            ended = time.monotonic()
            if status == expect:
                key, value = record(json.loads(answer), i in gpu, username)
                out.ok[key] = value
                out.done.append(ended)
                out.latencies.append(ended - began)
            else:
                try:
                    code = json.loads(answer)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = answer[:60].decode(errors="replace")
                out.failed[f"{status} {code}"] += 1
    finally:
        await client.aclose()


async def _admin(hub_url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    client = Client(hub_url, 1)
    try:
        status, answer, _ = await client.request(method, path, json.dumps(body).encode() if body is not None else b"",
                                              {"authorization": f"Bearer {token}"}, timeout=60)
    finally:
        await client.aclose()
    return status, json.loads(answer) if answer else None


def _rates(done: list[float], start: float, end: float) -> tuple[list[int], float]:
    """Creates finished in each whole second of the window, and the overall rate."""
    seconds = max(end - start, 1e-9)
    buckets = [0] * (int(seconds) + 1)
    for t in done:
        buckets[min(int(t - start), len(buckets) - 1)] += 1
    return buckets, len(done) / seconds


async def verify(db_url: str, sim: Simulator, creates: _Creates, *, hub_url: str | None = None,
                 token: str | None = None, sample: int = 50) -> dict[str, Any]:
    """What was made, checked against the database, the simulator and (a sample) the API; a list of problems."""
    problems: list[str] = []
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        services = {r["id"]: r for r in await conn.fetch(
            "SELECT id, status, controller_id, container_id, epoch, gpu_devices::text AS gpus, "
            "(spec->'resources'->>'gpu_count')::int AS gpu_count FROM model_services")}
        controllers = {r["id"]: r for r in await conn.fetch(
            "SELECT id, status, server_type, enabled, draining, max_containers FROM mmanager_controllers")}
        rows = collections.Counter(r["service_id"] for r in await conn.fetch(
            "SELECT service_id FROM container_registry WHERE status <> 'stale'"))
        operations: dict[str, int] = {r[0]: r[1] for r in await conn.fetch(
            "SELECT status, count(*) FROM container_operations WHERE operation = 'create' GROUP BY status")}
    finally:
        await conn.close()
    missing = set(creates.ok) - set(services)
    if missing:
        problems.append(f"{len(missing)} services answered 201 are not in the table")
    extra = set(services) - set(creates.ok)
    if extra:
        problems.append(f"{len(extra)} services in the table were never answered 201")
    per_controller: collections.Counter[str] = collections.Counter()
    gpus_taken: collections.Counter[tuple[str, str]] = collections.Counter()
    bad: collections.Counter[str] = collections.Counter()
    for sid, answered in creates.ok.items():
        row = services.get(sid)
        if row is None:
            continue
        cid = row["controller_id"]
        if answered["status"] != "running":
            bad["answered not running"] += 1
        if row["status"] != "running":
            bad[f"status {row['status']}"] += 1
        if cid is None or cid != answered["controller_id"]:
            bad["controller differs from the 201's"] += 1
            continue
        controller, simulated = controllers.get(cid), sim.controllers.get(cid)
        if controller is None or simulated is None:
            bad["on an unknown controller"] += 1
            continue
        per_controller[cid] += 1
        if not simulated.alive:
            bad["on a dead controller"] += 1
        if controller["status"] != "healthy" or not controller["enabled"] or controller["draining"]:
            bad[f"on a controller {controller['status']}"] += 1
        wants_gpu = bool(row["gpu_count"])
        if wants_gpu != (controller["server_type"] == "gpu"):
            bad["wrong server type"] += 1
        gpus = json.loads(row["gpus"] or "[]")
        if len(gpus) != (row["gpu_count"] or 0):
            bad["wrong GPU count"] += 1
        for g in gpus:
            gpus_taken[(cid, str(g))] += 1
        container = simulated.containers.get(row["container_id"] or "")
        if container is None or container.service_id != sid or container.epoch != row["epoch"] \
                or container.status != "running":
            bad["no running container at its epoch on the controller"] += 1
        if rows[sid] != 1:
            bad[f"{rows[sid]} registry rows"] += 1
    if bad:
        problems.extend(f"{n} services: {what}" for what, n in bad.items())
    shared = sum(1 for n in gpus_taken.values() if n > 1)
    if shared:
        problems.append(f"{shared} GPUs held by more than one service")
    over = [cid for cid, n in per_controller.items() if n > controllers[cid]["max_containers"]]
    if over:
        problems.append(f"{len(over)} controllers over MAX_CONTAINERS")
    if operations.get("running"):
        problems.append(f"{operations['running']} create operations still running")
    if hub_url and token:
        try:
            for sid, status, read in await read_back(hub_url, token, list(creates.ok), sample):
                if status != 200 or read["status"] != "running" or read["controller_id"] != services[sid]["controller_id"]:
                    problems.append(f"GET /api/services/{sid}: {status} {read.get('status')}")
        except ClientError as exc:
            problems.append(f"GET /api/services/{{id}}: {exc}")
    live = [c for c in sim.controllers.values() if c.alive]
    return {
        "services_in_table": len(services),
        "running": sum(1 for r in services.values() if r["status"] == "running"),
        "controllers_alive": len(live),
        **loads(per_controller.values()),
        "create_operations": operations,
        "problems": problems,
    }


async def read_back(hub_url: str, token: str, ids: list[str], sample: int) -> list[tuple[str, int, dict[str, Any]]]:
    """``GET /api/services/{id}`` of a sample of ``ids`` (the same sample for the same ids): id, status, body."""
    client = Client(hub_url, 1)
    read = []
    try:
        for sid in random.Random(0).sample(sorted(ids), min(sample, len(ids))):
            status, answer, _ = await client.request("GET", f"/api/services/{sid}", b"",
                                                  {"authorization": f"Bearer {token}"}, timeout=60)
            read.append((sid, status, json.loads(answer)))
    finally:
        await client.aclose()
    return read


def loads(per_controller: Iterable[int]) -> dict[str, Any]:
    """How the placements spread: the controllers used, and the most and the median any one holds."""
    counts = list(per_controller)
    return {"controllers_used": len(counts), "per_controller_max": max(counts, default=0),
            "per_controller_median": statistics.median(counts) if counts else 0}


@dataclass
class Measured:
    """A measured window: its bounds (``time.monotonic()``), the CPU of the hub, PostgreSQL and this process
    in cores over it, and the hub's profile if one was taken."""

    start: float
    recording: Recording | None = None
    end: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return max(self.end - self.start, 1e-9)


@asynccontextmanager
async def measured(hub_pids: list[int], pg_pids: list[int], profile_out: Path | None = None) -> AsyncIterator[Measured]:
    """The window of the block: its CPU by process, and (``profile_out``) py-spy on the hub meanwhile."""
    hub_cpu, pg_cpu = _Cpu(hub_pids), _Cpu(pg_pids)
    own_cpu0 = time.process_time()
    recording = Recording(hub_pids[0], profile_out).start() if profile_out and hub_pids else None
    window = Measured(time.monotonic(), recording)
    try:
        yield window
    finally:
        window.end = time.monotonic()
        if recording is not None:
            await asyncio.to_thread(recording.stop)
        window.cores = {"hub": hub_cpu.used() / window.wall, "postgres": pg_cpu.used() / window.wall,
                        "simulator_and_clients": (time.process_time() - own_cpu0) / window.wall}


def fleet_options(hub_url: str, key: str, controllers: int, prefix: str, *, gpu_servers: float = 0.2,
                  connections: int = 64, ramp: float | None = None) -> SimOptions:
    """The simulated fleet: mixed cpu and gpu servers of 100 containers each, registering by heartbeat."""
    # First beats spread at 250 a second: registration is the heartbeat benchmark's subject, not this one's.
    return SimOptions(count=controllers, key=key, hub_url=hub_url, id_prefix=prefix, connections=connections,
                      server_types={"cpu": 1 - gpu_servers, "gpu": gpu_servers}, max_containers=100,
                      ramp=controllers / 250 if ramp is None else ramp)


async def registered(conn: asyncpg.Connection, sim: Simulator, prefix: str,
                     register_timeout: float | None = None) -> int:
    """Wait until the fleet is registered and healthy (only then does the hub place on it, and a controller
    takes creates only after a heartbeat round trip, SyncGuard); the count of healthy controllers."""
    controllers = len(sim.controllers)
    deadline = time.monotonic() + (register_timeout or 60 + controllers / 25)
    while True:
        healthy: int = await conn.fetchval(
            "SELECT count(*) FROM mmanager_controllers WHERE status = 'healthy' AND id LIKE $1", prefix + "-%")
        synced = sum(c.beats_ok > 0 for c in sim.controllers.values())
        if healthy >= controllers and synced >= controllers:
            break
        if time.monotonic() > deadline:
            if healthy < 0.95 * controllers:
                raise RuntimeError(f"only {healthy} of {controllers} controllers healthy ({synced} synced)")
            break  # measured all the same, with the count said
        await asyncio.sleep(0.5)
    say(f"{controllers} controllers: {healthy} registered and healthy")
    return healthy


@asynccontextmanager
async def fleet(hub_url: str, db_url: str, key: str, controllers: int, prefix: str, *, gpu_servers: float = 0.2,
                connections: int = 64, ramp: float | None = None,
                register_timeout: float | None = None) -> AsyncIterator[tuple[asyncpg.Connection, Simulator, int]]:
    """``controllers`` simulated controllers (``fleet_options``) registered and healthy: a connection to the
    database, the simulator and the count of healthy controllers."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        async with Simulator(fleet_options(hub_url, key, controllers, prefix, gpu_servers=gpu_servers,
                                           connections=connections, ramp=ramp)) as sim:
            yield conn, sim, await registered(conn, sim, prefix, register_timeout)
    finally:
        await conn.close()


async def make_users(hub_url: str, admin_token: str, names: list[str]) -> list[tuple[str, str]]:
    """Users through the admin API: (username, token) each."""
    users = []
    for name in names:
        status, body = await _admin(hub_url, admin_token, "POST", "/api/admin/users",
                                    {"username": name, "is_admin": False})
        if status != 201:
            raise RuntimeError(f"creating user {name}: {status} {body}")
        users.append((body["username"], body["token"]))
    return users


@contextmanager
def bench_hub(server: str, workdir: Path, *, interval: float, grace: float,
              env: dict[str, str]) -> Iterator[tuple[LocalDeployment, Proc, str, str]]:
    """A hub process on a new database of ``server``: the deployment, the hub, an admin's token, the
    database's URL; stopped on the way out."""
    db_url = asyncio.run(create_database(server, "pl"))
    dep = LocalDeployment(db_url, workdir, interval=interval, grace=grace,
                          extra_hub_env={"LOG_LEVEL": "WARNING", "MMANAGER_RATE_LIMIT": "0", **env})
    dep.plan_hubs(1)
    token = dep.create_admin()
    try:
        dep.start()
        hub = dep.hub(0)
        assert hub.popen is not None
        yield dep, hub, token, db_url
    finally:
        dep.stop()


async def measure(hub_url: str, db_url: str, admin_token: str, key: str, controllers: int, services: int, *,
                  clients: int = 64, gpu_share: float = 0.05, gpu_servers: float = 0.2, kill: int = 0,
                  max_seconds: float = 600.0, hub_pids: list[int] | None = None, pg_pids: list[int] | None = None,
                  profile_out: Path | None = None, register_timeout: float | None = None,
                  sim_connections: int = 64, ramp: float | None = None) -> dict[str, Any]:
    """``controllers`` simulated controllers, then ``services`` creates by ``clients`` users at once; the rates,
    latencies, CPU and the check of what was made."""
    async with fleet(hub_url, db_url, key, controllers, f"pl{controllers}", gpu_servers=gpu_servers,
                     connections=sim_connections, ramp=ramp, register_timeout=register_timeout) as (_, sim, healthy):
        users = await make_users(hub_url, admin_token, [f"u{u}" for u in range(clients)])
        killed = sorted(sim.controllers, key=lambda c: random.Random(1).random())[:kill] if kill else []
        sim.kill(killed)
        rng = random.Random(2)
        gpu = {i for i in range(services) if rng.random() < gpu_share}
        creates = _Creates()
        say(f"{controllers} controllers: {services} creates by {clients} clients"
             + (f", {len(killed)} controllers killed" if killed else ""))
        async with measured(hub_pids or [], pg_pids or [], profile_out) as window:
            await asyncio.gather(*(
                _client(hub_url, name, token, list(range(n, services, clients)), gpu,
                        window.start + max_seconds, creates)
                for n, (name, token) in enumerate(users)))
        start, end, wall, cores, recording = window.start, window.end, window.wall, window.cores, window.recording
        say(f"{controllers} controllers: {len(creates.ok)} created in {wall:.1f} s; checking")
        failed_beats = sim.failures()
        checked = await verify(db_url, sim, creates, hub_url=hub_url, token=admin_token)
    buckets, overall = _rates(creates.done, start, end)
    inner = buckets[1:-1] or buckets
    return {
        "controllers": controllers,
        "services": services,
        "clients": clients,
        "healthy_at_start": healthy,
        "killed": len(killed),
        "created": len(creates.ok),
        "failed": dict(creates.failed),
        "window_s": round(wall, 2),
        "per_s_overall": round(overall, 1),
        "per_s_median": statistics.median(inner) if inner else 0,
        "per_s_by_second": buckets,
        "latency_p50_ms": round((percentile(creates.latencies, 0.5) or 0) * 1000, 1),
        "latency_p99_ms": round((percentile(creates.latencies, 0.99) or 0) * 1000, 1),
        "cpu_cores": {k: round(v, 2) for k, v in cores.items()},
        "check": checked,
        # Beats the simulated controllers sent in vain, by why ("no answer" within their wait, or the hub's
        # status): a hub too busy to hear its controllers takes live ones for lost.
        "failed_beats": failed_beats,
        "profile": recording.summary(top=25) if recording is not None else None,
    }


def _size(text: str) -> tuple[int, int]:
    controllers, _, services = text.partition(":")
    return int(controllers), int(services)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100:1000,10000:20000",
                        help="controllers:services, comma-separated; the first is the baseline")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, each a user of its own")
    parser.add_argument("--gpu-share", type=float, default=0.05, help="share of services asking for one GPU")
    parser.add_argument("--kill", type=float, default=0.01,
                        help="share of controllers killed just before the creates (the hub still thinks them up)")
    parser.add_argument("--interval", type=float, default=30.0, help="MMANAGER_HEARTBEAT_INTERVAL")
    parser.add_argument("--grace", type=float, default=90.0, help="MMANAGER_HEARTBEAT_GRACE")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="at most this long per window")
    parser.add_argument("--connections", type=int, default=2048,
                        help="the simulator's connections to the hub, for all heartbeats (real controllers have one "
                             "each; with too few, beats queue in the simulator past their wait and live controllers "
                             "are taken for lost)")
    parser.add_argument("--profile", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                        help="py-spy on the hub during the largest size's window")
    parser.add_argument("--out", type=Path, default=Path("bench/results/placement.json"))
    parser.add_argument("--workdir", type=Path, help="keep the hub's logs here (default: a temporary folder)")
    args = parser.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {"clients": args.clients, "interval_s": args.interval, "grace_s": args.grace,
                               "gpu_share": args.gpu_share, "kill_share": args.kill, "runs": []}
    with ExitStack() as stack:
        server, pg_pids = durable_server(stack)
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mm-bench-pl-")))
        profiles = profile_dir(args.profile, workdir)
        for n, (controllers, services) in enumerate(sizes):
            quota = services // args.clients + 1
            with bench_hub(server, workdir / str(n), interval=args.interval, grace=args.grace,
                           env={"MMANAGER_MAX_SERVICES_PER_USER": str(quota)}) as (dep, hub, token, db_url):
                assert hub.popen is not None
                largest = (controllers, services) == max(sizes)
                run = asyncio.run(measure(
                    hub.url, db_url, token, dep.key, controllers, services, clients=args.clients,
                    gpu_share=args.gpu_share, kill=int(controllers * args.kill), max_seconds=args.max_seconds,
                    sim_connections=args.connections,
                    hub_pids=[hub.popen.pid], pg_pids=pg_pids,
                    profile_out=profiles / f"placement-{controllers}.pyspy" if profiles and largest else None))
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("profile", "per_s_by_second")}), flush=True)
    base = results["runs"][0]
    for run in results["runs"]:
        run["median_vs_baseline"] = round(run["per_s_median"] / base["per_s_median"], 2) if base["per_s_median"] else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nbaseline: {base['controllers']} controllers; {args.clients} clients; heartbeat interval "
          f"{args.interval:g} s; {args.gpu_share:.0%} GPU services; {args.kill:.0%} of controllers killed")
    print("| controllers | services created | per s (median of seconds) | per s (overall) | vs baseline "
          "| create p50 / p99 | hub / postgres / simulator+clients cores | failed | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        c = r["cpu_cores"]
        check = "ok" if not r["check"]["problems"] else "; ".join(r["check"]["problems"])
        print(f"| {r['controllers']} | {r['created']} of {r['services']} | **{r['per_s_median']}** "
              f"| {r['per_s_overall']} | {r['median_vs_baseline']}x | {r['latency_p50_ms']} / {r['latency_p99_ms']} ms "
              f"| {c['hub']} / {c['postgres']} / {c['simulator_and_clients']} | {sum(r['failed'].values())} "
              f"| {check} |")
    for r in results["runs"]:
        if r.get("profile"):
            print_summary(r["profile"], f"hub profile at {r['controllers']} controllers", own=None, inclusive=None)


if __name__ == "__main__":
    main()
