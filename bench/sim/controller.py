"""One simulated controller: the controller HTTP API and its heartbeats, with containers in memory.

It keeps the rules the hub relies on, as ``controller.containers.ContainerService``
states them: a create carrying ``(service_id, epoch)`` is idempotent on that pair;
an older epoch than one seen for the service answers 409 STALE_EPOCH; at most
``max_containers`` containers; GPUs are handed out by ``controller.gpu.choose_gpus``;
with heartbeats on, no create, start or restart is taken until a heartbeat round
trip (its stop orders carried out) is younger than the grace the hub answered
(``controller.sync.SyncGuard``). Errors are the controller's own classes and
envelopes. What crosses the wire is ``mmanager.wire``'s models.

Not simulated: Docker itself (a container runs the moment it is created, and its
health check passes ``healthy_after`` seconds later), images (every image exists),
files, image routes, stats sampling, audit events.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from bench.sim.http import Client, ClientError, Request, Response
from controller.errors import (
    CapacityExceeded,
    ControllerError,
    InvalidRequest,
    NotFound,
    StaleEpoch,
    Unauthorized,
)
from controller.gpu import choose_gpus
from controller.sync import DEFAULT_INTERVAL, SyncGuard
from mmanager import __version__
from mmanager.wire import (
    LABEL_CONTROLLER,
    LABEL_EPOCH,
    LABEL_MANAGED,
    LABEL_SERVICE,
    ActionResult,
    ContainerCreate,
    ContainerCreated,
    ContainerInfo,
    ContainerList,
    ContainerUsage,
    ControllerHealth,
    GpuInfo,
    HealthCapabilities,
    HealthContainers,
    HealthResources,
    HealthState,
    Heartbeat,
    HeartbeatAnswer,
    HeartbeatContainer,
    ServerType,
    answer_wait,
    beat_pause,
    parse_memory,
    retry_after_seconds,
)

_LIVE = frozenset({"running", "restarting", "paused"})
# What the real controller accepts from the hub's answer (controller.heartbeat).
MIN_INTERVAL, MAX_INTERVAL = 0.05, 3600.0
_ports = itertools.count(20000)

# (controller, wall-clock time sent, wall-clock time answered or None, HTTP status or None)
BeatHook = Callable[["SimController", float, float | None, int | None], None]


@dataclass(slots=True)
class SimContainer:
    id: str
    name: str
    image: str
    service_id: str | None
    epoch: int | None
    labels: dict[str, str]
    ports: dict[str, int | None]
    gpu_device_ids: list[str]
    memory_limit: int | None
    cpu_limit: float | None
    has_health_check: bool
    status: str = "running"
    # The latest docker stats sample its beats carry, and the sampling period it is of.
    usage: ContainerUsage | None = None
    usage_period: int = -1
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    created_at: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.monotonic)

    def health(self, now: float, healthy_after: float) -> HealthState:
        if not self.has_health_check or self.status != "running":
            return "unknown"
        return "healthy" if now - self.started_at >= healthy_after else "unknown"

    def info(self, now: float, healthy_after: float) -> ContainerInfo:
        return ContainerInfo(
            id=self.id, container_id=self.id, name=self.name, image=self.image, status=self.status,
            state={"Status": self.status, "Running": self.status == "running"}, created=self.created,
            ports=self.ports, labels=self.labels, service_id=self.service_id, epoch=self.epoch,
            memory_limit=self.memory_limit, cpu_limit=self.cpu_limit, gpu_device_ids=self.gpu_device_ids,
            health=self.health(now, healthy_after),
        )


class SimController:
    def __init__(self, controller_id: str, address: str, port: int, *, key: str, server_type: ServerType,
                 max_containers: int, cpu_cores: float, memory_gb: float, gpus: list[GpuInfo],
                 healthy_after: float, heartbeats: bool, usage_every: float | None = None) -> None:
        self.id = controller_id
        self.address = address
        self.url = f"http://{address}:{port}"
        self.key = key
        self.server_type = server_type
        self.max_containers = max_containers
        self.cpu_cores = cpu_cores
        self.memory_gb = memory_gb
        self.gpus = gpus
        self.healthy_after = healthy_after
        self.usage_every = usage_every
        self.containers: dict[str, SimContainer] = {}
        self.epochs: dict[str, int] = {}
        self.sync = SyncGuard(required=heartbeats)
        self.interval = DEFAULT_INTERVAL
        self.sequence = 0
        # alive=False: the host is gone (connections dropped, no heartbeats); beating=False: only silent.
        self.alive = True
        self.beating = heartbeats
        self.beats_ok = 0
        self.beats_failed = 0
        # Failed beats by why: "no answer" or the hub's status.
        self.failures: collections.Counter[str] = collections.Counter()
        # As controller.heartbeat keeps them: failed beats in a row, the last one's Retry-After, ever answered.
        self.in_a_row = 0
        self.retry_after: float | None = None
        self.answered = False
        self.stops_applied = 0
        self._health_json: bytes | None = None
        self._auth = f"Bearer {key}"
        self._path = f"/api/controllers/{controller_id}/heartbeat"

    # -- state -------------------------------------------------------------

    def _changed(self) -> None:
        self._health_json = None

    def running(self) -> list[SimContainer]:
        return [c for c in self.containers.values() if c.status == "running"]

    def health(self) -> ControllerHealth:
        running = sum(c.status == "running" for c in self.containers.values())
        busy = {i for c in self.containers.values() if c.status in _LIVE for i in c.gpu_device_ids}
        return ControllerHealth(
            status="healthy", server_id=self.id, server_type=self.server_type, version=__version__, docker=True,
            containers=HealthContainers(running=running, max_allowed=self.max_containers,
                                        managed=len(self.containers)),
            resources=HealthResources(cpu_cores=self.cpu_cores, memory_total_gb=self.memory_gb,
                                      memory_available_gb=self.memory_gb),
            load_percentage=round(100 * running / self.max_containers, 2),
            memory_usage_percent=0.0,
            capabilities=HealthCapabilities(
                gpu_support=bool(self.gpus), max_memory_gb=self.memory_gb,
                gpus=[g.model_copy(update={"in_use": g.index in busy}) for g in self.gpus],
            ),
        )

    def _fence(self, service_id: str, epoch: int) -> None:
        current = self.epochs.get(service_id)
        if current is not None and epoch < current:
            raise StaleEpoch(
                f"epoch {epoch} of service {service_id} is older than epoch {current} already seen",
                {"service_id": service_id, "epoch": epoch, "current_epoch": current},
            )
        self.epochs[service_id] = max(epoch, current if current is not None else epoch)

    def preload(self, service_id: str, image: str) -> SimContainer:
        """A running container put in place behind the API's back (one from before a restart)."""
        container_id = uuid.uuid4().hex * 2
        container = SimContainer(
            id=container_id, name=f"sim-{container_id[:12]}", image=image, service_id=service_id, epoch=1,
            labels={LABEL_MANAGED: "true", LABEL_CONTROLLER: self.id, LABEL_SERVICE: service_id, LABEL_EPOCH: "1"},
            ports={"5000/tcp": next(_ports)}, gpu_device_ids=[], memory_limit=None, cpu_limit=None,
            has_health_check=True,
        )
        self.containers[container_id] = container
        self.epochs[service_id] = 1
        self._changed()
        return container

    def adopt(self, containers: Iterable[SimContainer]) -> None:
        """Containers already running when the simulation starts, exactly as a database seeded for them
        says (``bench.seed``): their ids, names, epochs, ports and labels are the registry's."""
        for container in containers:
            self.containers[container.id] = container
            if container.service_id is not None and container.epoch is not None:
                self.epochs[container.service_id] = max(container.epoch, self.epochs.get(container.service_id, 0))
        self._changed()

    # -- the controller API ------------------------------------------------

    async def handle(self, request: Request) -> Response:
        path = request.path.rstrip("/") or "/"
        try:
            if path == "/health" and request.method == "GET":
                return Response(body=self.health().model_dump_json().encode())
            if path == "/metrics":
                return Response(body=b"", content_type="text/plain; version=0.0.4")
            if request.headers.get("authorization", "") != self._auth:
                raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <MMANAGER_API_KEY>'")
            parts = path.split("/")[1:]
            if parts[0] != "containers":
                raise NotFound(f"no route {request.method} {path}")
            if len(parts) == 1:
                if request.method == "POST":
                    return self._create(request.body)
                if request.method == "GET":
                    return self._list(request.query.get("all", "false").lower() == "true")
            elif len(parts) == 2:
                if request.method == "GET":
                    return _ok(self._get(parts[1]).info(time.monotonic(), self.healthy_after))
                if request.method == "DELETE":
                    return self._act(parts[1], "delete", request.query)
            elif len(parts) == 3 and request.method == "POST" and parts[2] in ("start", "stop", "restart"):
                return self._act(parts[1], parts[2], request.query)
            elif len(parts) == 3 and request.method == "GET" and parts[2] == "logs":
                container = self._get(parts[1])
                text = f"simulated container {container.name}\n"
                if request.query.get("follow", "").lower() == "true":
                    return Response(body=text.encode(), content_type="text/plain; charset=utf-8")
                return Response.json({"container_id": container.id, "logs": text, "lines": 1})
            raise NotFound(f"no route {request.method} {path}")
        except ControllerError as exc:
            return Response.json(exc.envelope(), exc.status_code, headers=exc.headers)

    def _get(self, container_id: str) -> SimContainer:
        container = self.containers.get(container_id)
        if container is None:
            # Like Docker: a unique prefix of the id, or the name, also finds it.
            found = [c for c in self.containers.values() if c.id.startswith(container_id) or c.name == container_id]
            if len(found) != 1:
                raise NotFound(f"no managed container {container_id!r}", {"container_id": container_id})
            container = found[0]
        return container

    def _list(self, everything: bool) -> Response:
        now = time.monotonic()
        listed = [c.info(now, self.healthy_after) for c in self.containers.values()
                  if everything or c.status == "running"]
        return _ok(ContainerList(containers=listed))

    def _create(self, body: bytes) -> Response:
        try:
            config = ContainerCreate.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid request: {exc.errors()[0].get('msg', '')}") from None
        self.sync.check()
        if config.service_id:
            epoch = config.epoch or 0
            self._fence(config.service_id, epoch)
            for c in self.containers.values():
                if c.service_id == config.service_id and c.epoch == epoch:
                    if c.status not in _LIVE:
                        c.status, c.started_at = "running", time.monotonic()
                        self._changed()
                    return _ok(_created(c, created=False))
        if len(self.containers) >= self.max_containers:
            raise CapacityExceeded(
                f"this controller already manages {len(self.containers)} of at most {self.max_containers} containers",
                {"managed": len(self.containers), "max_containers": self.max_containers},
            )
        gpus: list[str] = []
        if config.gpu_count or config.gpu_device_ids:
            busy = {i for c in self.containers.values() if c.status in _LIVE for i in c.gpu_device_ids}
            gpus = choose_gpus(self.gpus, busy, config.gpu_count, config.gpu_device_ids)
        container_id = uuid.uuid4().hex * 2
        labels = {**(config.labels or {}), LABEL_MANAGED: "true", LABEL_CONTROLLER: self.id}
        if config.service_id:
            labels[LABEL_SERVICE] = config.service_id
            labels[LABEL_EPOCH] = str(config.epoch or 0)
        ports: dict[str, int | None] = {(k if "/" in k else f"{k}/tcp"): (v or next(_ports))
                                        for k, v in (config.ports or {}).items()}
        container = SimContainer(
            id=container_id, name=config.name or f"sim-{container_id[:12]}", image=config.image,
            service_id=config.service_id, epoch=(config.epoch or 0) if config.service_id else None, labels=labels,
            ports=ports, gpu_device_ids=gpus,
            memory_limit=parse_memory(config.memory_limit) if config.memory_limit else None,
            cpu_limit=config.cpu_limit, has_health_check=config.health_check is not None,
        )
        self.containers[container_id] = container
        self._changed()
        return _ok(_created(container, created=True), 201)

    def _act(self, container_id: str, action: str, query: dict[str, str]) -> Response:
        epoch = int(query["epoch"]) if "epoch" in query else None
        if action in ("start", "restart"):
            self.sync.check()
        container = self._get(container_id)
        if container.service_id:
            if epoch is not None:
                self._fence(container.service_id, epoch)
            if action == "start" and epoch is None and container.epoch is not None:
                self._fence(container.service_id, container.epoch)
        if action == "delete":
            del self.containers[container.id]
            done = "removed"
        elif action == "stop":
            container.status, done = "exited", "stopped"
        else:
            if action == "restart" or container.status != "running":
                container.started_at = time.monotonic()
            container.status, done = "running", f"{action}ed" if action == "restart" else "started"
        self._changed()
        return _ok(ActionResult(container_id=container.id, status=container.status if action != "delete" else done,
                                message=f"container {container.name} {done}"))

    # -- heartbeats --------------------------------------------------------

    def heartbeat_body(self) -> bytes:
        """The Heartbeat model's JSON; the health part is built again only when the containers changed."""
        if self._health_json is None:
            self._health_json = self.health().model_dump_json().encode()
        now = time.monotonic()
        entries = [
            HeartbeatContainer(
                container_id=c.id, name=c.name, service_id=c.service_id, epoch=c.epoch, state=c.status,
                health=c.health(now, self.healthy_after), age_seconds=round(now - c.created_at, 3), ports=c.ports,
                usage=self._usage(c) if self.usage_every and c.status == "running" else None,
            )
            for c in self.containers.values()
        ]
        # The model with a placeholder health, the cached health spliced in: same JSON as Heartbeat(...) gives.
        shell = Heartbeat.model_construct(
            server_id=self.id, url=self.url, server_type=self.server_type, sequence=self.sequence,
            health=None,  # type: ignore[arg-type]  # the placeholder; model_construct does not validate
            containers=entries, listing_age=0.0, audit=[],
        ).model_dump_json(warnings=False).encode()
        return shell.replace(b'"health":null', b'"health":' + self._health_json, 1)

    def _usage(self, c: SimContainer) -> ContainerUsage:
        """The container's stats sample of the current period (made once a period, as a controller samples):
        modest values, below every alert threshold; its I/O counters grow from period to period."""
        assert self.usage_every is not None
        period = int(time.time() // self.usage_every)
        if c.usage is None or c.usage_period != period:
            memory = (c.memory_limit or 512 << 20) // 4
            c.usage = ContainerUsage(
                sampled_at=datetime.fromtimestamp(period * self.usage_every, UTC), cpu_percent=float(5 + period % 30),
                memory_bytes=memory, memory_percent=25.0, network_rx_bytes=period % 10**6 * 1500,
                network_tx_bytes=period % 10**6 * 700, block_read_bytes=4096, block_write_bytes=period % 10**6 * 4096,
            )
            c.usage_period = period
        return c.usage

    def pause(self, due: float) -> float:
        """Seconds until the next beat, ``due`` being the cadence's (controller.heartbeat: mmanager.wire.beat_pause)."""
        return beat_pause(due, self.interval, self.in_a_row, answered=self.answered, retry_after=self.retry_after)

    def _failed(self, why: str, retry_after: float | None = None) -> bool:
        self.beats_failed += 1
        self.failures[why] += 1
        self.in_a_row += 1
        self.retry_after = retry_after
        return False

    async def beat(self, client: Client, hook: BeatHook | None = None) -> bool:
        began = self.sync.clock()
        self.sequence += 1
        body = self.heartbeat_body()
        sent = time.time()
        try:
            status, answer, headers = await client.request("POST", self._path, body, {"authorization": self._auth},
                                                           timeout=answer_wait(self.sync.grace))
        except ClientError:
            if hook is not None:
                hook(self, sent, None, None)
            return self._failed("no answer")
        if hook is not None:
            hook(self, sent, time.time(), status)
        if not self.alive:
            return self._failed("dead")
        if status != 200:
            return self._failed(str(status), retry_after_seconds(status, headers.get("retry-after"), MAX_INTERVAL))
        self.beats_ok += 1
        self.in_a_row, self.retry_after, self.answered = 0, None, True
        parsed = HeartbeatAnswer.model_validate_json(answer)
        for order in parsed.stop:
            if self.containers.pop(order.container_id, None) is not None:
                self.stops_applied += 1
                self._changed()
        if math.isfinite(parsed.interval):
            self.interval = min(max(parsed.interval, MIN_INTERVAL), MAX_INTERVAL)
        self.sync.synced(began, parsed.grace)
        return True


def _ok(model: ContainerCreated | ContainerInfo | ContainerList | ActionResult, status: int = 200) -> Response:
    return Response(status, model.model_dump_json().encode())


def _created(c: SimContainer, *, created: bool) -> ContainerCreated:
    return ContainerCreated(container_id=c.id, name=c.name, status=c.status, ports=c.ports, service_id=c.service_id,
                            epoch=c.epoch, created=created, gpu_device_ids=c.gpu_device_ids)
