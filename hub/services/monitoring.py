"""Container monitoring: usage thresholds and alerts, each service's resource history, and the
per-container gauges, from what heartbeats and polls carry (``HeartbeatContainer.usage``,
``ControllerHealth.disk_usage_percent``).

Everything a heartbeat says is judged in memory when it arrives (``Monitor.observe``) and written
by the heartbeat flusher (``Monitor.flush``): an alert row when a threshold is crossed and when it
is resolved, one history row per service per ``MMANAGER_METRICS_RESOLUTION`` seconds, so a
thousand containers over their threshold cost no write until something changes.

Alerts. Usage at or over its threshold opens one (kinds ``cpu`` and ``memory`` per container,
``disk`` per controller); it is resolved when the usage drops below the threshold minus a
hysteresis (``hysteresis()``), or when the container stops or goes. While it stays open nothing
is written. Which alerts are open is kept in memory and re-read from the database every
``RELOAD`` seconds, so alerts opened by another hub replica (a controller that moved to it) are
resolved here too, and a replica that restarts opens no duplicates. A controller that falls
silent keeps its alerts open until it reports again (``ControllerDown`` says why).

History. Samples are deduplicated by the controller's sample time (heartbeats repeat the last one
until the next is taken) and aggregated per service and bucket (average and peak of CPU and memory,
the last I/O counters, peak VRAM and mean GPU utilisation where the samples carry them); only a
service's current container counts, not a stale copy mid-move. A bucket is written once it is over;
rows older than ``MMANAGER_METRICS_RETENTION`` go at that time too, with resolved alerts of that age.
The same rows hold the gateways' traffic (``hub.background.traffic_history`` writes those columns);
``service_history`` reads both.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hub.config import HubSettings
from hub.db import Database
from hub.metrics import ALERT_KINDS, HubMetrics
from hub.models import AlertModel, ServiceMetricModel, new_id, utcnow
from hub.services.pace import HeartbeatPace
from hub.services.traffic import QUANTILES, add_histograms, histogram_quantile
from mmanager.wire import ControllerHealth, GpuUsage, HeartbeatContainer, gpu_values

log = logging.getLogger(__name__)

# (kind, controller id, container id): at most one open alert each; disk alerts have no container.
AlertKey = tuple[str, str, str | None]
# Seconds between re-reads of the open alerts.
RELOAD = 60.0


@dataclass(frozen=True)
class Thresholds:
    cpu: float
    memory: float
    disk: float

    @classmethod
    def of(cls, settings: HubSettings) -> Thresholds:
        return cls(settings.alert_cpu_percent, settings.alert_memory_percent, settings.alert_disk_percent)

    def __getitem__(self, kind: str) -> float:
        return float(getattr(self, kind))


def hysteresis(threshold: float) -> float:
    """How far under its threshold a reading must fall to resolve an alert: 5 points, or a tenth
    of a threshold under 50, so a reading that hovers at the line does not open alert after alert."""
    return min(5.0, threshold / 10)


@dataclass(frozen=True)
class Reading:
    key: AlertKey
    value: float
    service_id: str | None = None
    container_name: str | None = None

    @property
    def kind(self) -> str:
        return self.key[0]


@dataclass
class Judgement:
    opened: list[Reading] = field(default_factory=list)
    resolved: list[AlertKey] = field(default_factory=list)


def judge(active: Iterable[AlertKey], readings: Iterable[Reading], thresholds: Thresholds,
          covered: set[tuple[str, str]]) -> Judgement:
    """Which alerts a set of readings opens and resolves. Pure.

    ``covered`` names the (kind, controller) pairs the readings cover completely: an open alert of
    such a pair with no reading (its container stopped or went) is resolved.
    """
    active = set(active)
    result = Judgement()
    seen = set()
    for reading in readings:
        seen.add(reading.key)
        threshold = thresholds[reading.kind]
        if reading.key not in active and reading.value >= threshold:
            result.opened.append(reading)
        elif reading.key in active and reading.value < threshold - hysteresis(threshold):
            result.resolved.append(reading.key)
    result.resolved += sorted(
        (key for key in active if key not in seen and (key[0], key[1]) in covered), key=_sort_key
    )
    return result


def readings_of(controller_id: str, health: ControllerHealth,
                containers: Iterable[HeartbeatContainer]) -> tuple[list[Reading], set[tuple[str, str]]]:
    """The readings in one observation, and the (kind, controller) pairs it covers."""
    readings, covered = [], set()
    if health.docker:
        covered |= {("cpu", controller_id), ("memory", controller_id)}
        for c in containers:
            if c.usage is None or c.state != "running":
                continue
            for kind, value in (("cpu", c.usage.cpu_percent), ("memory", c.usage.memory_percent)):
                readings.append(Reading((kind, controller_id, c.container_id), value, c.service_id, c.name))
    if health.disk_usage_percent is not None:
        covered.add(("disk", controller_id))
        readings.append(Reading(("disk", controller_id, None), health.disk_usage_percent))
    return readings, covered


def bucket_start(at: datetime, resolution: float) -> datetime:
    return datetime.fromtimestamp(math.floor(at.timestamp() / resolution) * resolution, UTC)


@dataclass
class Bucket:
    """One service's samples in one bucket."""

    samples: int = 0
    cpu_sum: float = 0.0
    cpu_max: float = 0.0
    memory_sum: int = 0
    memory_max: int = 0
    memory_percent_max: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    gpu_memory_max: int | None = None
    gpu_util_sum: float = 0.0
    gpu_util_samples: int = 0

    def add(self, c: HeartbeatContainer) -> None:
        u = c.usage
        assert u is not None
        self.samples += 1
        self.cpu_sum += u.cpu_percent
        self.cpu_max = max(self.cpu_max, u.cpu_percent)
        self.memory_sum += u.memory_bytes
        self.memory_max = max(self.memory_max, u.memory_bytes)
        self.memory_percent_max = max(self.memory_percent_max, u.memory_percent)
        self.counters = {name: getattr(u, name) for name in COUNTERS}
        if u.gpu_memory_bytes is not None:
            self.gpu_memory_max = max(self.gpu_memory_max or 0, u.gpu_memory_bytes)
        if u.gpu_util_percent is not None:
            self.gpu_util_sum += u.gpu_util_percent
            self.gpu_util_samples += 1

    def row(self, service_id: str, at: datetime) -> dict[str, Any]:
        return {
            "service_id": service_id, "at": at, "samples": self.samples,
            "cpu_percent_avg": round(self.cpu_sum / self.samples, 3), "cpu_percent_max": self.cpu_max,
            "memory_bytes_avg": self.memory_sum // self.samples, "memory_bytes_max": self.memory_max,
            "memory_percent_max": self.memory_percent_max, **self.counters,
            "gpu_memory_bytes_max": self.gpu_memory_max,
            "gpu_util_percent_avg": (round(self.gpu_util_sum / self.gpu_util_samples, 3)
                                     if self.gpu_util_samples else None),
            # No traffic columns: only the traffic recorder writes them, and a bucket it did not count keeps
            # them null (not counted, which is not 0 requests).
        }


