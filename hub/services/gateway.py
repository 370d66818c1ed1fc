"""The gateways' routing table: derived from the hub's tables by a pure function (``routing_table``),
published by the leading replica only (``GatewayTable.publish``), fetched by every gateway (``current``),
which reports the version it has applied (``report``). ``GatewayDirectory`` keeps, on every replica, the
gateway URL that a service's ``url`` is built on.

Invariant: a version names one table and versions only rise: a new version is written when, and only
when, the table differs from the last one written, so a hub restart that finds its tables unchanged
publishes nothing new, and one that finds them changed converges the gateways with the next version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from hub.config import HubSettings
from hub.db import Database
from hub.models import (
    ContainerRegistryModel,
    GatewayModel,
    GatewayRoutesModel,
    ServiceKeyModel,
    ServiceModel,
    UserModel,
    utcnow,
)
from hub.schemas import ServiceSpec
from mmanager.wire import parse_memory

log = logging.getLogger(__name__)

# What a spec stored before these fields existed gets: the spec's own defaults.
DEFAULT_RATE_LIMIT = ServiceSpec.model_fields["rate_limit_per_minute"].default
DEFAULT_MAX_BODY = ServiceSpec.model_fields["max_body_size"].default
# A gateway unheard for this long is no longer offered as a service's URL.
GATEWAY_LIVE = timedelta(seconds=15)
# How often a move waiting for the gateways asks whether they have caught up.
DRAIN_POLL = 0.1

SERVICES = ServiceModel.__table__
REGISTRY = ContainerRegistryModel.__table__
KEYS = ServiceKeyModel.__table__
ROUTES = GatewayRoutesModel.__table__
GATEWAYS = GatewayModel.__table__

# Cheap enough to send every publish tick: the table is derived again only when this changes.
FINGERPRINT = select(
    select(func.count()).select_from(SERVICES).scalar_subquery().label("services"),
    select(func.max(SERVICES.c.updated_at)).scalar_subquery().label("services_changed"),
    # Heartbeats date a copy's change by when its controller saw it, which may be older than the newest
    # change: its health and status are summed in too (each row counts 1, healthy 2 more, running 4 more).
    select(func.sum(1 + case((REGISTRY.c.health == "healthy", 2), else_=0)
                    + case((REGISTRY.c.status == "running", 4), else_=0))).scalar_subquery().label("copies"),
    select(func.max(REGISTRY.c.updated_at)).scalar_subquery().label("copies_changed"),
    select(func.count()).select_from(KEYS).scalar_subquery().label("keys"),
    select(func.max(KEYS.c.created_at)).scalar_subquery().label("keys_changed"),
)
ROUTED = (select(SERVICES.c.id, SERVICES.c.name, UserModel.username.label("owner"), SERVICES.c.spec,
                 SERVICES.c.status, SERVICES.c.desired_state)
          .join_from(ServiceModel, UserModel, ServiceModel.owner_id == UserModel.id))
# The copies a gateway may send requests to: the services' replicas that run (not those superseded, nor
# those draining: a move or scale-down takes them out of the table first).
ROUTED_COPIES = select(REGISTRY.c.service_id, REGISTRY.c.container_id, REGISTRY.c.controller_id, REGISTRY.c.endpoint,
                       REGISTRY.c.health).where(REGISTRY.c.serving.is_(True), REGISTRY.c.status == "running",
                                                REGISTRY.c.endpoint.is_not(None))
ROUTED_KEYS = select(KEYS.c.service_id, KEYS.c.key_hash)
CURRENT = select(ROUTES.c.version, ROUTES.c.body).where(ROUTES.c.id == 1)
CURRENT_VERSION = select(ROUTES.c.version).where(ROUTES.c.id == 1).with_for_update()
FIRST_VERSION = insert(ROUTES).values(id=1, version=1, body=bindparam("body"), updated_at=bindparam("now"))
NEXT_VERSION = (update(ROUTES).where(ROUTES.c.id == 1)
                .values(version=ROUTES.c.version + 1, body=bindparam("body"), updated_at=bindparam("now")))
REPORTED = (update(GATEWAYS).where(GATEWAYS.c.id == bindparam("gateway_id"))
            .values(url=bindparam("url"), metrics_url=bindparam("metrics_url"), version=bindparam("version"),
                    traffic=bindparam("traffic"), last_seen_at=bindparam("now")))
FIRST_REPORT = insert(GATEWAYS).values(id=bindparam("gateway_id"), url=bindparam("url"),
                                       metrics_url=bindparam("metrics_url"), version=bindparam("version"),
                                       traffic=bindparam("traffic"), created_at=bindparam("now"),
                                       last_seen_at=bindparam("now"))
# Of the live gateways, how many have not applied a version yet.
LAGGING = select(func.count().label("live"),
                 func.coalesce(func.sum(case((GATEWAYS.c.version < bindparam("version"), 1), else_=0)), 0)
                 .label("lagging")).where(GATEWAYS.c.last_seen_at >= bindparam("since"))
LIVE_URL = (select(GATEWAYS.c.url).where(GATEWAYS.c.last_seen_at >= bindparam("since"))
            .order_by(GATEWAYS.c.created_at, GATEWAYS.c.id).limit(1))


def serving_port(spec: Mapping[str, Any]) -> str | None:
    """The container port the gateway sends a service's requests to: its health check's, else its first
    TCP port; None for a service that publishes none."""
    check = spec.get("health_check")
    if check:
        return str(check["port"])
    for key in spec.get("ports") or {}:
        number, _, proto = key.partition("/")
        if proto in ("", "tcp"):
            return number
    return None


def _replicas(service: Mapping[str, Any], copies: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    port = serving_port(service["spec"])
    if service["desired_state"] != "running" or port is None:
        return []
    replicas = []
    for copy in copies:
        published = ((copy["endpoint"] or {}).get("ports") or {}).get(port)
        if not published:
            continue
        # A copy with a health check that the hub has not seen pass (one just started, or woken) is
        # "starting": the gateway waits for its own check before it sends it anything.
        checked = not service["spec"].get("health_check") or copy["health"] == "healthy"
        if not checked and service["spec"].get("probe"):
            # The gateway's own check is a GET of the health path: it cannot tell a wrong answer, so a copy
            # with a golden-inference probe is routed only once the hub has seen it pass.
            continue
        replicas.append({"id": copy["container_id"], "controller_id": copy["controller_id"],
                         "address": f"{copy['endpoint']['host']}:{published}",
                         "state": "ready" if checked else "starting"})
    return replicas


def routing_table(services: Iterable[Mapping[str, Any]], copies: Iterable[Mapping[str, Any]],
                  keys: Iterable[Mapping[str, Any]], domain: str | None) -> dict[str, Any]:
    """The routing table a gateway applies, from the services (each with its owner's name), their running
    replicas' registry rows and the private services' key hashes. Deterministic: the same rows in any
    order give an equal table."""
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for copy in copies:
        by_service.setdefault(copy["service_id"], []).append(copy)
    routes = []
    for service in sorted(services, key=lambda s: (s["owner"], s["name"])):
        spec = service["spec"]
        check = spec.get("health_check")
        routes.append({
            "id": service["id"], "owner": service["owner"], "name": service["name"], "state": service["status"],
            "private": bool(spec.get("private", False)),
            "rate_limit_per_minute": spec.get("rate_limit_per_minute", DEFAULT_RATE_LIMIT),
            "max_body_bytes": parse_memory(spec.get("max_body_size") or DEFAULT_MAX_BODY),
            # None: no HTTP health check declared, so the gateway checks that the port accepts connections.
            "health_path": check["path"] if check else None,
            "replicas": sorted(_replicas(service, by_service.get(service["id"], ())), key=lambda r: r["id"]),
        })
    private = {route["id"] for route in routes if route["private"]}
    hashes = sorted((k["service_id"], k["key_hash"]) for k in keys if k["service_id"] in private)
    return {"domain": domain, "services": routes,
            "service_keys": [{"service_id": service_id, "sha256": digest} for service_id, digest in hashes]}


def _routes_only(table: Mapping[str, Any], service_id: str, serving: str | None, retired: set[str]) -> bool:
    for route in table["services"]:
        if route["id"] == service_id:
            ids = {replica["id"] for replica in route["replicas"]}
            return not ids & retired and (serving is None or serving in ids)
    return not retired


class GatewayTable:
    """The published routing table and the gateways' reports of what they applied."""

    def __init__(self, db: Database, settings: HubSettings) -> None:
        self.db = db
        self.settings = settings
        # What the tables looked like when the table was last derived (None: never, e.g. after a restart).
        self._fingerprint: Mapping[str, Any] | None = None
        # The version this process last wrote or read, and its table: a large table is compared here, not
        # decoded from the database again on every change.
        self._published: tuple[int, dict[str, Any]] | None = None

    async def publish(self) -> int | None:
        """Derive the table again if the tables changed, and write it as a new version if it differs from
        the last; the version written, or None. The leader's alone to call."""
        fingerprint = await self.db.first(FINGERPRINT, {})
        if fingerprint is not None and fingerprint == self._fingerprint:
            return None
        services = await self.db.all(ROUTED, {})
        copies = await self.db.all(ROUTED_COPIES, {})
        keys = await self.db.all(ROUTED_KEYS, {})
        body = routing_table(services, copies, keys, self.settings.service_domain)
        async with self.db.transaction() as tx:
            # The version alone, locked: the table itself is read only when another process wrote it since.
            latest = await tx.first(CURRENT_VERSION, {})
            now = utcnow()
            if latest is None:
                await tx.execute(FIRST_VERSION, {"body": body, "now": now})
                version: int | None = 1
            else:
                known = self._published
                if known is None or known[0] != latest["version"]:
                    current = await tx.first(CURRENT, {})
                    assert current is not None  # locked above
                    known = (current["version"], current["body"])
                if known[1] != body:
                    await tx.execute(NEXT_VERSION, {"body": body, "now": now})
                    version = known[0] + 1
                else:
                    version = None
                    self._published = known
        if version is not None:
            self._published = (version, body)
        self._fingerprint = fingerprint
        if version is not None:
            log.info("gateway routing table: version %d (%d services)", version, len(body["services"]))
        return version

    async def current(self) -> tuple[int, dict[str, Any]] | None:
        """The last version published and its table; None before the first."""
        row = await self.db.first(CURRENT, {})
        return None if row is None else (row["version"], row["body"])

    async def report(self, gateway_id: str, url: str, version: int, metrics_url: str | None = None,
                     traffic: Mapping[str, int] | None = None) -> None:
        """A gateway's heartbeat: where it answers (and is scraped), the version it has applied and the
        requests it has routed to each service."""
        values = {"gateway_id": gateway_id, "url": url, "metrics_url": metrics_url, "version": version,
                  "traffic": dict(traffic or {}), "now": utcnow()}
        if await self.db.execute(REPORTED, values):
            return
        try:
            await self.db.execute(FIRST_REPORT, values)
        except IntegrityError:
            # Its first two reports crossed on two replicas: the other one's insert stands.
            await self.db.execute(REPORTED, values)

    async def drained(self, service_id: str, serving: str | None, retired: Iterable[str], timeout: float) -> bool:
        """Wait until every live gateway has applied a table in which the service routes to ``serving`` and
        no longer to the ``retired`` replicas, so that these can go without a request lost: a gateway reports
        a version once the replicas it removed have finished their requests. False when that took longer
        than ``timeout`` (the caller goes on: a gateway that lags is as good as one that died)."""
        retired = set(retired)
        deadline = time.monotonic() + timeout
        version: int | None = None
        while True:
            if version is None:
                current = await self.current()
                if current is not None and _routes_only(current[1], service_id, serving, retired):
                    version = current[0]
            counts = await self.db.first(LAGGING, {"since": utcnow() - GATEWAY_LIVE, "version": version or 0})
            if counts is None or counts["live"] == 0 or (version is not None and counts["lagging"] == 0):
                return True
            if time.monotonic() >= deadline:
                log.warning("the gateways did not apply the new route of service %s within %gs", service_id, timeout)
                return False
            await asyncio.sleep(DRAIN_POLL)

    async def live_url(self) -> str | None:
        """The URL of the longest-registered gateway heard from recently."""
        row = await self.db.first(LIVE_URL, {"since": utcnow() - GATEWAY_LIVE})
        return None if row is None else row["url"]


class GatewayDirectory:
    """The gateway URL a service's ``url`` starts with, known without a database read: the configured
    ``MMANAGER_GATEWAY_URL``, else a live gateway's advertised URL, looked up by ``refresh``."""

    def __init__(self, table: GatewayTable, configured: str | None) -> None:
        self.table = table
        self.configured = configured.rstrip("/") if configured else None
        self.url: str | None = self.configured

    async def refresh(self) -> None:
        if self.configured is None:
            found = await self.table.live_url()
            self.url = found.rstrip("/") if found else None

    def service_url(self, owner: str, name: str) -> str | None:
        return None if self.url is None else f"{self.url}/s/{owner}/{name}/"
