"""The leader's traffic recorder: each service's requests through the gateways, per history bucket.

Once per ``MMANAGER_METRICS_RESOLUTION``, just after each bucket starts, it reads every live gateway's
latency histograms (``hub.services.traffic.read_gateways``) and keeps them in memory; what each series
counted since the gateway's previous read (``increase``: never negative) is summed per service over the
gateways and added to the ``service_metrics`` row of the bucket in which that previous read was taken
(``requests``, ``errors_5xx``, ``latency_buckets``); a service meant to run that no gateway saw a request
for gets 0 in each bucket the reads covered. A bucket no read covered (no leader, a new leader's first
read, no gateway answering) keeps these columns null: not counted, which is not 0. The first read of a gateway is its baseline and
counts nothing, unless the gateway registered after this recorder's previous round (it is new: all it
counted came since). A gateway that does not answer keeps its baseline: its next read covers the gap;
so does the next round after one whose write failed (baselines move only once written).

Invariant: only this recorder writes these columns (the heartbeat flusher writes the others of the same
rows, leaves these alone and null in the rows it makes), and it adds to what a row holds in the database's
own upsert, so no count is lost or doubled even when two leaders overlap for a moment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import false, func, or_, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hub.config import HubSettings
from hub.db import Database
from hub.models import ServiceMetricModel, ServiceModel, UserModel, utcnow
from hub.services.monitoring import COUNTERS, bucket_start
from hub.services.traffic import (
    Counts,
    SeriesKey,
    Traffic,
    increase,
    per_service,
    read_gateways,
    series_of,
)
from mmanager.loops import LoopService

# How far into a bucket the read is taken: little enough that nearly all of what it counts fell in the
# previous bucket, enough that a clock tick late does not read twice in one.
OFFSET = 0.05


@dataclass
class _Read:
    at: datetime
    series: dict[SeriesKey, Counts]


class TrafficRecorder(LoopService):
    name = "traffic-recorder"

    def __init__(self, db: Database, settings: HubSettings, clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(settings.metrics_resolution, jitter=0.0)
        self.db = db
        self.clock = clock
        self.offset = min(1.0, OFFSET * settings.metrics_resolution)
        self._last: dict[str, _Read] = {}
        self._round_at: datetime | None = None

    def next_delay(self, took: float) -> float:
        """Until ``offset`` seconds into the next bucket."""
        now = self.clock().timestamp()
        target = (int((now - self.offset) // self.interval) + 1) * self.interval + self.offset
        return max(target - now, 0.0)

    async def stop(self) -> None:
        await super().stop()
        # A leader again later has no baselines it can trust.
        self._last.clear()
        self._round_at = None

    async def run_once(self) -> None:
        now = self.clock()
        read, unreachable = await read_gateways(self.db)
        # A gateway that does not answer keeps its baseline; one gone from the live list loses it (its next
        # read, if it comes back, is a baseline again).
        baselines = {g: r for g, r in self._last.items() if g in set(unreachable)}
        by_bucket: dict[datetime, list[dict[SeriesKey, Counts]]] = {}
        for gateway, families in read:
            series = series_of(families)
            before = self._last.get(gateway.id)
            baselines[gateway.id] = _Read(now, series)
            if before is not None:
                by_bucket.setdefault(bucket_start(before.at, self.interval), []).append(increase(before.series, series))
            elif self._round_at is not None and gateway.created_at > self._round_at:
                by_bucket.setdefault(bucket_start(self._round_at, self.interval), []).append(increase({}, series))
        # Every bucket a gateway's reads covered is counted, with or without requests in it.
        traffic = {at: per_service(increases) for at, increases in by_bucket.items()}
        if traffic:
            await record(self.db, traffic, counted=traffic)
        # Only once recorded: a round that failed to write is counted by the next.
        self._last, self._round_at = baselines, now


async def record(db: Database, traffic: dict[datetime, dict[str, Traffic]], counted: Iterable[datetime] = ()) -> None:
    """Add each service's (``owner/name``) traffic to its row of each bucket; a service unknown (deleted
    meanwhile, or a frontend's own answers) is left out. In each bucket of ``counted`` (those a gateway's
    reads covered) every service meant to run has its counts, 0 where the gateways saw no request for it.

    The addition is the database's (``requests = requests + excluded.requests``, the histograms merged
    bound by bound in SQL), so no write is lost or counted twice whatever else writes the row."""
    names = {tuple(service.split("/", 1)) for services in traffic.values() for service in services if "/" in service}
    counted = sorted(set(counted))
    if not names and not counted:
        return
    async with db.session() as session:
        known = or_(tuple_(UserModel.username, ServiceModel.name).in_(sorted(names)),
                    ServiceModel.desired_state == "running" if counted else false())
        found = (await session.execute(
            select(ServiceModel.id, UserModel.username, ServiceModel.name, ServiceModel.desired_state)
            .join(UserModel, UserModel.id == ServiceModel.owner_id).where(known))).all()
        ids = {f"{owner}/{name}": sid for sid, owner, name, _ in found}
        wanted = {(sid, at): Traffic() for at in counted for sid, _, _, desired in found if desired == "running"}
        for at, services in traffic.items():
            for service, t in services.items():
                if service in ids:
                    wanted.setdefault((ids[service], at), Traffic()).add(t)
        if not wanted:
            return
        rows = [_row(sid, at, t) for (sid, at), t in sorted(wanted.items())]
        insert = sqlite_insert if db.is_sqlite else pg_insert
        stmt = insert(ServiceMetricModel)
        old, new = ServiceMetricModel, stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=[old.service_id, old.at],
            set_={"requests": func.coalesce(old.requests, 0) + new.requests,
                  "errors_5xx": func.coalesce(old.errors_5xx, 0) + new.errors_5xx,
                  "latency_buckets": text(MERGE_SQLITE if db.is_sqlite else MERGE_POSTGRESQL)})
        await session.execute(stmt, rows)


# The stored histogram and the new one summed bound by bound (NULL when both are empty): in SQL, so that the
# merge is as atomic as the upsert it is part of.
MERGE_POSTGRESQL = (
    "(SELECT json_object_agg(b.key, b.n) FROM (SELECT u.key, sum(u.value::float8) AS n FROM ("
    "SELECT * FROM json_each_text(service_metrics.latency_buckets) "
    "UNION ALL SELECT * FROM json_each_text(excluded.latency_buckets)) AS u GROUP BY u.key) AS b)")
MERGE_SQLITE = (
    "(SELECT json_group_object(b.key, b.n) FROM (SELECT u.key AS key, total(u.value) AS n FROM ("
    "SELECT key, value FROM json_each(service_metrics.latency_buckets) "
    "UNION ALL SELECT key, value FROM json_each(excluded.latency_buckets)) AS u GROUP BY u.key) AS b)")


def _row(service_id: str, at: datetime, t: Traffic) -> dict[str, Any]:
    # A row of its own (no sample yet, maybe never): the resource columns are zero with samples 0, and
    # the history shows them as None.
    return {"service_id": service_id, "at": at, "samples": 0, "cpu_percent_avg": 0.0, "cpu_percent_max": 0.0,
            "memory_bytes_avg": 0, "memory_bytes_max": 0, "memory_percent_max": 0.0, **dict.fromkeys(COUNTERS, 0),
            "requests": t.requests, "errors_5xx": t.errors_5xx, "latency_buckets": t.buckets}