COUNTERS = ("network_rx_bytes", "network_tx_bytes", "block_read_bytes", "block_write_bytes")


class Monitor:
    def __init__(self, db: Database, settings: HubSettings, metrics: HubMetrics,
                 pace: HeartbeatPace | None = None) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.pace = pace or HeartbeatPace(settings)
        self.thresholds = Thresholds.of(settings)
        # What this replica believes is open, by controller: key -> the reading that opened it (a report can
        # open or resolve only its own controller's: it is judged against those alone, not every open alert
        # on every beat).
        self._active: dict[str, dict[AlertKey, Reading]] = {}
        self._to_open: dict[AlertKey, tuple[Reading, datetime]] = {}
        self._to_resolve: dict[AlertKey, datetime] = {}
        self._loaded_at: float | None = None
        self._buckets: dict[tuple[str, datetime], Bucket] = {}
        # The controller's time of the last sample counted, by controller and container.
        self._sampled: dict[str, dict[str, datetime]] = {}
        # The labels of each controller's container series, by container id; when it last reported;
        # those with a disk series.
        self._series: dict[str, dict[str, tuple[str, str, str]]] = {}
        self._seen: dict[str, float] = {}
        self._disk: set[str] = set()
        # Each controller's latest GPU samples (ControllerHealth.gpu_usage), for /metrics and the usage API.
        self.gpu_usage: dict[str, list[GpuUsage]] = {}
        self._pruned_at: float | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------- observe

    def observe(self, controller_id: str, health: ControllerHealth, containers: list[HeartbeatContainer],
                current: set[str]) -> None:
        """One controller's report; ``current`` holds the container ids that are their service's current copy."""
        now = utcnow()
        self._seen[controller_id] = time.monotonic()
        self._export(controller_id, health, containers)
        readings, covered = readings_of(controller_id, health, containers)
        verdict = judge(self._active.get(controller_id, {}), readings, self.thresholds, covered)
        for reading in verdict.opened:
            self._active.setdefault(controller_id, {})[reading.key] = reading
            self._to_open[reading.key] = (reading, now)
            self._to_resolve.pop(reading.key, None)
        for key in verdict.resolved:
            self._active.get(controller_id, {}).pop(key, None)
            if self._to_open.pop(key, None) is None:
                self._to_resolve[key] = now
        if verdict.opened or verdict.resolved:
            # Only then do the counts change: counting every open alert on every beat would grow with the fleet.
            self._count_active()
        if not health.docker:
            return
        at = bucket_start(now, self.settings.metrics_resolution)
        before, sampled = self._sampled.get(controller_id, {}), {}
        for c in containers:
            if c.usage is None or not c.service_id or c.container_id not in current:
                continue
            sampled[c.container_id] = c.usage.sampled_at
            if before.get(c.container_id) != c.usage.sampled_at:
                self._buckets.setdefault((c.service_id, at), Bucket()).add(c)
        self._sampled[controller_id] = sampled

    def _export(self, controller_id: str, health: ControllerHealth, containers: list[HeartbeatContainer]) -> None:
        if health.disk_usage_percent is not None:
            self.metrics.controllers.set((controller_id,), disk=health.disk_usage_percent)
            self._disk.add(controller_id)
        if health.gpu_usage or controller_id in self.gpu_usage:
            self._export_gpus(controller_id, health.gpu_usage)
        if not health.docker:
            return
        series = {}
        # The sample each current copy's series was last set from: a controller samples every 10 s and beats
        # every 2 s, so most beats repeat the last sample, and its values are set already.
        before = self._sampled.get(controller_id, {})
        known = self._series.get(controller_id, {})
        usage = self.metrics.containers
        for c in containers:
            if c.usage is None or c.state != "running":
                continue
            labels = series[c.container_id] = (controller_id, c.service_id or "", c.name)
            if known.get(c.container_id) == labels and before.get(c.container_id) == c.usage.sampled_at:
                continue
            usage.set_all(labels, [getattr(c.usage, name) for name in usage.fields])
        self._drop_series(known, keep=series)
        self._series[controller_id] = series

    def _export_gpus(self, controller_id: str, samples: list[GpuUsage]) -> None:
        before = {s.index: s.sampled_at for s in self.gpu_usage.get(controller_id, ())}
        gauges = self.metrics.gpus
        for sample in samples:
            # Beats repeat the last sample until the controller takes the next: its values are set already.
            if before.pop(sample.index, None) != sample.sampled_at:
                gauges.set_all((controller_id, sample.index), gpu_values(sample))
        for index in before:
            gauges.remove((controller_id, index))
        if samples:
            self.gpu_usage[controller_id] = samples
        else:
            self.gpu_usage.pop(controller_id, None)

    def _drop_series(self, old: Mapping[str, tuple[str, str, str]], keep: Mapping[str, tuple[str, str, str]]) -> None:
        # By labels, not by id: a container re-created under its name keeps its series.
        for labels in set(old.values()) - set(keep.values()):
            self.metrics.containers.remove(labels)

    def _count_active(self) -> None:
        counts = collections.Counter(key[0] for alerts in self._active.values() for key in alerts)
        for kind in ALERT_KINDS:
            self.metrics.alerts_active.labels(kind).set(counts[kind])

    # --------------------------------------------------------------- flush

    async def flush(self) -> None:
        """Write the alerts that opened or resolved and the buckets that are over; forget silent controllers."""
        async with self._lock:
            self._forget_silent()
            now = utcnow()
            done = [key for key in self._buckets
                    if key[1] + timedelta(seconds=self.settings.metrics_resolution) <= now]
            buckets = {key: self._buckets.pop(key) for key in done}
            to_open, self._to_open = self._to_open, {}
            to_resolve, self._to_resolve = self._to_resolve, {}
            reload = self._loaded_at is None or time.monotonic() - self._loaded_at >= RELOAD
            prune = self._pruned_at is None or time.monotonic() - self._pruned_at >= self.settings.metrics_resolution
            if not (buckets or to_open or to_resolve or reload or (prune and done)):
                return
            try:
                async with self.db.session() as session:
                    opened = await self._write_alerts(session, to_open, to_resolve)
                    if buckets:
                        await _upsert_metrics(session, [b.row(sid, at) for (sid, at), b in sorted(buckets.items())])
                    if prune:
                        await self._prune(session, now)
                    if reload:
                        open_keys = await self._open_keys(session)
            except BaseException:
                # Kept for the next flush; what happened meanwhile wins.
                self._to_open = {**to_open, **self._to_open}
                self._to_resolve = {**to_resolve, **self._to_resolve}
                for key, bucket in buckets.items():
                    self._buckets.setdefault(key, bucket)
                raise
            for kind in opened:
                self.metrics.alerts_total.labels(kind).inc()
            if prune:
                self._pruned_at = time.monotonic()
            if reload:
                self._loaded_at = time.monotonic()
                self._reloaded(open_keys)

    async def _write_alerts(self, session: Any, to_open: dict[AlertKey, tuple[Reading, datetime]],
                            to_resolve: dict[AlertKey, datetime]) -> list[str]:
        for (kind, controller_id, container_id), at in sorted(to_resolve.items(), key=lambda i: _sort_key(i[0])):
            await session.execute(
                update(AlertModel)
                .where(_key_clause((kind, controller_id, container_id)), AlertModel.resolved_at.is_(None))
                .values(resolved_at=at)
            )
        if not to_open:
            return []
        # One open alert per key, whichever replica opened it.
        already = await self._open_keys(session, {key[1] for key in to_open})
        fresh = [(reading, at) for key, (reading, at) in sorted(to_open.items(), key=lambda i: _sort_key(i[0]))
                 if key not in already]
        insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
        opened = []
        for reading, at in fresh:
            kind, controller_id, container_id = reading.key
            # The partial unique index (uq_alerts_open) settles a race with another replica: its alert stands.
            stmt = insert(AlertModel).values(
                id=new_id(), kind=kind, controller_id=controller_id, service_id=reading.service_id,
                container_id=container_id, container_name=reading.container_name, value=round(reading.value, 3),
                threshold=self.thresholds[kind], started_at=at, resolved_at=None,
            ).on_conflict_do_nothing().returning(AlertModel.id)
            if (await session.execute(stmt)).first() is None:
                continue
            opened.append(kind)
            log.warning("alert: %s %.1f%% (threshold %g%%) on %s%s", kind, reading.value, self.thresholds[kind],
                        controller_id, f", container {reading.container_name}" if reading.container_name else "")
        return opened

    async def _open_keys(self, session: Any, controllers: set[str] | None = None) -> dict[AlertKey, Reading]:
        query = select(AlertModel).where(AlertModel.resolved_at.is_(None))
        if controllers is not None:
            query = query.where(AlertModel.controller_id.in_(sorted(controllers)))
        return {
            (a.kind, a.controller_id, a.container_id): Reading(
                (a.kind, a.controller_id, a.container_id), a.value, a.service_id, a.container_name)
            for a in await session.scalars(query)
        }

    def _reloaded(self, stored: dict[AlertKey, Reading]) -> None:
        """The open alerts as stored, with what this replica decided since (and has not written yet)."""
        active = {**stored, **{key: reading for key, (reading, _) in self._to_open.items()}}
        for key in self._to_resolve:
            active.pop(key, None)
        self._active = {}
        for key, reading in active.items():
            self._active.setdefault(key[1], {})[key] = reading
        self._count_active()

    async def _prune(self, session: Any, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.settings.metrics_retention)
        await session.execute(delete(ServiceMetricModel).where(ServiceMetricModel.at < cutoff))
        await session.execute(delete(AlertModel).where(AlertModel.resolved_at < cutoff))

    def _forget_silent(self) -> None:
        """Controllers silent for longer than the grace lose their container series (their alerts stay)."""
        cutoff = time.monotonic() - self.pace.detection_grace
        for controller_id in [cid for cid, seen in self._seen.items() if seen < cutoff]:
            del self._seen[controller_id]
            self._sampled.pop(controller_id, None)
            self._drop_series(self._series.pop(controller_id, {}), keep={})
            if controller_id in self.gpu_usage:
                self._export_gpus(controller_id, [])
            if controller_id in self._disk:
                self._disk.discard(controller_id)
                self.metrics.controllers.set((controller_id,), disk=None)


