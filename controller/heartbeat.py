"""Heartbeats: this controller tells the hub what it runs, and removes what the hub says is stale.

With ``MMANAGER_HUB_URL`` set, ``HeartbeatAgent`` POSTs a ``Heartbeat`` to
``{hub}/api/controllers/{SERVER_ID}/heartbeat`` (``Authorization: Bearer``
this controller's own key, else ``MMANAGER_API_KEY``; see ``controller.credentials``)
right at start and then every ``interval`` seconds (2 until the hub's first
answer names its own). The body carries this
controller's ``/health`` and every managed container, running or not,
plus the audit events the hub has not acknowledged yet (``controller.audit``).
When the hub refuses a beat's body (400, 422) while it carries audit events,
the next beat goes without them; if the hub takes that one, those events were
the trouble and leave the queue (they stay in the log), so no event can cut a
controller off from a hub.

``MMANAGER_HUB_URL`` may list several hub replicas, comma-separated. A beat
goes to the one that answered last; when that one fails it goes on to the
next within the same beat (each gets ``grace / 2`` seconds, between 1 and 5),
so a replica's death costs no heartbeat.

The answer (``HeartbeatAnswer``) names the interval and grace to use and the
containers to stop: each is force-removed through ``ContainerService`` (so
the service's lock holds; one already gone is fine). A round trip whose stop
orders were all carried out re-opens the sync guard (``controller.sync``).

Once a hub has answered, the agent also holds a presence stream open to the
replica its beats go to (``controller.presence``; ``MMANAGER_PRESENCE=false``
turns it off), so that the hub learns of this process's death at once; it runs
beside the beats and never holds one up.

Nothing is retried within a beat: the next beat is the retry, and after a
failure it waits a jittered backoff (``mmanager.wire.beat_pause``), at least
the Retry-After of a hub that sheds beats, so that a fleet whose beats all went
unanswered at once does not send them all again at once. Failures (hub
down, an error status, an answer that is not a heartbeat answer) are logged,
the first of a run and then at most once a minute, and recoveries are logged
too; none ends the loop. Docker is read with a budget: when it does not
answer in time (or at all), the heartbeat still goes out, saying so
(``health.docker`` false, ``health.status`` unhealthy) and repeating the last
container list Docker gave, so that a hung daemon makes the hub see an
unhealthy controller, not one whose containers all vanished. The image list
(``controller.inventory``) is taken in the background and never waited for; a
beat with it that the hub refuses as too large (413) is followed by one without
it, and later lists are cut to fewer bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from controller.audit import AuditTrail
from controller.config import ControllerSettings
from controller.containers import ContainerService
from controller.credentials import HeartbeatKey
from controller.errors import ControllerError, NotFound
from controller.gpu_monitor import GpuMonitor, with_gpu_usage
from controller.health import ControllerMetrics, collect_health, docker_down_health
from controller.inventory import ImageInventory
from controller.jobs import JobRunner
from controller.presence import PresenceAgent
from controller.probes import Prober
from controller.runtime import Runtime
from controller.stats import StatsSampler
from controller.sync import DEFAULT_INTERVAL
from mmanager.loops import LoopService
from mmanager.wire import (
    AuditEvent,
    ContainerInfo,
    ControllerHealth,
    Heartbeat,
    HeartbeatAnswer,
    HeartbeatContainer,
    HeldImage,
    StopOrder,
    answer_wait,
    beat_pause,
    retry_after_seconds,
    seconds_since,
)

# Seconds Docker gets to say what runs, per heartbeat.
DOCKER_BUDGET = 4.0
# Seconds stop() waits for the cancelled loop.
STOP_WAIT = 5.0
# Seconds the stop orders of one answer get, all together.
STOP_BUDGET = 30.0
# Bounds on what the hub may ask for.
MIN_INTERVAL, MAX_INTERVAL = 0.05, 3600.0
MIN_GRACE, MAX_GRACE = 0.1, 86400.0
# A failure that goes on is logged again at most this often.
WARN_EVERY = 60.0

log = logging.getLogger(__name__)


# The failures of a heartbeat whose body the hub refused (not its key, not the hub's own trouble).
REFUSED_BODY = frozenset({"HTTP 400", "HTTP 422"})
# A body over the hub's limit (MMANAGER_MAX_HEARTBEAT_BYTES).
TOO_LARGE = "HTTP 413"


class _BeatFailed(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # Seconds the hub asked to be left alone (Retry-After of a 503 or 429).
        self.retry_after = retry_after


class HeartbeatAgent(LoopService):
    name = "heartbeat"
    cancel_on_stop = True
    # Bounded: a beat stuck somewhere uncancellable must not hold up the controller's shutdown.
    stop_wait = STOP_WAIT

    def __init__(
        self,
        settings: ControllerSettings,
        runtime: Runtime,
        containers: ContainerService,
        prober: Prober,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: ControllerMetrics | None = None,
        audit: AuditTrail | None = None,
        sampler: StatsSampler | None = None,
        gpu_monitor: GpuMonitor | None = None,
        jobs: JobRunner | None = None,
    ) -> None:
        if not settings.hub_url:
            raise ValueError("heartbeats need MMANAGER_HUB_URL")
        super().__init__(DEFAULT_INTERVAL, jitter=0.0)
        self.settings = settings
        self.runtime = runtime
        self.containers = containers
        self.prober = prober
        self.metrics = metrics
        self.audit = audit
        self.sampler = sampler
        self.gpu_monitor = gpu_monitor
        self.jobs = jobs
        # Read before every beat: a key file rewritten by an operator is picked up without a restart.
        self.key = HeartbeatKey(settings)
        self.sync = containers.sync
        self.hub_urls = [url.strip().rstrip("/") for url in settings.hub_url.split(",") if url.strip()]
        if not self.hub_urls:
            raise ValueError("MMANAGER_HUB_URL names no hub")
        # The hub that answered last: beats go there first.
        self.current = 0
        self.path = f"/api/controllers/{quote(settings.server_id, safe='')}/heartbeat"
        self.sequence = 0
        # Failed beats in a row, and the Retry-After of the last one (None: the hub asked for none).
        self.failures = 0
        self.retry_after: float | None = None
        self.last_answer: HeartbeatAnswer | None = None
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        # When the beat under way began (``sync.clock()`` time): the cadence counts from there.
        self._began = self.sync.clock()
        self._last_listing: list[ContainerInfo] = []
        self._listed_clock = self.sync.clock()
        self.images = ImageInventory(runtime, settings.images_interval, self.sync.clock)
        # The hub refused the last beat, which carried the image list, as too large.
        self._images_refused = False
        self._failure_kind: str | None = None
        # The audit events of the last beat the hub refused as a bad body, until a beat without them tells.
        self._refused_audit: list[AuditEvent] | None = None
        self._warned_at = -math.inf
        self.presence = (PresenceAgent(settings, lambda: self.hub_url, self.key.current, transport=transport)
                         if settings.presence else None)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            return
        self._client = httpx.AsyncClient(
            transport=self._transport,
            # A hub on https is verified against MMANAGER_TLS_CA (else the system store); our own
            # certificate goes along for a hub that requires one (MMANAGER_TLS_CLIENT_AUTH).
            verify=self.settings.tls.client_context(),
        )
        super().start()

    async def stop(self) -> None:
        if self.presence is not None:
            await self.presence.stop()
        await super().stop()
        await self.images.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run_once(self) -> None:
        self._began = self.sync.clock()
        self.retry_after = None
        await self.beat(self._began)

    def failed(self, exc: Exception) -> None:
        self._failed(type(exc).__name__, f"unexpected error: {exc!r}", exc_info=True)

    def next_delay(self, took: float) -> float:
        # Beats keep their cadence (one that ran late, or a process that was frozen, goes again at
        # once); one that failed goes again after a jittered backoff (mmanager.wire.beat_pause), sooner
        # than the cadence while no hub ever answered (started before it, as `mmanager dev` starts them).
        return beat_pause(self._began + self.interval - self.sync.clock(), self.interval, self.failures,
                          answered=self.last_answer is not None, retry_after=self.retry_after)

    # -- one beat ----------------------------------------------------------

    async def beat(self, began: float | None = None) -> bool:
        """One round trip; True when it completed and its stop orders were carried out."""
        began = self.sync.clock() if began is None else began
        self.sequence += 1
        probing = self._refused_audit is not None
        heartbeat = await self.build(self.sequence, audit=not probing)
        try:
            answer = await self._send(heartbeat)
        except _BeatFailed as exc:
            self._failed(exc.kind, exc.message)
            self.retry_after = exc.retry_after
            # A body the hub refuses (400, 422) that carried audit events: the next beat goes without
            # them, to tell whether they are what it refuses (an event no hub version should take must
            # not cut this controller off). A probe that fails too clears the suspicion.
            self._refused_audit = (heartbeat.audit if not probing and heartbeat.audit
                                   and exc.kind in REFUSED_BODY else None)
            if exc.kind == TOO_LARGE and heartbeat.images:
                self._images_refused = True
                self.images.shrink()
            return False
        self._answered(answer)
        if self.audit is not None:
            if probing:
                refused, self._refused_audit = self._refused_audit or [], None
                self.audit.acknowledge(refused)
                log.warning("the hub refused a heartbeat with %d audit events and took one without them: "
                            "those events are dropped from the queue (this controller's log has each of them)",
                            len(refused))
            else:
                # Only now: a beat that failed carries the same events again next time.
                self.audit.acknowledge(heartbeat.audit)
        done = await self._apply(answer.stop)
        self.interval = _bounded(answer.interval, MIN_INTERVAL, MAX_INTERVAL, self.interval)
        grace = _bounded(answer.grace, MIN_GRACE, MAX_GRACE, self.sync.grace)
        if done:
            self.sync.synced(began, grace)
        else:
            self.sync.grace = grace
        return done

    async def build(self, sequence: int, *, audit: bool = True) -> Heartbeat:
        try:
            health, listed = await asyncio.wait_for(self._read_docker(), DOCKER_BUDGET)
        except TimeoutError:
            health = docker_down_health(self.settings, f"Docker did not answer within {DOCKER_BUDGET:g} s")
            listed = self._last_listing
        if health.docker:
            self.images.refresh()  # in the background: the beat goes with the last listing
        version, images = self.images.version, self.images.images
        if self._images_refused:
            # The hub refused the last beat's body as too large while it carried the list: this one goes
            # without (the hub then forgets the set it held), later ones with the list under a lower cap.
            self._images_refused = False
            version, images = None, None
        return Heartbeat(
            server_id=self.settings.server_id,
            url=self.settings.controller_url,
            server_type=self.settings.server_type,
            sequence=sequence,
            health=with_gpu_usage(health, self.gpu_monitor),
            containers=[self._entry(info) for info in listed],
            # The hub dates the listing by this, so it never overrides a newer change with it.
            listing_age=round(max(self.sync.clock() - self._listed_clock, 0.0), 3),
            audit=self.audit.batch() if self.audit is not None and audit else [],
            images_version=version,
            images=(sent := self._images_to_send(version, images)),
            images_partial=sent is not None and self.images.partial,
        )

    def _images_to_send(self, version: str | None, images: list[HeldImage] | None) -> list[HeldImage] | None:
        """The full list only while the hub's last answer did not hold this version (a new set, a hub that
        restarted, another hub replica)."""
        held = self.last_answer.images_version if self.last_answer is not None else None
        return None if version is None or held == version else images

    async def _read_docker(self) -> tuple[ControllerHealth, list[ContainerInfo]]:
        health = await collect_health(self.settings, self.runtime, self.containers.gpus)
        if not health.docker:
            return health, self._last_listing
        listed_clock = self.sync.clock()
        try:
            listed = await self.runtime.list_containers(all=True, detailed=False)
        except ControllerError as exc:
            return docker_down_health(self.settings, exc.message), self._last_listing
        self._last_listing, self._listed_clock = listed, listed_clock
        return health, listed

    def _entry(self, info: ContainerInfo) -> HeartbeatContainer:
        health, restarts, detail = self.prober.report(info.id)
        age = seconds_since(info.created)
        return HeartbeatContainer(
            container_id=info.id,
            name=info.name,
            service_id=info.service_id,
            epoch=info.epoch,
            state=info.status,
            health=health,
            health_restarts=restarts,
            health_detail=detail,
            age_seconds=round(max(age or 0.0, 0.0), 3),
            ports=info.ports,
            usage=self.sampler.usage(info.id) if self.sampler is not None else None,
            job_id=info.job_id,
            attempt_id=info.attempt_id,
        )

    @property
    def hub_url(self) -> str:
        return self.hub_urls[self.current]

    async def _send(self, heartbeat: Heartbeat) -> HeartbeatAnswer:
        """The answer of the first hub that gives one, starting with the one that answered last."""
        body = heartbeat.model_dump(mode="json")
        failures: list[tuple[str, _BeatFailed]] = []
        for step in range(len(self.hub_urls)):
            index = (self.current + step) % len(self.hub_urls)
            try:
                answer = await self._send_to(self.hub_urls[index], body)
            except _BeatFailed as exc:
                failures.append((self.hub_urls[index], exc))
                continue
            if index != self.current:
                log.info("heartbeats now go to hub %s", self.hub_urls[index])
                self.current = index
            return answer
        if len(failures) == 1:
            raise failures[0][1]
        # When every hub asked to be left alone, the next beat goes when the first of them allows.
        waits = [f.retry_after for _, f in failures if f.retry_after is not None]
        raise _BeatFailed(
            " | ".join(f.kind for _, f in failures), "; ".join(f"{url}: {f.message}" for url, f in failures),
            min(waits) if len(waits) == len(failures) else None,
        )

    async def _send_to(self, hub_url: str, body: dict[str, object]) -> HeartbeatAnswer:
        assert self._client is not None, "start() the agent first"
        timeout = answer_wait(self.sync.grace)
        try:
            response = await self._client.post(
                hub_url + self.path, json=body, timeout=timeout,
                headers={"Authorization": f"Bearer {self.key.current()}"},
            )
        except httpx.TimeoutException:
            raise _BeatFailed("timeout", f"the hub did not answer within {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise _BeatFailed(type(exc).__name__, f"hub unreachable: {type(exc).__name__} {exc}".rstrip()) from None
        if not response.is_success:
            raise _BeatFailed(
                f"HTTP {response.status_code}", f"the hub answered {response.status_code}: {_excerpt(response)}",
                retry_after_seconds(response.status_code, response.headers.get("retry-after"), MAX_INTERVAL),
            )
        try:
            return HeartbeatAnswer.model_validate_json(response.content)
        except ValidationError as exc:
            errors = exc.errors()
            problem = (f"{'.'.join(map(str, errors[0]['loc']))}: {errors[0]['msg']}".lstrip(": ") if errors
                       else str(exc))
            raise _BeatFailed("bad answer", f"the hub's answer is not a heartbeat answer ({problem})") from None

    # -- stop orders -------------------------------------------------------

    async def _apply(self, orders: Iterable[StopOrder]) -> bool:
        unique = list({order.container_id: order for order in orders}.values())
        if not unique:
            return True
        try:
            results = await asyncio.wait_for(asyncio.gather(*(self._stop(o) for o in unique)), STOP_BUDGET)
        except TimeoutError:
            log.warning(
                "the hub's %d stop order(s) were not done within %g s; no new work until a heartbeat completes them",
                len(unique),
                STOP_BUDGET,
            )
            return False
        return all(results)

    async def _stop(self, order: StopOrder) -> bool:
        what = f"container {order.container_id[:12]} (service {order.service_id}, epoch {order.epoch})"
        attempt = order.attempt_id or (self.jobs.attempt_of(order.container_id) if self.jobs is not None else None)
        if attempt is not None and self.jobs is not None:
            # A job's attempt the hub no longer wants: its run is forgotten and its files go with the container.
            what = f"container {order.container_id[:12]} (job attempt {attempt})"
            try:
                await self.jobs.discard(attempt)
            except ControllerError as exc:
                log.warning("could not drop %s as the hub ordered (%s): %s", what, order.reason, exc.message)
                return False
        try:
            await self.containers.remove(order.container_id, force=True)
        except NotFound:
            log.info("the hub ordered %s removed (%s): already gone", what, order.reason)
            return True
        except ControllerError as exc:
            log.warning("could not remove %s as the hub ordered (%s): %s", what, order.reason, exc.message)
            return False
        log.info("removed %s on the hub's order: %s", what, order.reason)
        return True

    # -- logging -----------------------------------------------------------

    def _answered(self, answer: HeartbeatAnswer) -> None:
        if self.failures:
            log.info("heartbeats reach the hub again after %d failed", self.failures)
        elif self.last_answer is None:
            log.info(
                "hub %s answered the first heartbeat: interval %g s, grace %g s",
                self.hub_url,
                answer.interval,
                answer.grace,
            )
        if self.last_answer is None and self.presence is not None:
            self.presence.start()
        self.failures = 0
        self._failure_kind = None
        self.last_answer = answer

    @property
    def _hubs(self) -> str:
        return self.hub_urls[0] if len(self.hub_urls) == 1 else "every hub"

    def _failed(self, kind: str, message: str, *, exc_info: bool = False) -> None:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.heartbeat_failed()
        now = self.sync.clock()
        if self.failures == 1 or kind != self._failure_kind or now - self._warned_at >= WARN_EVERY:
            again = f" ({self.failures} in a row)" if self.failures > 1 else ""
            log.warning("heartbeat to %s failed%s: %s", self._hubs, again, message, exc_info=exc_info)
            self._warned_at = now
        else:
            log.debug("heartbeat to %s failed (%d in a row): %s", self._hubs, self.failures, message)
        self._failure_kind = kind


def _bounded(value: float, low: float, high: float, fallback: float) -> float:
    return min(max(value, low), high) if math.isfinite(value) else fallback


def _excerpt(response: httpx.Response) -> str:
    """The error message of an error envelope, else the start of the body."""
    try:
        body = response.json()
        message = body["error"]["message"]
        code = body["error"].get("code")
        return f"{code}: {message}" if code else str(message)
    except Exception:
        return response.text[:200] or response.reason_phrase
