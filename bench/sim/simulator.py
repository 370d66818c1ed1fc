"""Thousands of simulated controllers in one asyncio process, like kubemark or nomad-nodesim.

Addressing: the hub reaches a controller at ``http://host:port`` (no path), so each
simulated controller gets a loopback address of its own (``127.1.0.1``,
``127.1.0.2``, …: all of 127.0.0.0/8 is the loopback interface on Linux) on one
shared port; one socket listening on 0.0.0.0 takes every connection and the
address it arrived on names the controller (connections to a non-loopback
address are closed at once).

Registration: with ``hub_url`` set, each controller pushes heartbeats with the
shared key, carrying its URL, and the hub registers it on its first beat
(``hub.services.heartbeats``). Without one, the caller registers the
controllers (``entries()`` is ``MMANAGER_CONTROLLERS``' shape) and the hub polls.

A killed controller stops beating and drops every connection made to it, so the
hub's calls fail as they would to a host that is gone; ``revive`` brings it back
with the containers it had (stale copies the next heartbeat's stop orders remove).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.sim.controller import BeatHook, SimContainer, SimController
from bench.sim.http import Client, Request, Response, Server
from mmanager.wire import GpuInfo, ServerType

log = logging.getLogger(__name__)


@dataclass
class SimOptions:
    count: int = 100
    key: str = ""
    # Where heartbeats go; None: no heartbeats, the hub polls.
    hub_url: str | None = None
    port: int = 0
    first_address: str = "127.1.0.1"
    id_prefix: str = "sim"
    # Shares of server types, e.g. {"cpu": 0.8, "gpu": 0.2}; the gpu ones get `gpus_per_server` GPUs.
    server_types: dict[ServerType, float] = field(default_factory=lambda: {"cpu": 1.0})
    gpus_per_server: int = 4
    gpu_model: str = "A100"
    gpu_memory_mb: int = 81920
    max_containers: int = 100
    cpu_cores: float = 16.0
    memory_gb: float = 64.0
    # Seconds from a container's start to its health check passing.
    healthy_after: float = 0.0
    # Concurrent connections to the hub for all heartbeats together.
    connections: int = 64
    # Seconds over which the first heartbeats are spread (None: one interval).
    ramp: float | None = None
    seed: int = 0
    # Running containers each controller starts with (for a density measurement; a real hub would
    # order them removed as orphans).
    preload: int = 0
    # Containers each controller starts with, by controller id: the ones a seeded database says run
    # there (``bench.seed``), so the hub finds every service where it expects it.
    containers: Mapping[str, Sequence[SimContainer]] = field(default_factory=dict)
    # Seconds between the docker stats samples each running container carries in its beats (a real
    # controller samples every 10 s, MMANAGER_STATS_INTERVAL); None: beats carry no usage.
    usage_every: float | None = None


class Simulator:
    def __init__(self, options: SimOptions, hook: BeatHook | None = None) -> None:
        if options.hub_url and not options.key:
            raise ValueError("heartbeats need the key")
        self.options = options
        self.hook = hook
        self.server = Server(self._dispatch, "0.0.0.0", options.port)
        self.controllers: dict[str, SimController] = {}
        self._by_address: dict[str, SimController] = {}
        self._client: Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Unexpected exceptions in heartbeats, by type.
        self.errors: dict[str, int] = {}

    async def start(self) -> None:
        o = self.options
        port = await self.server.start()
        rng = random.Random(o.seed)
        types = list(o.server_types)
        weights = [o.server_types[t] for t in types]
        for controller_id, address in layout(o):
            server_type = rng.choices(types, weights)[0] if len(types) > 1 else types[0]
            gpus = ([GpuInfo(index=str(g), model=o.gpu_model, memory_mb=o.gpu_memory_mb)
                     for g in range(o.gpus_per_server)] if server_type == "gpu" else [])
            controller = SimController(
                controller_id, address, port, key=o.key, server_type=server_type,
                max_containers=o.max_containers, cpu_cores=o.cpu_cores, memory_gb=o.memory_gb, gpus=gpus,
                healthy_after=o.healthy_after, heartbeats=o.hub_url is not None, usage_every=o.usage_every,
            )
            for k in range(o.preload):
                controller.preload(f"pre-{controller.id}-{k}", "sim/preloaded:latest")
            controller.adopt(o.containers.get(controller.id, ()))
            self.controllers[controller.id] = controller
            self._by_address[address] = controller
        if o.hub_url:
            self._client = Client(o.hub_url, o.connections)
            ramp = o.ramp if o.ramp is not None else next(iter(self.controllers.values())).interval
            for n, controller in enumerate(self.controllers.values()):
                delay = ramp * n / max(len(self.controllers), 1)
                self._tasks.append(asyncio.create_task(self._beat_loop(controller, delay), name=controller.id))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a beat stuck somewhere must not hold up the caller.
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()
        await self.server.stop()
        if self._client is not None:
            await self._client.aclose()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def entries(self, **extra: object) -> list[dict[str, object]]:
        """The controllers as ``MMANAGER_CONTROLLERS`` entries (for a hub that polls them)."""
        return [{"id": c.id, "url": c.url, "server_type": c.server_type, **extra} for c in self.controllers.values()]

    def kill(self, ids: Iterable[str]) -> None:
        for cid in ids:
            controller = self.controllers[cid]
            controller.alive = controller.beating = False
            self.server.drop(controller.address)

    def silence(self, ids: Iterable[str]) -> None:
        """Stop heartbeats only: the controller still answers the hub (a partition of the heartbeat path)."""
        for cid in ids:
            self.controllers[cid].beating = False

    def revive(self, ids: Iterable[str]) -> None:
        for cid in ids:
            controller = self.controllers[cid]
            controller.alive = True
            controller.beating = self._client is not None

    def stats(self) -> dict[str, int]:
        cs = self.controllers.values()
        return {
            "controllers": len(self.controllers),
            "alive": sum(c.alive for c in cs),
            "containers": sum(len(c.containers) for c in cs),
            "running": sum(len(c.running()) for c in cs),
            "beats_ok": sum(c.beats_ok for c in cs),
            "beats_failed": sum(c.beats_failed for c in cs),
            "stops_applied": sum(c.stops_applied for c in cs),
            "errors": sum(self.errors.values()),
        }

    def failures(self) -> dict[str, int]:
        """Failed beats of live controllers, by why ("no answer", or the hub's status)."""
        total: collections.Counter[str] = collections.Counter()
        for c in self.controllers.values():
            total.update(c.failures)
        return dict(total)

    async def _dispatch(self, request: Request) -> Response | None:
        controller = self._by_address.get(request.local[0])
        if controller is None:
            return Response.json({"error": {"code": "NOT_FOUND", "message": "no simulated controller here"}}, 404)
        if not controller.alive:
            return None
        return await controller.handle(request)

    async def _beat_loop(self, controller: SimController, delay: float) -> None:
        assert self._client is not None
        loop = asyncio.get_running_loop()
        await asyncio.sleep(delay)
        while True:
            began = loop.time()
            if controller.beating:
                try:
                    await controller.beat(self._client, self.hook)
                except Exception as exc:  # a bug, or an answer no hub should give: count it, keep beating
                    controller.beats_failed += 1
                    self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                    if sum(self.errors.values()) == 1:
                        log.exception("heartbeat of %s failed unexpectedly", controller.id)
            # Beats keep their cadence, a failed one goes again after a jittered backoff (controller.heartbeat).
            await asyncio.sleep(controller.pause(began + controller.interval - loop.time()))


def layout(options: SimOptions) -> list[tuple[str, str]]:
    """The controllers ``Simulator(options)`` runs, in order: (id, loopback address)."""
    return [(f"{options.id_prefix}-{i:05d}", address)
            for i, address in enumerate(_addresses(options.first_address, options.count))]


def _addresses(first: str, count: int) -> list[str]:
    """``count`` loopback addresses from ``first``, skipping .0 and .255 in the last byte."""
    start = ipaddress.IPv4Address(first)
    if not start.is_loopback:
        raise ValueError(f"{first} is not a loopback address")
    found: list[str] = []
    n = int(start)
    while len(found) < count:
        address = ipaddress.IPv4Address(n)
        if not address.is_loopback or str(address) == "127.255.255.255":
            raise ValueError(f"not enough loopback addresses from {first} for {count} controllers")
        if n & 0xFF not in (0, 255):
            found.append(str(address))
        n += 1
    return found