def _sort_key(key: AlertKey) -> tuple[str, str, str]:
    return key[0], key[1], key[2] or ""


def _key_clause(key: AlertKey) -> Any:
    kind, controller_id, container_id = key
    container = AlertModel.container_id.is_(None) if container_id is None else AlertModel.container_id == container_id
    return and_(AlertModel.kind == kind, AlertModel.controller_id == controller_id, container)


async def _upsert_metrics(session: Any, rows: list[dict[str, Any]]) -> None:
    """Insert the buckets; one another replica wrote for the same service and time (a controller that
    moved to this replica mid-bucket) is merged: samples added, averages weighted, peaks kept."""
    dialect = session.bind.dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(ServiceMetricModel)
    old, new = ServiceMetricModel, stmt.excluded
    total = old.samples + new.samples

    def peak(column: str) -> Any:
        return case((getattr(new, column) > getattr(old, column), getattr(new, column)), else_=getattr(old, column))

    def mean(column: str) -> Any:
        return (getattr(old, column) * old.samples + getattr(new, column) * new.samples) / total

    def either(column: str, both: Any) -> Any:
        # GPU columns are None without a GPU: one side's value stands alone.
        mine, theirs = getattr(old, column), getattr(new, column)
        return case((theirs.is_(None), mine), (mine.is_(None), theirs), else_=both)

    # The traffic columns are the traffic recorder's: a row it made first keeps them.
    stmt = stmt.on_conflict_do_update(
        index_elements=[old.service_id, old.at],
        set_={
            "samples": total,
            "cpu_percent_avg": mean("cpu_percent_avg"),
            "memory_bytes_avg": mean("memory_bytes_avg"),
            "cpu_percent_max": peak("cpu_percent_max"),
            "memory_bytes_max": peak("memory_bytes_max"),
            "memory_percent_max": peak("memory_percent_max"),
            **{name: getattr(new, name) for name in COUNTERS},
            "gpu_memory_bytes_max": either("gpu_memory_bytes_max", peak("gpu_memory_bytes_max")),
            "gpu_util_percent_avg": either("gpu_util_percent_avg", mean("gpu_util_percent_avg")),
        },
    )
    await session.execute(stmt, rows)



