"""The gateway agent: follows the hub's routing table and keeps a HAProxy serving it, hitlessly.

One loop (``GatewayAgent.run_once``): poll ``GET /api/gateway/routes`` (``If-None-Match``), apply a
changed table, and register with the hub (``PUT /api/gateways/{id}``) after each apply and every
``heartbeat`` seconds. Invariants: only this loop writes the state directory or talks to HAProxy, so
applies never interleave; the files on disk always describe the last table applied (a HAProxy started
or reloaded from them serves it); a table is applied through the runtime API when ``gateway.plan``
allows it, else by a checked reload, and counts as applied only once HAProxy serves it. The version
reported to the hub is the last applied whose removed replicas have finished their requests (no
session left on their servers, the old workers that served them gone): the hub retires a replica on that word.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
from pydantic import ValidationError

from gateway.config import CONFIG, RenderSettings, render, render_maps
from gateway.haproxy import HAProxy, HAProxyError, check_config, write_atomically
from gateway.plan import RuntimePlan, is_success, runtime_plan
from gateway.routes import RoutingTable
from gateway.settings import GatewaySettings
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

SAVED = "routes.json"


class RuntimeApplyError(RuntimeError):
    pass


async def resolve(table: RoutingTable) -> RoutingTable:
    """``table`` with replicas' host names replaced by an address (HAProxy's runtime API takes addresses
    only); a replica whose name does not resolve is left out, and logged."""
    loop = asyncio.get_running_loop()
    services = []
    changed = False
    for service in table.services:
        replicas = []
        for replica in service.replicas:
            host, _, port = replica.address.rpartition(":")
            try:
                ipaddress.ip_address(host.strip("[]"))
                replicas.append(replica)
                continue
            except ValueError:
                pass
            changed = True
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                log.warning("replica %s of %s/%s: %s does not resolve (%s); left out", replica.id, service.owner,
                            service.name, host, exc)
                continue
            ip = str(infos[0][4][0])
            replicas.append(replica.model_copy(update={"address": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"}))
        services.append(service.model_copy(update={"replicas": tuple(replicas)}))
    return table.model_copy(update={"services": tuple(services)}) if changed else table


class GatewayAgent(LoopService):
    name = "gateway"

    def __init__(self, settings: GatewaySettings, client: httpx.AsyncClient | None = None) -> None:
        super().__init__(settings.poll, jitter=0.0)
        self.settings = settings
        self.render_settings = settings.render_settings
        self.proxy = HAProxy(settings.state_dir, settings.haproxy, {
            "MMANAGER_HUB_URL": settings.hub_urls[0], "MMANAGER_API_KEY": settings.api_key.get_secret_value(),
            "MMANAGER_GATEWAY_WAKE_HOLD": f"{settings.wake_hold:g}"})
        self.client = client or httpx.AsyncClient(timeout=5.0)
        self.headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"}
        self.applied = RoutingTable()
        # Servers taken out by the runtime API whose `del server` has not gone through yet.
        self.pending: set[str] = set()
        self.refused_version: int | None = None
        # The version reported to the hub: the last applied whose removed replicas have finished their
        # requests (the hub retires a replica once every gateway reports a table without it).
        self.reported = 0
        # Old workers (retired by a reload that removed replicas) still finishing requests.
        self.retiring: set[int] = set()
        # Requests per service counted by the workers before the current one (its counters start at 0).
        self.traffic_base: dict[str, int] = {}
        self.last_traffic: dict[str, int] = {}
        self.last_beat = float("-inf")
        self.beat_due = True
        self._hub_up: bool | None = None
        # The hub replica asked first; the next one when it does not answer.
        self._hub_index = 0

    # --------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Start HAProxy with the last table applied (or none), before the hub is reached at all."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.applied = self._saved()
        self.reported = self.applied.version
        self._write(self.applied)
        await self.proxy.start()
        log.info("gateway %s on %s:%s (metrics on %s), following %s", self.settings.id, self.settings.host,
                 self.settings.port, self.settings.metrics_port, self.settings.hub_url)

    async def close(self) -> None:
        await self.stop()
        await self.proxy.stop()
        await self.client.aclose()

    def overran(self, took: float) -> None:
        log.debug("%s: iteration took %.2fs", self.name, took)

    # --------------------------------------------------------------- the loop

    async def run_once(self) -> None:
        if not self.proxy.running:
            log.error("haproxy is gone; starting it again from %s", self.proxy.config)
            self.traffic_base = dict(self.last_traffic)
            await self.proxy.start()
            self.pending.clear()
            self.retiring.clear()
        table = await self.fetch()
        if table is not None:
            table = await resolve(table)
            if table != self.applied and table.version != self.refused_version:
                await self.apply(table)
        if self.pending:
            await self._delete_pending()
        await self._settle()
        if self.beat_due or time.monotonic() - self.last_beat >= self.settings.heartbeat:
            await self.beat()

    async def fetch(self) -> RoutingTable | None:
        """The hub's table; None when it is unchanged or the hub cannot be reached (logged once a spell)."""
        headers = dict(self.headers)
        if self.applied.version:
            headers["If-None-Match"] = f'"{self.applied.version}"'
        try:
            response = await self.client.get(f"{self.hub}/api/gateway/routes", headers=headers)
            if response.status_code == 304:
                self._hub(True)
                return None
            response.raise_for_status()
            table = RoutingTable.model_validate(response.json())
        except (httpx.HTTPError, ValueError, ValidationError) as exc:
            self._hub(False, f"routing table not read: {exc}")
            return None
        self._hub(True)
        return table

    async def apply(self, table: RoutingTable) -> None:
        started = time.monotonic()
        plan = runtime_plan(self.applied, table, self.render_settings, frozenset(self.pending))
        how = "reload"
        if plan is not None:
            self._write(table)
            try:
                await self._run_plan(plan)
                how = f"runtime API ({len(plan.commands)} commands)"
            except (RuntimeApplyError, OSError, TimeoutError) as exc:
                log.warning("runtime apply of version %s stopped (%s); reloading instead", table.version, exc)
                plan = None
        if plan is None:
            problem = await self._check(table)
            if problem:
                self.refused_version = table.version
                log.error("routing table version %s gives a configuration haproxy refuses; still serving "
                          "version %s:\n%s", table.version, self.applied.version, problem)
                return
            self._write(table)
            removed = _servers(self.applied) - _servers(table)
            before = (await self.proxy.workers())[0] if removed else []
            with contextlib.suppress(OSError, TimeoutError):
                self.traffic_base = await self.traffic()
            try:
                await self.proxy.reload()
            except HAProxyError:
                # The files describe the new table: a HAProxy restarted by the next iteration serves it.
                await self.proxy.stop(grace=0)
                raise
            self.pending.clear()
            self.retiring.update(before)
        self.applied = table
        self.beat_due = True
        write_atomically(self.settings.state_dir / SAVED, table.model_dump_json())
        log.info("routing table version %s applied by %s in %.0f ms", table.version, how,
                 (time.monotonic() - started) * 1000)

    async def beat(self) -> None:
        """Register with the hub: this gateway's URL and the version it serves."""
        self.last_beat = time.monotonic()
        self.beat_due = False
        url = f"{self.hub}/api/gateways/{self.settings.id}"
        try:
            traffic = await self.traffic()
        except (OSError, TimeoutError):
            traffic = self.last_traffic
        body = {"url": self.settings.advertise_url, "metrics_url": self.settings.metrics_url,
                "version": self.reported, "traffic": traffic}
        try:
            response = await self.client.put(url, headers=self.headers, json=body)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self._hub(False, f"registration not accepted: {exc}")

    async def traffic(self) -> dict[str, int]:
        """Requests routed to each service (by id) since this agent started HAProxy."""
        counts = dict(self.traffic_base)
        for backend, requests in (await self.proxy.requests()).items():
            if backend.startswith("svc_"):
                service_id = backend.removeprefix("svc_")
                counts[service_id] = counts.get(service_id, 0) + requests
        # The hub takes service ids of 32 characters at most: anything longer is not one of its services.
        self.last_traffic = {k: v for k, v in counts.items() if len(k) <= 32}
        return self.last_traffic

    # --------------------------------------------------------------- helpers

    async def _settle(self) -> None:
        """Report the applied version once the replicas it removed have no request left in HAProxy."""
        if self.retiring:
            _, old, _ = await self.proxy.processes()
            self.retiring &= set(old)
        # A server taken out at runtime may wait for its idle connections to go before HAProxy deletes
        # it; what counts here is that no request of its is left.
        busy = self.pending & await self.proxy.busy_servers() if self.pending else set()
        if not busy and not self.retiring and self.reported != self.applied.version:
            self.reported = self.applied.version
            self.beat_due = True

    async def _run_plan(self, plan: RuntimePlan) -> None:
        for command in plan.commands:
            answer = await self.proxy.command(command)
            if not is_success(command, answer):
                raise RuntimeApplyError(f"{command!r} answered {answer!r}")
        self.pending.update(plan.deletions)
        self.pending.difference_update(plan.revived)

    async def _delete_pending(self) -> None:
        """Delete the servers taken out earlier; HAProxy refuses while one still has connections."""
        for name in sorted(self.pending):
            answer = await self.proxy.command(f"del server {name}")
            if answer.startswith(("Server deleted", "No such server", "No such backend")):
                log.debug("server %s deleted", name)
                self.pending.discard(name)

    async def _check(self, table: RoutingTable) -> str | None:
        with tempfile.TemporaryDirectory(prefix="mmanager-gw-") as scratch:
            settings = replace(self.render_settings, state_dir=Path(scratch))
            return await check_config(self._files(table, settings), Path(scratch), self.proxy.binary)

    def _files(self, table: RoutingTable, settings: RenderSettings | None = None) -> dict[str, str]:
        return {**render_maps(table), CONFIG: render(table, settings or self.render_settings)}

    def _write(self, table: RoutingTable) -> None:
        """The map files first, the configuration last: a HAProxy starting in between reads old or new whole."""
        files = self._files(table)
        for name in sorted(files, key=lambda n: n == CONFIG):
            write_atomically(self.settings.state_dir / name, files[name])

    def _saved(self) -> RoutingTable:
        path = self.settings.state_dir / SAVED
        try:
            return RoutingTable.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            return RoutingTable()
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("%s unreadable (%s); starting with no routes", path, exc)
            return RoutingTable()

    @property
    def hub(self) -> str:
        urls = self.settings.hub_urls
        return urls[self._hub_index % len(urls)]

    def _hub(self, up: bool, problem: str = "") -> None:
        """Log the hub going away and coming back, not every poll in between; a hub that failed hands
        the next call to the next replica."""
        if not up:
            self._hub_index += 1
        if up and self._hub_up is False:
            log.info("hub %s reachable again", self.settings.hub_url)
        elif not up and self._hub_up is not False:
            log.warning("hub %s: %s; serving version %s and retrying", self.settings.hub_url, problem,
                        self.applied.version)
        self._hub_up = up


def _servers(table: RoutingTable) -> set[str]:
    return {f"{s.backend}/{r.id}" for s in table.usable_services() for r in s.usable_replicas()}


async def serve(settings: GatewaySettings) -> None:
    """Run the agent until SIGTERM or SIGINT, then stop HAProxy."""
    agent = GatewayAgent(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.open()
        agent.start()
        await stop.wait()
    finally:
        await agent.close()
