"""A large, consistent starting state written straight into PostgreSQL, for the scale benchmarks.

Creating 100,000 services through the API would take longer than the measurement they are for,
so ``seed()`` writes, with COPY, what those creates would have left behind:

- ``users`` (a few owners, and an admin with a token for reading the API),
- ``mmanager_controllers``: the simulator's controllers (``bench.sim.layout``), registered,
  healthy, pushing heartbeats, at the URL the simulator will answer on,
- ``model_services``: each ``running`` and ``healthy`` at epoch 1 on its controller, with its
  endpoint, the spec a create stores (``ServiceSpec.model_dump``) and the owner's quota ignored,
- ``container_registry``: one ``running`` row per service at epoch 1 (its one replica, with its endpoint), the container's id and name,
- ``container_operations``: one succeeded ``create`` per service,
- ``service_deployment_history``: version 1 of each service,

and returns the matching containers for the simulator (``SimOptions.containers``): per
controller, each service's container with the same id, name, epoch, ports and labels a real
controller would list. Started against the seeded database, the hub finds every service running
where the table says: no fencing order, no row update, no move (``churn()`` checks it).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg

from bench.common import asyncpg_dsn
from bench.sim import SimContainer, SimOptions, Simulator, layout
from hub.migrate import upgrade
from hub.models import ServiceModel
from hub.schemas import ServiceSpec
from hub.security import TOKEN_PREFIX, hash_token, mint_token
from hub.services.lifecycle import container_name
from mmanager.wire import LABEL_CONTROLLER, LABEL_EPOCH, LABEL_MANAGED, LABEL_SERVICE
from tests.support.net import free_port
from tests.support.pg import create_database
from tests.support.procs import LocalDeployment

IMAGE = "sim/model:1"
CONTAINER_PORT = "5000"
# Host ports a controller hands out, from here up (as the simulator's create does).
FIRST_HOST_PORT = 20000
ADMIN = "root"
REPO = "bench"


def spec_for(name: str) -> dict[str, Any]:
    """The spec a create of this service stores: a small HTTP service with a health check."""
    return {**_SPEC, "name": name}


_SPEC = ServiceSpec.model_validate({
    "name": "template", "image": IMAGE, "ports": {CONTAINER_PORT: None},
    "resources": {"cpu_limit": 0.1, "memory_limit": "64MB"},
    "health_check": {"path": "/health", "port": int(CONTAINER_PORT), "interval": 5},
}).model_dump(mode="json")


@dataclass
class Seeded:
    """What ``seed()`` wrote: the admin's token, the owners, and the simulator's preload."""

    token: str
    owners: list[str]
    controllers: list[str]
    # Service id -> the controller it runs on.
    placement: dict[str, str]
    containers: dict[str, list[SimContainer]] = field(default_factory=dict)

    @property
    def services(self) -> int:
        return len(self.placement)


@dataclass
class _Named:
    name: str
    id: str


async def seed(db_url: str, options: SimOptions, services: int, *, owners: int = 4, migrate: bool = True,
               healthy: bool = True) -> Seeded:
    """Seed ``services`` running services over the controllers ``Simulator(options)`` will run.

    ``options.port`` must be fixed (the controllers' URLs are stored). Services go round-robin over
    the controllers, so each runs ``services / count`` (give the controllers room: ``max_containers``).
    ``healthy``: the services have passed their health check (the containers started an hour ago).
    """
    if not options.port:
        raise ValueError("seeding needs the simulator's port (SimOptions.port)")
    if set(options.server_types) != {"cpu"}:
        raise ValueError("seeding places services on cpu controllers only")
    if services > options.count * options.max_containers:
        raise ValueError(f"{services} services do not fit on {options.count} controllers of "
                         f"{options.max_containers} containers")
    if migrate:
        await asyncio.to_thread(upgrade, db_url)
    now = datetime.now(UTC)
    started = now - timedelta(hours=1)
    monotonic_start = time.monotonic() - 3600.0
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        async with conn.transaction():
            admin_id = await conn.fetchval(
                "INSERT INTO users (username, is_admin, created_at) VALUES ($1, true, $2) RETURNING id", ADMIN, now)
            token = mint_token()
            await conn.execute(
                "INSERT INTO api_tokens (user_id, token_hash, prefix, created_at) VALUES ($1, $2, $3, $4)",
                admin_id, hash_token(token), token[: len(TOKEN_PREFIX) + 4], now)
            owner_names = [f"owner{k}" for k in range(owners)]
            owner_ids = [await conn.fetchval(
                "INSERT INTO users (username, is_admin, created_at) VALUES ($1, false, $2) RETURNING id", name, now)
                for name in owner_names]

            controllers = layout(options)
            urls = {cid: f"http://{address}:{options.port}" for cid, address in controllers}
            ids = [cid for cid, _ in controllers]
            per_controller = [0] * len(ids)
            seeded = Seeded(token, owner_names, ids, {})
            service_rows, registry_rows, op_rows, history_rows = [], [], [], []
            replica = uuid.uuid4().hex
            health = "healthy" if healthy else "unknown"
            for i in range(services):
                k = i % len(ids)
                controller_id = ids[k]
                host_port = FIRST_HOST_PORT + per_controller[k]
                per_controller[k] += 1
                owner = i % owners
                service_id = uuid.uuid4().hex
                name = f"svc-{i}"
                spec = spec_for(name)
                spec_json = json.dumps(spec)
                container_id = uuid.uuid4().hex * 2
                cname = container_name(cast(ServiceModel, _Named(name, service_id)), 1, controller_id)
                host = urls[controller_id].split("//", 1)[1].rsplit(":", 1)[0]
                endpoint = json.dumps({"host": host, "ports": {CONTAINER_PORT: host_port}})
                service_rows.append((
                    service_id, name, owner_ids[owner], REPO, spec_json, 1, "running", "running", None,
                    controller_id, container_id, 1, endpoint, "[]", health, started, started))
                registry_rows.append((
                    uuid.uuid4().hex, service_id, controller_id, container_id, cname, IMAGE, "running", 1, health, 0,
                    64 * 1024**2, 0.1, "[]", True, endpoint, started, started))
                op_rows.append((
                    uuid.uuid4().hex, service_id, controller_id, container_id, "create", "succeeded", None,
                    owner_names[owner], json.dumps({"epoch": 1, "version": 1}), replica, started, started))
                history_rows.append((service_id, 1, spec_json, IMAGE, "create", owner_names[owner], started))
                seeded.placement[service_id] = controller_id
                seeded.containers.setdefault(controller_id, []).append(SimContainer(
                    id=container_id, name=cname, image=IMAGE, service_id=service_id, epoch=1,
                    labels={LABEL_MANAGED: "true", LABEL_CONTROLLER: controller_id, LABEL_SERVICE: service_id,
                            LABEL_EPOCH: "1"},
                    ports={f"{CONTAINER_PORT}/tcp": host_port}, gpu_device_ids=[], memory_limit=64 * 1024**2,
                    cpu_limit=0.1, has_health_check=True, created=started.isoformat(),
                    created_at=monotonic_start, started_at=monotonic_start))
            controller_rows = [
                (cid, urls[cid], "cpu", True, False, 1, 100, "healthy", now, now, None, options.max_containers,
                 per_controller[k], round(100 * per_controller[k] / options.max_containers, 2), 0.0,
                 options.cpu_cores, options.memory_gb, options.memory_gb, "[]", "{}", now, now)
                for k, cid in enumerate(ids)
            ]
            await _copy(conn, "mmanager_controllers", (
                "id", "url", "server_type", "enabled", "draining", "priority", "weight", "status",
                "last_heartbeat_at", "last_push_at", "error_message", "max_containers", "containers_running",
                "load_percentage", "memory_usage_percent", "cpu_cores", "memory_total_gb", "memory_available_gb",
                "gpus", "health_data", "created_at", "updated_at"), controller_rows)
            await _copy(conn, "model_services", (
                "id", "name", "owner_id", "repo", "spec", "version", "desired_state", "status", "status_message",
                "controller_id", "container_id", "epoch", "endpoint", "gpu_devices", "health", "created_at",
                "updated_at"), service_rows)
            await _copy(conn, "container_registry", (
                "id", "service_id", "controller_id", "container_id", "container_name", "image", "status", "epoch",
                "health", "health_restarts", "memory_bytes", "cpu_limit", "gpu_devices", "serving", "endpoint",
                "created_at", "updated_at"), registry_rows)
            await _copy(conn, "container_operations", (
                "id", "service_id", "controller_id", "container_id", "operation", "status", "error", "actor",
                "details", "hub_replica", "created_at", "finished_at"), op_rows)
            await _copy(conn, "service_deployment_history", (
                "service_id", "version", "spec", "image", "reason", "actor", "created_at"), history_rows)
        for table in ("mmanager_controllers", "model_services", "container_registry", "container_operations",
                      "service_deployment_history", "users"):
            await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()
    return seeded


async def touch(db_url: str) -> None:
    """Date every controller's last heartbeat now: call it just before the hub starts, so the hub
    neither polls them (they push) nor finds them silent before their first beat arrives."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        await conn.execute("UPDATE mmanager_controllers SET last_heartbeat_at = now(), last_push_at = now()")
    finally:
        await conn.close()


async def _copy(conn: asyncpg.Connection, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
    await conn.copy_records_to_table(table, columns=list(columns), records=rows)


# ------------------------------------------------------------ churn


async def state(conn: asyncpg.Connection) -> dict[str, Any]:
    """What a seeded database looks like now, for ``churn()``: counts and a digest of every service."""
    operations = await conn.fetchval("SELECT count(*) FROM container_operations")
    rows = await conn.fetch(
        "SELECT id, status, controller_id, container_id, epoch, health, updated_at FROM model_services")
    registry = await conn.fetchval("SELECT count(*) FROM container_registry")
    not_running = await conn.fetchval("SELECT count(*) FROM container_registry WHERE status <> 'running'")
    return {"operations": operations, "registry": registry, "registry_not_running": not_running,
            "services": {r["id"]: tuple(r.values())[1:] for r in rows}}


def churn(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What changed between two ``state()`` reads: all zero when the hub found the seed consistent."""
    changed = sum(1 for sid, row in after["services"].items() if before["services"].get(sid) != row)
    return {"new_operations": after["operations"] - before["operations"],
            "services_changed": changed,
            "services_gone": len(before["services"].keys() - after["services"].keys()),
            "registry_rows_changed": after["registry"] - before["registry"],
            "registry_not_running": after["registry_not_running"]}


# ------------------------------------------------------- a seeded hub


@dataclass
class SeededHub:
    """A real hub process on a freshly seeded database (``seeded_hub()``)."""

    deployment: LocalDeployment
    db_url: str
    seeded: Seeded
    options: SimOptions
    seed_seconds: float = 0.0

    @property
    def url(self) -> str:
        return self.deployment.hub(0).url

    @property
    def pid(self) -> int:
        popen = self.deployment.hub(0).popen
        assert popen is not None
        return popen.pid

    def simulator(self, **changes: Any) -> Simulator:
        """The simulator the seed was made for, beating to this hub."""
        return Simulator(replace(self.options, hub_url=self.url, containers=self.seeded.containers, **changes))


@contextmanager
def seeded_hub(server_url: str, workdir: Path, count: int, services: int, *, interval: float = 2.0,
               grace: float = 6.0, prefix: str = "sim", hub_env: dict[str, str] | None = None,
               **sim: Any) -> Iterator[SeededHub]:
    """A new database on ``server_url`` seeded with ``services`` services on ``count`` simulated
    controllers, and a hub process (``mmanager hub serve``, as ``tests.support.procs`` starts it) on it."""
    db_url = asyncio.run(create_database(server_url, "seed"))
    deployment = LocalDeployment(db_url, workdir, interval=interval, grace=grace)
    options = SimOptions(count=count, key=deployment.key, port=free_port(), id_prefix=prefix,
                         max_containers=max(100, -(-services // count) * 2), **sim)
    began = time.monotonic()
    seeded = asyncio.run(seed(db_url, options, services))
    seconds = time.monotonic() - began
    deployment.plan_hubs(1)
    deployment.extra_hub_env = {"LOG_LEVEL": "WARNING", **(hub_env or {})}
    asyncio.run(touch(db_url))
    try:
        deployment.start()
        yield SeededHub(deployment, db_url, seeded, options, seconds)
    finally:
        deployment.stop()


async def all_beating(conn: asyncpg.Connection, ids: Sequence[str], since: float, timeout: float) -> float:
    """Wait until every controller in ``ids`` has a heartbeat recorded after ``since`` (epoch seconds)
    and is healthy; the seconds it took from ``since``. Raises TimeoutError with the count reached."""
    deadline = time.monotonic() + timeout
    while True:
        done = await conn.fetchval(
            "SELECT count(*) FROM mmanager_controllers WHERE id = ANY($1::text[]) AND status = 'healthy' "
            "AND extract(epoch FROM last_heartbeat_at) >= $2", list(ids), since)
        if done == len(ids):
            return time.time() - since
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {len(ids)} controllers beating after {timeout:g}s")
        await asyncio.sleep(0.5)