# ------------------------------------------------------------------ reads


def alerts_query(active: bool | None, kind: str | None, controller_id: str | None) -> Any:
    query = select(AlertModel).order_by(AlertModel.started_at.desc(), AlertModel.id)
    if active is not None:
        query = query.where(AlertModel.resolved_at.is_(None) if active else AlertModel.resolved_at.is_not(None))
    if kind:
        query = query.where(AlertModel.kind == kind)
    if controller_id:
        query = query.where(AlertModel.controller_id == controller_id)
    return query


def alert_out(alert: AlertModel) -> dict[str, Any]:
    return {column: getattr(alert, column) for column in ALERT_FIELDS} | {"active": alert.resolved_at is None}


ALERT_FIELDS = ("id", "kind", "controller_id", "service_id", "container_id", "container_name", "value",
                "threshold", "started_at", "resolved_at")


async def service_history(session: Any, service_id: str, since: datetime, resolution: int) -> list[dict[str, Any]]:
    """The stored buckets from ``since`` on, merged into buckets of ``resolution`` seconds (a multiple
    of the stored one): sample-weighted averages, peaks, the last counters; requests summed and the
    latency quantiles estimated from the summed histograms. A point with no sample has no resource
    values (None); one with no request has no quantiles."""
    rows = await session.scalars(
        select(ServiceMetricModel)
        .where(ServiceMetricModel.service_id == service_id, ServiceMetricModel.at >= since)
        .order_by(ServiceMetricModel.at)
    )
    merged: dict[datetime, _Point] = {}
    for r in rows:
        at = bucket_start(r.at, resolution)
        merged.setdefault(at, _Point(at)).add(r)
    return [point.out() for point in merged.values()]


