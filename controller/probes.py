"""HTTP health probes of the services in managed containers, and restarts in place.

A container created with a ``health_check`` carries it as the label
``mmanager.health_check`` (JSON of ``HealthCheck``), so a restarted controller
still knows what to probe. ``Prober`` ticks every ``TICK`` seconds: it lists
the managed containers (one cheap Docker call), forgets those that are gone,
and starts a probe for each running one with a check that is due. Probes run
as their own tasks, at most ``MAX_PROBES`` at once, so one slow service never
delays the others (nor the tick).

A probe is an HTTP GET of ``http://<host>:<port><path>`` with the check's
timeout; any 2xx or 3xx answer passes (redirects are not followed). The
address: the host port Docker published for ``<check.port>/tcp``, on
``PUBLISH_IP`` (127.0.0.1 when that is unset or a wildcard); when that port
is not published, the container's own address on its network, at
``check.port`` (127.0.0.1 with host networking).

Health per container (kept in memory, by container id):

- ``unknown`` from each (re)start until a probe passes; ``healthy`` after a
  pass; ``unhealthy`` after ``failure_threshold`` counted failures in a row.
- Until the first pass after a start, probes run every tick so a fresh
  service shows healthy quickly; failures in that phase are counted at most
  once per ``interval`` (so ``failure_threshold × interval`` keeps its
  meaning), and not at all within ``start_period`` of Docker's ``StartedAt``.
  After a pass, probes run every ``interval`` and every failure counts.
- An unhealthy container is restarted in place (through
  ``ContainerService.heal``: the service's lock and the epoch fence apply);
  its ``health_restarts`` goes up by one (the count survives the restart)
  and it is judged afresh, from ``unknown``. A start seen in Docker that the
  prober did not make (restart policy, the hub's restart) resets it too.
- Containers without a check are ``unknown`` with whatever restart count
  they have (none).

Golden-inference probes: a check may carry a ``probe`` (path, body, expect,
tolerance). After each start (the controller's, Docker's, a restart in
place), once the GET first passes, the prober POSTs ``body`` as JSON to the
probe's path on the check's port, once, and compares the JSON answer with
``expect`` (``mmanager.golden.mismatch``). The container is ``healthy`` only
after both pass; then only the GET runs, every ``interval``, until the next
start. A failed connection, a timeout or a 502/503/504 is tried again
(``PROBE_ATTEMPTS`` in all, within the one probe) and then counts as a failed
health probe (restarts in place included). Any other answer that does not
match (another status, not JSON, a value out of tolerance) is a wrong answer:
the container is ``unhealthy`` at once, with a ``health_detail`` that says
where and what (``probe /predict: data.x: expected 0.41, got 0.98``), and it
stays so, neither probed nor restarted, until it is started again: a restart
cannot fix wrong weights, and the hub keeps it out of the gateway. An
unhealthy container's ``health_detail`` is the last failed probe's result;
a healthy or unknown one has none.

Each start being judged is a generation of the container's probe state
(bumped by ``started()``, busy or not, and by a StartedAt change): a probe's
result counts only for the generation it was sent in, so an answer the old
process gave before a restart never judges the new one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from controller.config import ControllerSettings
from controller.containers import ContainerService
from controller.errors import ControllerError, NotFound
from controller.runtime import Runtime
from mmanager.golden import mismatch
from mmanager.loops import LoopService
from mmanager.wire import (
    LABEL_HEALTH_CHECK,
    PROBE_FAILED,
    ContainerInfo,
    GoldenProbe,
    HealthCheck,
    HealthState,
    seconds_since,
)

# Seconds between ticks, and between probes of a container that has not passed yet.
TICK = 0.25
# Probes in flight at once, across all containers.
MAX_PROBES = 32
# Seconds Docker waits for a clean stop when restarting an unhealthy container.
RESTART_TIMEOUT = 10
# Tries of a golden-inference probe that finds no answer (connection refused, timeout, 502/503/504),
# PROBE_PAUSE seconds apart, before it counts as one failed health probe.
PROBE_ATTEMPTS = 3
PROBE_PAUSE = 0.5
# A golden probe may wait this many times the check's timeout (and at least PROBE_MIN_TIMEOUT seconds):
# an inference is slower than /health, the first one most of all.
PROBE_TIMEOUT_FACTOR = 2.0
PROBE_MIN_TIMEOUT = 5.0
# The most of a golden probe's answer that is read.
PROBE_MAX_ANSWER = 16 * 1024 * 1024
# The longest health_detail a wrong answer gets.
MAX_DETAIL = 1024
# Answers that say the service is not ready yet, not that it is wrong.
_NOT_YET = frozenset({502, 503, 504})

log = logging.getLogger(__name__)


def read_health_check(labels: dict[str, str]) -> HealthCheck | None:
    """The check a container was created with; raises ``ValidationError`` for a damaged label."""
    raw = labels.get(LABEL_HEALTH_CHECK)
    return HealthCheck.model_validate_json(raw) if raw else None


def probe_host(publish_ip: str) -> str:
    """Where published ports are reached from this host."""
    if not publish_ip or ipaddress.ip_address(publish_ip).is_unspecified:
        return "127.0.0.1"
    return publish_ip


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@dataclass
class _Probe:
    check: HealthCheck
    health: HealthState = "unknown"
    # Counted failures in a row.
    failures: int = 0
    # A probe passed since the start being judged.
    passed: bool = False
    # Docker's StartedAt of the start being judged; None until a probe has read it.
    started_at: str | None = None
    # time.monotonic() at which the next probe is due.
    next_at: float = 0.0
    last_counted: float | None = None
    busy: bool = False
    last_result: str | None = None
    # The golden probe matched since the start being judged (or the check has none).
    verified: bool = False
    # The golden probe got a wrong answer: unhealthy, not probed again until the next start.
    wrong: bool = False
    # Why it is unhealthy; None otherwise.
    detail: str | None = None
    # The start being judged: a probe's result counts only for the generation it was sent in.
    generation: int = 0

    def reset(self) -> None:
        self.generation += 1
        self.health = "unknown"
        self.failures = 0
        self.passed = False
        self.started_at = None
        self.last_counted = None
        self.verified = False
        self.wrong = False
        self.detail = None


class Prober(LoopService):
    name = "health-prober"
    cancel_on_stop = True
    # Bounded: a probe stuck somewhere uncancellable must not hold up the controller's shutdown.
    stop_wait = 5.0

    def __init__(
        self,
        settings: ControllerSettings,
        runtime: Runtime,
        containers: ContainerService,
        *,
        tick: float = TICK,
        restart_timeout: int = RESTART_TIMEOUT,
        max_concurrent: int = MAX_PROBES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(tick, jitter=0.0)
        self.runtime = runtime
        self.containers = containers
        self.tick_seconds = tick
        self.restart_timeout = restart_timeout
        self._host = probe_host(settings.publish_ip)
        self._max_concurrent = max_concurrent
        self._transport = transport
        self._probes: dict[str, _Probe] = {}
        self._restarts: dict[str, int] = {}
        self._bad_labels: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore: asyncio.Semaphore | None = None
        self._client: httpx.AsyncClient | None = None
        # Listing the containers fails (Docker away): said once, until it answers again.
        self._paused = False

    # -- what the API and heartbeats report ------------------------------

    def health(self, container_id: str) -> tuple[HealthState, int]:
        """``(health, health_restarts)`` of a container, by its full id."""
        probe = self._probes.get(container_id)
        return (probe.health if probe else "unknown"), self._restarts.get(container_id, 0)

    def report(self, container_id: str) -> tuple[HealthState, int, str | None]:
        """``(health, health_restarts, health_detail)`` of a container, by its full id."""
        probe = self._probes.get(container_id)
        if probe is None:
            return "unknown", self._restarts.get(container_id, 0), None
        return probe.health, self._restarts.get(container_id, 0), probe.detail

    def decorate(self, info: ContainerInfo) -> ContainerInfo:
        health, restarts, detail = self.report(info.id)
        return info.model_copy(update={"health": health, "health_restarts": restarts, "health_detail": detail})

    def started(self, container_id: str) -> None:
        """The API (re)started a container: judged afresh now, not once a probe sees its new StartedAt
        (a golden probe's wrong answer is not probed again until then). A probe in flight meanwhile may
        have been answered by the old process: the new generation discards its result."""
        probe = self._probes.get(container_id)
        if probe is not None:
            probe.reset()
            probe.next_at = 0.0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            return
        self._semaphore = asyncio.Semaphore(self._max_concurrent)
        self._paused = False
        self._client = httpx.AsyncClient(
            transport=self._transport,
            # A probe goes straight to the container: never through a proxy from the environment.
            trust_env=False,
            follow_redirects=False,
            # No keep-alive: a restarted service would leave dead pooled connections behind.
            limits=httpx.Limits(max_connections=self._max_concurrent, max_keepalive_connections=0),
        )
        super().start()

    def running(self) -> set[asyncio.Task[Any]]:
        return super().running() | self._tasks

    async def stop(self) -> None:
        await super().stop()
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def next_delay(self, took: float) -> float:
        # A fixed pause after each tick, however long it took: probes run as their own tasks.
        return self.tick_seconds

    def failed(self, exc: Exception) -> None:
        log.exception("health prober tick failed")

    async def run_once(self) -> None:
        try:
            await self.tick()
        except ControllerError as exc:
            if not self._paused:
                log.warning("health probes paused: cannot list the containers: %s", exc.message)
                self._paused = True
            return
        if self._paused:
            log.info("health probes resumed: Docker answers again")
            self._paused = False

    # -- one tick ----------------------------------------------------------

    async def tick(self) -> None:
        """List the managed containers, forget the gone, start the probes that are due."""
        listed = await self.runtime.list_containers(all=True, detailed=False)
        now = time.monotonic()
        present = {info.id for info in listed}
        for container_id in [cid for cid in self._probes if cid not in present]:
            del self._probes[container_id]
        for container_id in [cid for cid in self._restarts if cid not in present]:
            del self._restarts[container_id]
        self._bad_labels &= present
        for info in listed:
            probe = self._probes.get(info.id)
            if probe is None:
                check = self._check_of(info)
                if check is None:
                    continue
                probe = self._probes[info.id] = _Probe(check, next_at=now)
            if probe.busy:
                continue
            if info.status != "running":
                # Stopped (or between states): judged afresh once it runs again.
                probe.reset()
                probe.next_at = now
                continue
            if now >= probe.next_at:
                self._launch(info.id, probe)

    def _check_of(self, info: ContainerInfo) -> HealthCheck | None:
        try:
            return read_health_check(info.labels)
        except ValidationError as exc:
            if info.id not in self._bad_labels:
                self._bad_labels.add(info.id)
                log.warning(
                    "container %s has an unreadable %s label, not probing it: %s",
                    info.name,
                    LABEL_HEALTH_CHECK,
                    exc.errors()[0]["msg"] if exc.errors() else exc,
                )
            return None

    def _launch(self, container_id: str, probe: _Probe) -> None:
        probe.busy = True
        task = asyncio.create_task(self._probe(container_id, probe), name=f"probe-{container_id[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one probe ---------------------------------------------------------

    async def _probe(self, container_id: str, probe: _Probe) -> None:
        try:
            assert self._semaphore is not None
            async with self._semaphore:
                outcome = await self._attempt(container_id, probe)
            if outcome is not None and self._probes.get(container_id) is probe:
                generation, passed, result, wrong = outcome
                if generation == probe.generation:
                    await self._judge(container_id, probe, passed, result, wrong)
                else:
                    # Started again while it was in flight: the new start gets a probe of its own.
                    probe.next_at = 0.0
        except ControllerError as exc:
            # Docker trouble: the tick says so once; try again next tick.
            log.debug("health probe of %s skipped: %s", container_id[:12], exc.message)
        except Exception:
            log.exception("health probe of container %s failed unexpectedly", container_id[:12])
        finally:
            probe.busy = False

    async def _attempt(self, container_id: str, probe: _Probe) -> tuple[int, bool, str, bool] | None:
        """``(generation, passed, what happened, a golden probe's wrong answer)``, the generation being the
        start it judges, or None when there is nothing to judge (not running, gone, or waiting for its next
        start after a wrong answer)."""
        try:
            info = await self.runtime.get_container(container_id)
        except NotFound:
            self._forget(container_id)
            return None
        if info.status != "running":
            return None
        started = info.state.get("StartedAt")
        if probe.started_at is not None and started != probe.started_at:
            log.info("container %s was started again; judging its health afresh", info.name)
            probe.reset()
        probe.started_at = started
        if probe.wrong:
            probe.next_at = time.monotonic() + probe.check.interval
            return None
        generation = probe.generation
        base = await self._url(container_id, probe.check, info)
        if base is None:
            return (generation, False,
                    f"port {probe.check.port} is not published and the container has no network address", False)
        url = base + "/" + probe.check.path.lstrip("/")
        assert self._client is not None
        try:
            async with self._client.stream("GET", url, timeout=probe.check.timeout) as response:
                status = response.status_code
        except httpx.TimeoutException:
            return generation, False, f"GET {url}: no answer within {probe.check.timeout:g} s", False
        except httpx.HTTPError as exc:
            return generation, False, f"GET {url}: {type(exc).__name__} {exc}".rstrip(), False
        if not 200 <= status < 400:
            return generation, False, f"GET {url}: HTTP {status}", False
        golden = probe.check.probe
        if golden is None or probe.verified:
            return generation, True, f"GET {url}: HTTP {status}", False
        return (generation, *await self._golden(base, golden, probe.check.timeout))

    async def _golden(self, base: str, golden: GoldenProbe, check_timeout: float) -> tuple[bool, str, bool]:
        """POST the probe's body and compare the answer: ``(matched, what happened, a wrong answer)``."""
        path = "/" + golden.path.lstrip("/")
        url = base + path
        path = path if len(path) <= 128 else path[:125] + "..."
        timeout = max(check_timeout * PROBE_TIMEOUT_FACTOR, PROBE_MIN_TIMEOUT)
        assert self._client is not None
        result = ""
        for attempt in range(PROBE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(PROBE_PAUSE)
            try:
                async with self._client.stream("POST", url, json=golden.body, timeout=timeout) as response:
                    status = response.status_code
                    if status in _NOT_YET:
                        result = f"POST {url}: HTTP {status}"
                        continue
                    if not 200 <= status < 300:
                        return False, f"{PROBE_FAILED}{path}: HTTP {status}", True
                    answer = bytearray()
                    async for chunk in response.aiter_bytes():
                        answer += chunk
                        if len(answer) > PROBE_MAX_ANSWER:
                            return False, f"{PROBE_FAILED}{path}: the answer is larger than {PROBE_MAX_ANSWER} bytes", True
            except httpx.TimeoutException:
                result = f"POST {url}: no answer within {timeout:g} s"
                continue
            except httpx.HTTPError as exc:
                result = f"POST {url}: {type(exc).__name__} {exc}".rstrip()
                continue
            try:
                got = json.loads(answer)
            except ValueError:
                return False, f"{PROBE_FAILED}{path}: the answer is not JSON", True
            found = mismatch(got, golden.expect, golden.tolerance)
            if found is not None:
                # Bounded: the path in it is made of the expected answer's keys, which may be long.
                detail = f"{PROBE_FAILED}{path}: {found}"
                return False, detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 3] + "...", True
            return True, f"POST {url}: the expected answer", False
        return False, result, False

    async def _url(self, container_id: str, check: HealthCheck, info: ContainerInfo) -> str | None:
        """``http://host:port`` where the check's port answers."""
        published = info.ports.get(f"{check.port}/tcp")
        if published:
            return f"http://{_url_host(self._host)}:{published}"
        address = await self.runtime.network_address(container_id)
        if not address:
            return None
        return f"http://{_url_host(address)}:{check.port}"

    async def _judge(self, container_id: str, probe: _Probe, passed: bool, result: str, wrong: bool) -> None:
        now = time.monotonic()
        check = probe.check
        probe.last_result = result
        if wrong:
            # Final until the next start: restarting it in place cannot fix what it computes.
            probe.health = "unhealthy"
            probe.wrong = True
            probe.detail = result
            probe.next_at = now + check.interval
            log.warning("container %s is unhealthy: its golden-inference probe failed (%s); not restarting it",
                        container_id[:12], result)
            return
        if passed:
            if probe.health != "healthy":
                log.info("container %s is healthy (%s)", container_id[:12], result)
            probe.health = "healthy"
            probe.passed = True
            probe.verified = True
            probe.failures = 0
            probe.detail = None
            probe.next_at = now + check.interval
            return
        if not probe.passed:
            probe.next_at = now + self.tick_seconds
            since_start = seconds_since(probe.started_at)
            if since_start is not None and since_start < check.start_period:
                return
            if probe.last_counted is not None and now - probe.last_counted < check.interval - self.tick_seconds / 2:
                return
        else:
            probe.next_at = now + check.interval
        probe.failures += 1
        probe.last_counted = now
        if probe.failures < check.failure_threshold:
            log.debug(
                "container %s failed health probe %d of %d: %s",
                container_id[:12],
                probe.failures,
                check.failure_threshold,
                result,
            )
            return
        probe.health = "unhealthy"
        probe.detail = result
        log.warning(
            "container %s is unhealthy after %d failed probes (last: %s); restarting it",
            container_id[:12],
            probe.failures,
            result,
        )
        await self._restart(container_id, probe)

    async def _restart(self, container_id: str, probe: _Probe) -> None:
        try:
            await self.containers.heal(container_id, self.restart_timeout)
        except NotFound:
            self._forget(container_id)
            return
        except ControllerError as exc:
            log.warning("could not restart unhealthy container %s: %s", container_id[:12], exc.message)
            probe.failures = 0
            probe.next_at = time.monotonic() + probe.check.interval
            return
        restarts = self._restarts[container_id] = self._restarts.get(container_id, 0) + 1
        log.warning("restarted unhealthy container %s (health restart %d)", container_id[:12], restarts)
        probe.reset()
        probe.next_at = time.monotonic() + self.tick_seconds

    def _forget(self, container_id: str) -> None:
        self._probes.pop(container_id, None)
        self._restarts.pop(container_id, None)