@dataclass
class _Point:
    """Stored rows merged into one point of the history."""

    at: datetime
    samples: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    gpu_memory_max: int | None = None
    gpu_util: tuple[float, int] = (0.0, 0)
    requests: int | None = None
    errors_5xx: int | None = None
    latency: dict[str, float] = field(default_factory=dict)

    def add(self, r: ServiceMetricModel) -> None:
        if r.samples > 0:
            p, total = self.resources, self.samples + r.samples
            if not p:
                p.update({name: getattr(r, name) for name in RESOURCE_FIELDS})
            else:
                p["cpu_percent_avg"] = round(
                    (p["cpu_percent_avg"] * self.samples + r.cpu_percent_avg * r.samples) / total, 3)
                p["memory_bytes_avg"] = (p["memory_bytes_avg"] * self.samples + r.memory_bytes_avg * r.samples) // total
                for name in ("cpu_percent_max", "memory_bytes_max", "memory_percent_max"):
                    p[name] = max(p[name], getattr(r, name))
                for name in COUNTERS:
                    p[name] = getattr(r, name)
            self.samples = total
            if r.gpu_memory_bytes_max is not None:
                self.gpu_memory_max = max(self.gpu_memory_max or 0, r.gpu_memory_bytes_max)
            if r.gpu_util_percent_avg is not None:
                weighted, n = self.gpu_util
                self.gpu_util = (weighted + r.gpu_util_percent_avg * r.samples, n + r.samples)
        if r.requests is not None:
            self.requests = (self.requests or 0) + r.requests
        if r.errors_5xx is not None:
            self.errors_5xx = (self.errors_5xx or 0) + r.errors_5xx
        if r.latency_buckets:
            self.latency = add_histograms(self.latency, r.latency_buckets)

    def out(self) -> dict[str, Any]:
        weighted, n = self.gpu_util
        buckets = {float(bound): count for bound, count in self.latency.items()}
        return {
            "at": self.at, "samples": self.samples,
            **{name: self.resources.get(name) for name in RESOURCE_FIELDS},
            "gpu_memory_bytes_max": self.gpu_memory_max,
            "gpu_util_percent_avg": round(weighted / n, 3) if n else None,
            "requests": self.requests, "errors_5xx": self.errors_5xx,
            **{f"latency_p{round(q * 100)}_seconds": histogram_quantile(q, buckets) for q in QUANTILES},
        }


RESOURCE_FIELDS = ("cpu_percent_avg", "cpu_percent_max", "memory_bytes_avg", "memory_bytes_max",
                   "memory_percent_max", *COUNTERS)
